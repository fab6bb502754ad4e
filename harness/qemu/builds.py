"""Which QEMU binaries are under test: user-given builds and provisioned releases.

Precedence for each binary, most specific first: its own option (``--qemu-prog``,
``--qemu-img-prog``, ``--qemu-io-prog``), ``--qemu-build DIR``, the environment variables
QEMU's iotests use (``QEMU_PROG``, ``QEMU_IMG_PROG``, ``QEMU_IO_PROG``), a named
provisioned release (``--qemu-release``), the default provisioned release.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, ProvisionError
from . import debian
from .cache import apt_root, cache_root, locked


@dataclass(frozen=True)
class Release:
    """A QEMU release provisioned from Debian's binary packages."""

    name: str
    suite: debian.Suite


RELEASES: dict[str, Release] = {
    "11.1": Release("11.1", debian.Suite(("trixie", "trixie-backports"), "trixie-backports")),
    "10.0": Release("10.0", debian.Suite(("trixie", "trixie-backports"), "trixie")),
    "7.2": Release("7.2", debian.Suite(("bookworm",), "bookworm")),
}
DEFAULT_RELEASE = "11.1"
QEMU_PACKAGES = ("qemu-system-x86", "qemu-utils")
TOOLS = ("qemu-system-x86_64", "qemu-img", "qemu-io")


@dataclass(frozen=True)
class QemuBuild:
    """The three binaries under test, and where each choice came from."""

    qemu_system: Path
    qemu_img: Path
    qemu_io: Path
    origin: Mapping[str, str] = field(default_factory=dict)  # tool -> "--qemu-prog", ...
    release: str | None = None

    def as_env(self) -> dict[str, str]:
        """The iotests-style variables that select exactly this build."""
        return {"QEMU_PROG": str(self.qemu_system), "QEMU_IMG_PROG": str(self.qemu_img),
                "QEMU_IO_PROG": str(self.qemu_io)}


def release_dir(name: str) -> Path:
    return cache_root() / "qemu" / name


