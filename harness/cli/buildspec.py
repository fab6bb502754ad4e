"""What a user may name as a build: a release, a build directory or a qemu-system path.

``NAME=SPEC`` names a build explicitly; otherwise a release is named by itself, a
directory by its folder name and a binary by its directory's name.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..qemu import releases

QEMU_SYSTEM = "qemu-system-x86_64"
# The variables that would otherwise choose a binary behind the spec's back.
SELECTING_ENV = ("QEMU_PROG", "QEMU_IMG_PROG", "QEMU_IO_PROG", "CBW_QEMU_RELEASE",
                 "CBW_BUILD_NAME", "CBW_ARTIFACTS")


@dataclass(frozen=True)
class BuildSpec:
    name: str
    kind: str  # "release" | "dir" | "prog"
    target: str

    def pytest_args(self) -> list[str]:
        flag = {"release": "--qemu-release", "dir": "--qemu-build", "prog": "--qemu-prog"}
        return [flag[self.kind], self.target]

    def describe(self) -> str:
        return {"release": "release", "dir": "build directory",
                "prog": "qemu-system"}[self.kind] + f" {self.target}"


def _looks_like_path(text: str) -> bool:
    return "/" in text or text.startswith((".", "~")) or Path(text).exists()


def parse(text: str) -> BuildSpec:
    """One build; bad input raises :class:`ConfigError` (one line, the fix in it)."""
    name, sep, target = text.partition("=")
    if not sep:
        name, target = "", text
    if not target:
        raise ConfigError(f"empty build in {text!r}: write NAME=SPEC or just SPEC")
    if _looks_like_path(target):
        path = Path(target).expanduser()
        if path.is_dir():
            if not any((path / sub / QEMU_SYSTEM).is_file() for sub in (".", "bin")):
                raise ConfigError(f"build directory {path} has no {QEMU_SYSTEM}: build it "
                                  f"first (make {QEMU_SYSTEM}) or name the binary itself")
            default = path.resolve().name
            return BuildSpec(name or default, "dir", str(path.resolve()))
        # A file, or a path that does not exist: the run reports it as a build that
        # cannot start (one column of errors), not as bad input.
        default = path.parent.name or path.name
        resolved = str(path.resolve()) if path.exists() else str(path)
        return BuildSpec(name or default, "prog", resolved)
    release = releases.lookup(target)  # raises ConfigError for an unknown release
    return BuildSpec(name or target, "release", release)


def parse_all(texts: Sequence[str]) -> list[BuildSpec]:
    if not texts:
        raise ConfigError("no builds given: name releases, build directories or "
                          "qemu-system paths (e.g. 7.2 11.1 ~/src/qemu/build)")
    specs = [parse(t) for t in texts]
    seen: dict[str, BuildSpec] = {}
    for s in specs:
        if s.name in seen:
            raise ConfigError(f"two builds named {s.name!r} ({seen[s.name].describe()} and "
                              f"{s.describe()}): name them apart with NAME=SPEC")
        if not s.name or "/" in s.name or s.name.startswith("."):
            raise ConfigError(f"bad build name {s.name!r}: use letters, digits, '.', '-'")
        seen[s.name] = s
    return specs


def clean_env() -> dict[str, str]:
    """The environment for a run whose build is chosen by its command line alone."""
    env = {k: v for k, v in os.environ.items() if k not in SELECTING_ENV}
    env.pop("PYTEST_XDIST_WORKER", None)
    return env
