"""Disk images, offline, with the build's own ``qemu-img`` and ``qemu-io``."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

from ..errors import HarnessError
from ..qemu.builds import QemuBuild
from ..qemu.machine import QemuIoResult

TOOL_TIMEOUT = 60.0


class ImageError(HarnessError):
    """qemu-img or qemu-io failed on an image."""


class Images:
    """Create images, write patterns and check data with one build's tools."""

    def __init__(self, build: QemuBuild, folder: Path):
        self.build = build
        self.folder = Path(folder)

    def path(self, name: str) -> Path:
        return self.folder / name

    def _run(self, argv: Sequence[str], what: str) -> subprocess.CompletedProcess[str]:
        try:
            proc = subprocess.run(list(argv), capture_output=True, text=True,
                                  timeout=TOOL_TIMEOUT, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise ImageError(f"{what}: no answer within {TOOL_TIMEOUT:g}s: {' '.join(argv)}") \
                from None
        return proc

    def create(self, name: str, size: str | int, fmt: str = "qcow2",
               options: Sequence[str] = ()) -> Path:
        path = self.path(name)
        argv = [str(self.build.qemu_img), "create", "-q", "-f", fmt,
                *[x for o in options for x in ("-o", o)], str(path), str(size)]
        proc = self._run(argv, f"create {name}")
        if proc.returncode != 0:
            raise ImageError(f"qemu-img create {name} failed: {proc.stderr.strip()}")
        return path

    def qemu_io(self, path: Path, *commands: str, fmt: str = "qcow2",
                force_share: bool = False) -> QemuIoResult:
        return self.qemu_io_on(["-f", fmt, *(["-U"] if force_share else []), str(path)],
                               *commands, what=f"qemu-io {path.name}")

    def qemu_io_on(self, image: Sequence[str], *commands: str, what: str = "qemu-io"
                   ) -> QemuIoResult:
        """qemu-io on any image spec (``["-r", "--image-opts", "driver=nbd,..."]``)."""
        argv = [str(self.build.qemu_io)]
        for c in commands:
            argv += ["-c", c]
        proc = self._run([*argv, *image], what)
        return QemuIoResult("; ".join(commands), (proc.stdout + proc.stderr).strip())

    def write(self, path: Path, pattern: int, offset: int | str, length: int | str,
              fmt: str = "qcow2") -> None:
        result = self.qemu_io(path, f"write -P {pattern:#x} {offset} {length}", fmt=fmt)
        if not result.ok:
            raise ImageError(f"writing pattern {pattern:#x} to {path.name} failed: "
                             f"{result.error}")

    def holds(self, path: Path, pattern: int, offset: int | str, length: int | str,
              fmt: str = "qcow2", force_share: bool = False) -> bool:
        """True if every byte of the range reads as ``pattern``."""
        result = self.qemu_io(path, f"read -P {pattern:#x} {offset} {length}", fmt=fmt,
                              force_share=force_share)
        if "Pattern verification failed" in result.output:
            return False
        if not result.ok:
            raise ImageError(f"reading {path.name} at {offset} failed: {result.error}")
        return True

    def holds_each(self, path: Path, pattern: int, offsets: Sequence[int], length: int,
                   fmt: str = "qcow2") -> dict[int, bool]:
        """:meth:`holds` for several offsets in one qemu-io run (offsets must differ)."""
        if len(set(offsets)) != len(offsets):
            raise ValueError("holds_each() needs distinct offsets")
        result = self.qemu_io(path, *(f"read -P {pattern:#x} {o} {length}" for o in offsets),
                              fmt=fmt)
        failed = {int(m) for m in re.findall(r"Pattern verification failed at offset (\d+)",
                                              result.output)}
        done = {int(m) for m in re.findall(r"^read \d+/\d+ bytes at offset (\d+)$",
                                            result.output, re.M)}
        if done != set(offsets):
            raise ImageError(f"reading {path.name} failed: {result.error or result.output}")
        return {o: o not in failed for o in offsets}

    def identical(self, a: Path, b: Path, fmt_a: str = "qcow2", fmt_b: str = "qcow2") -> bool:
        """``qemu-img compare``: same guest-visible content?"""
        proc = self._run([str(self.build.qemu_img), "compare", "-q", "-f", fmt_a, "-F", fmt_b,
                          str(a), str(b)], f"compare {a.name} {b.name}")
        if proc.returncode in (0, 1):
            return proc.returncode == 0
        raise ImageError(f"qemu-img compare {a.name} {b.name} failed: {proc.stderr.strip()}")
