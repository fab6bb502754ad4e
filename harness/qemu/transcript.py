"""iotests-style transcripts: what a scenario did and saw, filtered, against a reference.

Only what the scenario chose to log goes in (QMP commands, replies, awaited events,
qemu-io results, verdicts), never QEMU's stderr: a new deprecation warning in QEMU
cannot break a comparison.  Filters are small pure functions.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import CommandFailed

Filter = Callable[[str], str]

_QEMU_IO_RATE = re.compile(r"^\d+(\.\d+)? (?:bytes|[KMGTPE]iB), \d+ ops; .*$", re.M)
_TIMESTAMP = re.compile(r'"timestamp": \{[^}]*\}, ')


def filter_qemu_io(text: str) -> str:
    """Drop qemu-io's throughput lines (they carry timings)."""
    return _QEMU_IO_RATE.sub("", text).replace("\n\n", "\n").strip("\n")


def filter_timestamps(text: str) -> str:
    return _TIMESTAMP.sub("", text)


def path_filter(path: Path | str, name: str = "TEST_DIR") -> Filter:
    folder = str(path)
    return lambda text: text.replace(folder, name)


DEFAULT_FILTERS: tuple[Filter, ...] = (filter_timestamps, filter_qemu_io)


class Transcript:
    """A scenario's log, line by line, with filters applied as it is written."""

    def __init__(self, filters: Iterable[Filter] = DEFAULT_FILTERS):
        self.filters = list(filters)
        self.lines: list[str] = []

    def add_filter(self, f: Filter) -> None:
        self.filters.append(f)

    def _apply(self, text: str) -> str:
        for f in self.filters:
            text = f(text)
        return text

    def log(self, item: str | Mapping[str, Any] | list[Any]) -> None:
        text = item if isinstance(item, str) else json.dumps(item, sort_keys=True)
        self.lines.append(self._apply(text))

    def command(self, command: str, args: Mapping[str, Any] | None, reply: Any) -> None:
        self.log({"execute": command, **({"arguments": dict(args)} if args else {})})
        self.log(reply if isinstance(reply, dict) and "error" in reply else {"return": reply})

    def execute(self, vm: Any, command: str, args: Mapping[str, Any] | None = None) -> Any:
        """Run ``vm.cmd(command, args)`` and log the command with its reply or error."""
        try:
            reply = vm.cmd(command, args)
        except CommandFailed as exc:
            self.command(command, args, {"error": {"class": exc.error_class, "desc": exc.desc}})
            raise
        self.command(command, args, reply)
        return reply

    def event(self, event: Mapping[str, Any]) -> None:
        shown = {k: v for k, v in event.items() if k != "timestamp"}
        if event.get("event") == "BLOCK_JOB_CANCELLED":
            # How far a job got before the cancel took effect depends on timing.
            shown["data"] = {k: v for k, v in event.get("data", {}).items() if k != "offset"}
        self.log(shown)

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def shared_reference_path(folder: Path, test_name: str) -> Path:
    """``<test>.out``: the reference of every build without one of its own."""
    return folder / (re.sub(r"[^A-Za-z0-9_.=-]+", "_", test_name).strip("_") + ".out")


def specific_reference_path(folder: Path, test_name: str, version: tuple[int, ...]) -> Path:
    """``<test>.<major>.<minor>.out``: the reference of the builds of one release."""
    shared = shared_reference_path(folder, test_name)
    return shared.with_suffix(f".{version[0]}.{version[1]}.out")


def reference_path(folder: Path, test_name: str, version: tuple[int, ...]) -> Path:
    """``<test>.out``, or ``<test>.<major>.<minor>.out`` where a build differs."""
    specific = specific_reference_path(folder, test_name, version)
    return specific if specific.exists() else shared_reference_path(folder, test_name)


def compare(text: str, reference: Path, regenerate: bool) -> None:
    """Raise AssertionError with a unified diff if ``text`` differs from ``reference``."""
    if regenerate:
        reference.parent.mkdir(parents=True, exist_ok=True)
        reference.write_text(text)
        return
    if not reference.exists():
        raise AssertionError(f"no reference transcript {reference}: "
                             "run with --regen-reference to create it, then review it")
    expected = reference.read_text()
    if expected != text:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True),
                                            str(reference), "this run"))
        raise AssertionError(f"transcript differs from {reference.name} "
                             f"(--regen-reference rewrites it):\n{diff}")