def provision(name: str = DEFAULT_RELEASE) -> Path:
    """Make release ``name`` available in the cache; returns the directory of its wrappers."""
    release = RELEASES.get(name) or _discovered(name)
    top = release_dir(name)
    marker = top / "complete.json"
    if marker.exists():
        return top / "bin"
    apt_dir = apt_root(release.suite)
    with locked(apt_dir, "the package cache"), locked(top, f"QEMU {name}"):
        if marker.exists():
            return top / "bin"
        staging = top.with_name(top.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(top, ignore_errors=True)
        closure = debian.fetch(QEMU_PACKAGES, release.suite, staging / "prefix", apt_dir)
        _write_wrappers(staging)
        version = _check_version(staging / "bin" / "qemu-system-x86_64", name)
        (staging / "complete.json").write_text(json.dumps(
            {"release": name, "version": version, "packages": dict(closure)}, indent=1))
        staging.rename(top)
    return top / "bin"


def _discovered(name: str) -> Release:
    """A release the archive's indexes name (harness/qemu/releases.py), e.g. ``10.0.2``."""
    from . import releases
    return Release(name, releases.find(name).to_suite())


def _loader(prefix: Path) -> tuple[Path, list[Path]]:
    """The prefix's own dynamic loader and library directories (usr-merged or not)."""
    libdirs = [prefix / "usr/lib/x86_64-linux-gnu", prefix / "lib/x86_64-linux-gnu"]
    for d in libdirs:
        if (d / "ld-linux-x86-64.so.2").exists():
            return d / "ld-linux-x86-64.so.2", [x for x in libdirs if x.exists()]
    raise ProvisionError(f"no ld-linux-x86-64.so.2 in {prefix}: the package set is incomplete; "
                         f"delete {prefix.parent} and retry")


def _write_wrappers(top: Path) -> None:
    """Scripts that ``exec`` QEMU through the prefix's loader (the PID stays QEMU's).

    Debian's QEMU is not relocatable; QEMU looks for ``qemu-bundle`` beside its
    executable, which under the loader is the loader's directory.
    """
    prefix = top / "prefix"
    loader, libdirs = _loader(prefix)
    bundle = loader.parent / "qemu-bundle"
    if not bundle.exists():
        bundle.symlink_to(os.path.relpath(prefix, loader.parent))
    bindir = top / "bin"
    bindir.mkdir(exist_ok=True)
    for tool in TOOLS:
        real = prefix / "usr/bin" / tool
        if not real.exists():
            raise ProvisionError(f"{tool} missing from the provisioned packages in {prefix}")
        libpath = ":".join(f'"$P/{d.relative_to(prefix)}"' for d in libdirs)
        script = (
            "#!/bin/sh\n"
            "# Runs Debian's binary through its own loader and libraries (see harness/qemu/builds.py).\n"
            'P="$(cd "$(dirname "$0")/../prefix" && pwd)"\n'
            f'exec "$P/{loader.relative_to(prefix)}" --library-path {libpath} '
            f'--argv0 {tool} "$P/usr/bin/{tool}" "$@"\n')
        wrapper = bindir / tool
        wrapper.write_text(script)
        wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _check_version(qemu: Path, name: str) -> str:
    out = subprocess.run([str(qemu), "--version"], capture_output=True, text=True, timeout=30)
    first = (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else ""
    if out.returncode != 0 or not re.search(rf"version {re.escape(name)}[. ]", first):
        raise ProvisionError(f"provisioned QEMU {name} does not run as expected "
                             f"({first or out.stderr.strip()!r}); delete {release_dir(name)} and retry")
    return first.split("version ", 1)[1].split()[0]


def _executable(path: str | Path, what: str, fix: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{what}: {p} does not exist; {fix}")
    if not os.access(p, os.X_OK):
        raise ConfigError(f"{what}: {p} is not executable; {fix}")
    return p.resolve() if not p.is_absolute() else p


def select(*, qemu_build: str | None = None, qemu_prog: str | None = None,
           qemu_img_prog: str | None = None, qemu_io_prog: str | None = None,
           release: str | None = None, env: Mapping[str, str] | None = None) -> QemuBuild:
    """Choose the binaries under test (see the module docstring for precedence)."""
    env = os.environ if env is None else env
    options = {"qemu-system-x86_64": ("--qemu-prog", qemu_prog, "QEMU_PROG"),
               "qemu-img": ("--qemu-img-prog", qemu_img_prog, "QEMU_IMG_PROG"),
               "qemu-io": ("--qemu-io-prog", qemu_io_prog, "QEMU_IO_PROG")}
    if qemu_build is not None:
        d = Path(qemu_build).expanduser()
        if not d.is_dir():
            raise ConfigError(f"--qemu-build {d}: not a directory; pass a QEMU build directory "
                              "(the one holding qemu-system-x86_64, qemu-img, qemu-io)")
    chosen: dict[str, Path] = {}
    origin: dict[str, str] = {}
    for tool, (flag, value, var) in options.items():
        fix = f"fix {flag} / {var} or pass --qemu-build DIR"
        if value:
            chosen[tool], origin[tool] = _executable(value, flag, fix), flag
        elif qemu_build is not None:
            candidates = [Path(qemu_build) / tool, Path(qemu_build) / "bin" / tool]
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                raise ConfigError(f"--qemu-build {qemu_build}: no {tool} in it; "
                                  f"build it (make {tool}) or pass {flag}")
            chosen[tool], origin[tool] = _executable(found, "--qemu-build", fix), "--qemu-build"
        elif env.get(var):
            chosen[tool], origin[tool] = _executable(env[var], var, fix), var
    user_system = chosen.get("qemu-system-x86_64")
    for tool in TOOLS:
        if tool in chosen:
            continue
        sibling = user_system.parent / tool if user_system else None
        if sibling is not None and sibling.is_file() and os.access(sibling, os.X_OK):
            chosen[tool], origin[tool] = sibling, f"beside {origin['qemu-system-x86_64']}"
            continue
        name = release or DEFAULT_RELEASE
        chosen[tool] = provision(name) / tool
        origin[tool] = f"provisioned release {name}"
    used_release = (release or DEFAULT_RELEASE) if any(
        o.startswith("provisioned") for o in origin.values()) else None
    return QemuBuild(chosen["qemu-system-x86_64"], chosen["qemu-img"], chosen["qemu-io"],
                     origin, used_release)
