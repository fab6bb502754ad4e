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
# Version of the cache layout of a provisioned release (its wrappers); a release
# cached under an older layout gets new wrappers on first use.
LAYOUT = 4


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
    if _current(marker):
        return top / "bin"
    if marker.exists():  # an older layout: the packages are fine, the wrappers are not
        with locked(top, f"QEMU {name}"):
            if not _current(marker):
                _write_wrappers(top)
                _mark_complete(top, {**json.loads(marker.read_text()), "layout": LAYOUT})
        return top / "bin"
    apt_dir = apt_root(release.suite)
    with locked(apt_dir, "the package cache"), locked(top, f"QEMU {name}"):
        if marker.exists():
            return top / "bin"
        staging = top.with_name(top.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(top, ignore_errors=True)
        try:
            closure = debian.fetch(QEMU_PACKAGES, release.suite, staging / "prefix", apt_dir)
        except ProvisionError as exc:
            raise ProvisionError(f"cannot provision QEMU {name}: {exc}; or test your own "
                                 "QEMU: --qemu-build DIR or QEMU_PROG") from None
        _write_wrappers(staging)
        version = _check_version(staging / "bin" / "qemu-system-x86_64", name)
        _mark_complete(staging, {"release": name, "version": version, "layout": LAYOUT,
                                 "packages": dict(closure)})
        staging.rename(top)
    return top / "bin"


def _current(marker: Path) -> bool:
    """Is the release behind ``marker`` complete, with wrappers of the current layout?"""
    try:
        return bool(json.loads(marker.read_text()).get("layout") == LAYOUT)
    except (OSError, ValueError):
        return False


def _mark_complete(top: Path, data: dict[str, object]) -> None:
    tmp = top / "complete.json.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    tmp.rename(top / "complete.json")


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

    The loader is executed through a symlink named after the tool, so that the
    kernel's name of the process (``comm``, what ``pgrep -x`` / ``pidof`` / ``ps``
    show) is QEMU's, not ``ld-linux-x86-64``.  Debian's QEMU is not relocatable; QEMU
    looks for ``qemu-bundle`` beside its executable, which under the loader is the
    loader's real directory (``/proc/self/exe`` resolves the symlink).
    """
    prefix = top / "prefix"
    loader, libdirs = _loader(prefix)
    bundle = loader.parent / "qemu-bundle"
    if not bundle.exists():
        bundle.symlink_to(os.path.relpath(prefix, loader.parent))
    bindir = top / "bin"
    names = bindir / ".names"
    names.mkdir(parents=True, exist_ok=True)
    for tool in TOOLS:
        real = prefix / "usr/bin" / tool
        if not real.exists():
            raise ProvisionError(f"{tool} missing from the provisioned packages in {prefix}")
        named_loader = names / tool
        named_loader.unlink(missing_ok=True)
        named_loader.symlink_to(os.path.relpath(loader, names))
        libpath = ":".join(f'"$P/{d.relative_to(prefix)}"' for d in libdirs)
        script = (
            "#!/bin/sh\n"
            "# Runs Debian's binary through its own loader and libraries, the loader named\n"
            "# after the tool (see harness/qemu/builds.py).  No process starts before\n"
            "# QEMU (each would cost ~8 ms of CPU a run) unless $0 is a symlink to this\n"
            "# script (a build directory of links): readlink then finds the script.\n"
            'S=$0\n'
            '[ -L "$S" ] && S=$(readlink -f "$S")\n'
            'case $S in */*) ;; *) S=$(command -v "$S") ;; esac\n'
            'B=${S%/*}\n'
            'P=$B/../prefix\n'
            f'exec "$B/.names/{tool}" --library-path {libpath} '
            f'--argv0 {tool} "$P/usr/bin/{tool}" "$@"\n')
        wrapper = bindir / tool
        tmp = bindir / f".{tool}.tmp"
        tmp.write_text(script)
        tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        tmp.rename(wrapper)  # atomic: a concurrent run never sees half a script


def _check_version(qemu: Path, name: str) -> str:
    try:
        out = subprocess.run([str(qemu), "--version"], capture_output=True, text=True,
                             timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProvisionError(f"provisioned QEMU {name} does not run ({exc}); "
                             f"delete {release_dir(name)} and retry") from None
    first = (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else ""
    if out.returncode != 0 or not re.search(rf"version {re.escape(name)}[. ]", first):
        raise ProvisionError(f"provisioned QEMU {name} does not run as expected "
                             f"({first or out.stderr.strip()!r}); "
                             f"delete {release_dir(name)} and retry")
    return first.split("version ", 1)[1].split()[0]


def _executable(path: str | Path, what: str, fix: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{what}: {p} does not exist; {fix}")
    if not os.access(p, os.X_OK):
        raise ConfigError(f"{what}: {p} is not executable; {fix}")
    return p if p.is_absolute() else p.resolve()


@dataclass(frozen=True)
class BuildChoice:
    """The binaries chosen from options and environment, before anything is fetched:
    user-given paths (checked to exist), and the release that provides the rest."""

    chosen: Mapping[str, Path]
    origin: Mapping[str, str]
    release: str

    @property
    def needs_provisioning(self) -> bool:
        return len(self.chosen) < len(TOOLS)

    def describe(self) -> str:
        """Where each binary comes from, without fetching anything."""
        return ", ".join(f"{tool}: {self.chosen[tool]} [{self.origin[tool]}]"
                         if tool in self.chosen else f"{tool}: provisioned release {self.release}"
                         for tool in TOOLS)

    def realize(self) -> QemuBuild:
        """The build, with the release provisioned (fetched once, cached) if needed."""
        chosen, origin = dict(self.chosen), dict(self.origin)
        if self.needs_provisioning:
            bindir = provision(self.release)
            for tool in TOOLS:
                if tool not in chosen:
                    chosen[tool] = bindir / tool
                    origin[tool] = f"provisioned release {self.release}"
        return QemuBuild(chosen["qemu-system-x86_64"], chosen["qemu-img"], chosen["qemu-io"],
                         origin, self.release if self.needs_provisioning else None)


def choose(*, qemu_build: str | None = None, qemu_prog: str | None = None,
           qemu_img_prog: str | None = None, qemu_io_prog: str | None = None,
           release: str | None = None, env: Mapping[str, str] | None = None) -> BuildChoice:
    """Choose the binaries under test (see the module docstring for precedence).

    Only checks paths: no binary runs, nothing is fetched."""
    env = os.environ if env is None else env
    name = release or DEFAULT_RELEASE
    if name not in RELEASES and not re.fullmatch(r"\d+\.\d+(?:\.\d+)?", name):
        # Other versions are looked up in the archive's indexes when first needed.
        raise ConfigError(f"unknown QEMU release {name!r}: choose one of "
                          f"{', '.join(RELEASES)}, a version the archive serves "
                          "(python -m harness releases), or pass --qemu-build / QEMU_PROG")
    options = {"qemu-system-x86_64": ("--qemu-prog", qemu_prog, "QEMU_PROG"),
               "qemu-img": ("--qemu-img-prog", qemu_img_prog, "QEMU_IMG_PROG"),
               "qemu-io": ("--qemu-io-prog", qemu_io_prog, "QEMU_IO_PROG")}
    build_dir = None
    if qemu_build is not None:
        build_dir = Path(qemu_build).expanduser()
        if not build_dir.is_dir():
            raise ConfigError(f"--qemu-build {build_dir}: not a directory; pass a QEMU build "
                              "directory (the one holding qemu-system-x86_64, qemu-img, qemu-io)")
    chosen: dict[str, Path] = {}
    origin: dict[str, str] = {}
    for tool, (flag, value, var) in options.items():
        fix = f"fix {flag} / {var} or pass --qemu-build DIR"
        if value:
            chosen[tool], origin[tool] = _executable(value, flag, fix), flag
        elif build_dir is not None:
            candidates = [build_dir / tool, build_dir / "bin" / tool]
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                raise ConfigError(f"--qemu-build {build_dir}: no {tool} in it; "
                                  f"build it (make {tool}) or pass {flag}")
            chosen[tool], origin[tool] = _executable(found, "--qemu-build", fix), "--qemu-build"
        elif env.get(var):
            chosen[tool], origin[tool] = _executable(env[var], var, fix), var
    user_system = chosen.get("qemu-system-x86_64")
    for tool in TOOLS:
        sibling = user_system.parent / tool if user_system else None
        if tool not in chosen and sibling is not None and sibling.is_file() \
                and os.access(sibling, os.X_OK):
            chosen[tool], origin[tool] = sibling, f"beside {origin['qemu-system-x86_64']}"
    return BuildChoice(chosen, origin, name)


def select(*, qemu_build: str | None = None, qemu_prog: str | None = None,
           qemu_img_prog: str | None = None, qemu_io_prog: str | None = None,
           release: str | None = None, env: Mapping[str, str] | None = None) -> QemuBuild:
    """:func:`choose`, then provision what is missing: the build, ready to run."""
    return choose(qemu_build=qemu_build, qemu_prog=qemu_prog, qemu_img_prog=qemu_img_prog,
                  qemu_io_prog=qemu_io_prog, release=release, env=env).realize()
