"""Fetch Debian binary packages into a private prefix, without touching the host.

apt runs with a configuration of its own: its own sources list (the mirror is read
from the host's apt configuration, never hard-coded), an empty dpkg status file so
that it resolves the complete dependency closure, and its own state and cache
directories.  Packages are verified by apt (signed indexes, hashes) and unpacked
with ``dpkg-deb`` into the prefix; nothing is installed system-wide.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ProvisionError

APT_SOURCES = Path("/etc/apt/sources.list")
APT_SOURCES_DIR = Path("/etc/apt/sources.list.d")
# Mirrors that carry only security updates cannot serve other suites.
_NOT_A_MAIN_MIRROR = re.compile(r"security|snapshot")


@dataclass(frozen=True)
class Suite:
    """Which suites to resolve from, and which one to prefer (``apt-get -t``)."""

    suites: tuple[str, ...]
    target: str


KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")

# Time limits of the subprocesses (a hung mirror or a stuck pipe must not hang a run):
# generous for a slow mirror delivering ~40 MB, short for local work.
APT_UPDATE_TIMEOUT = 300.0
APT_RESOLVE_TIMEOUT = 120.0
APT_DOWNLOAD_TIMEOUT = 900.0
UNPACK_TIMEOUT = 300.0


def host_mirror() -> str:
    """The Debian mirror: ``$CBW_DEBIAN_MIRROR``, else the host's own apt configuration's."""
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise ProvisionError("not a Debian-family host (no apt-get/dpkg-deb), so Debian's "
                             "packages cannot be fetched")
    if not KEYRING.exists():
        raise ProvisionError(
            f"{KEYRING} is missing, so Debian's archive cannot be verified: "
            "apt-get install debian-archive-keyring")
    if os.environ.get("CBW_DEBIAN_MIRROR"):
        return os.environ["CBW_DEBIAN_MIRROR"].rstrip("/")
    deb822 = [p.read_text(errors="replace") for p in sorted(APT_SOURCES_DIR.glob("*.sources"))]
    one_line = [p.read_text(errors="replace") for p in
                [APT_SOURCES, *sorted(APT_SOURCES_DIR.glob("*.list"))] if p.exists()]
    mirror = mirror_in(deb822, one_line)
    if mirror:
        return mirror
    raise ProvisionError(
        "no Debian mirror in /etc/apt/sources.list{,.d} (not a Debian host?): set "
        "CBW_DEBIAN_MIRROR to a Debian mirror URI")


def mirror_in(deb822_files: list[str], one_line_files: list[str]) -> str | None:
    """The first Debian archive mirror named by apt sources (both formats), if any."""
    uris: list[str] = []
    for text in deb822_files:
        for stanza in re.split(r"\n\s*\n", text):
            fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M))
            if "deb" in fields.get("Types", "").split() and \
                    fields.get("Enabled", "yes").lower() != "no":
                uris += fields.get("URIs", "").split()
    for text in one_line_files:
        for line in text.splitlines():
            m = re.match(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)", line)
            if m:
                uris.append(m.group(1))
    for uri in uris:
        if uri.rstrip("/").endswith("/debian") and not _NOT_A_MAIN_MIRROR.search(uri):
            return uri.rstrip("/")
    return None


# Package lists refreshed by this process, per apt root and suite set.
_UPDATED_THIS_PROCESS: set[tuple[str, tuple[str, ...]]] = set()


class PrivateApt:
    """An apt instance with its own sources, state and cache under ``root``."""

    def __init__(self, root: Path, suites: Sequence[str], mirror: str | None = None):
        self.root = root
        self.suites = tuple(suites)
        self.mirror = mirror or host_mirror()
        self._lists_ready = False

    def _options(self) -> list[str]:
        r = self.root
        opts = {
            "Dir::Etc::SourceList": r / "sources.list",
            "Dir::Etc::SourceParts": r / "sources.list.d",
            "Dir::Etc::Preferences": r / "preferences",
            "Dir::Etc::PreferencesParts": r / "preferences.d",
            "Dir::State": r / "state",
            "Dir::State::Lists": r / "state/lists",
            "Dir::State::status": r / "state/status",
            "Dir::Cache": r / "cache",
            "Dir::Cache::archives": r / "archives",
            "Debug::NoLocking": "1",
            "Acquire::Languages": "none",
            "APT::Sandbox::User": "root" if os.geteuid() == 0 else "",
            "APT::Get::AllowUnauthenticated": "false",
            "APT::Install-Recommends": "false",
        }
        return [f"-o{k}={v}" for k, v in opts.items() if v != ""]

    def _prepare(self) -> None:
        for sub in ("sources.list.d", "preferences.d", "state/lists/partial",
                    "cache", "archives/partial"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "state/status").touch()
        (self.root / "sources.list").write_text("".join(
            f"deb [signed-by={KEYRING}] {self.mirror} {suite} main\n" for suite in self.suites))

    def _run(self, args: list[str], what: str, timeout: float) -> str:
        cmd = ["apt-get", *self._options(), *args]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  cwd=self.root / "archives", stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise ProvisionError(f"apt-get {args[0]} hung: no result within {timeout:.0f} s "
                                 f"while trying to {what}; check the mirror {self.mirror} "
                                 "(or set CBW_DEBIAN_MIRROR) and retry") from None
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise ProvisionError(f"apt failed to {what}: {tail}")
        return proc.stdout

    def update(self) -> None:
        key = (str(self.root), self.suites)
        if self._lists_ready or key in _UPDATED_THIS_PROCESS:
            return
        self._prepare()
        _say(f"updating package lists for {' '.join(self.suites)}")
        self._run(["update"], f"update the package lists of {' '.join(self.suites)} "
                  "(is the Debian mirror reachable?)", APT_UPDATE_TIMEOUT)
        self._lists_ready = True
        _UPDATED_THIS_PROCESS.add(key)

    def resolve(self, packages: Iterable[str], target: str) -> list[tuple[str, str]]:
        """The full dependency closure of ``packages``, as (name, version)."""
        self.update()
        out = self._run(["-s", "-t", target, "install", *packages],
                        f"resolve {' '.join(packages)} from {target}", APT_RESOLVE_TIMEOUT)
        closure = re.findall(r"^Inst (\S+) \((\S+)", out, re.M)
        if not closure:
            raise ProvisionError(f"apt resolved nothing for {' '.join(packages)} in {target}")
        return closure

    def download(self, pinned: list[tuple[str, str]]) -> list[Path]:
        """Download (or reuse) the .deb files; apt verifies their hashes."""
        self.update()
        archives = self.root / "archives"
        missing = [(n, v) for n, v in pinned if not _deb_for(archives, n, v)]
        if missing:
            _say(f"downloading {len(missing)} packages")
            start = time.monotonic()
            self._run(["download", *[f"{n}={v}" for n, v in missing]],
                      "download packages", APT_DOWNLOAD_TIMEOUT)
            size = sum(d.stat().st_size for n, v in missing if (d := _deb_for(archives, n, v)))
            _say(f"downloaded {size / 1e6:.1f} MB in {time.monotonic() - start:.1f} s "
                 "(verified by apt)")
        debs = []
        for name, version in pinned:
            deb = _deb_for(archives, name, version)
            if deb is None:
                raise ProvisionError(f"apt did not download {name}={version}")
            debs.append(deb)
        return debs


def _deb_for(archives: Path, name: str, version: str) -> Path | None:
    # apt escapes ':' in epochs as %3a in file names.
    quoted = version.replace(":", "%3a")
    hits = list(archives.glob(f"{name}_{quoted}_*.deb"))
    return hits[0] if hits else None


def unpack(debs: Sequence[Path], prefix: Path, skip: Sequence[str] = ("./usr/share/doc",
                                                                        "./usr/share/man")) -> None:
    """Unpack ``debs`` into ``prefix`` (no maintainer scripts), strip setuid bits."""
    prefix.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        _unpack_one(deb, prefix, skip)
    for dirpath, _dirs, files in os.walk(prefix):
        for f in files:
            p = os.path.join(dirpath, f)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                os.chmod(p, st.st_mode & ~(stat.S_ISUID | stat.S_ISGID))


def _unpack_one(deb: Path, prefix: Path, skip: Sequence[str],
                timeout: float = UNPACK_TIMEOUT) -> None:
    """``dpkg-deb --fsys-tarfile deb | tar -x``, both bounded by ``timeout``."""
    fsys = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    try:
        tar = subprocess.run(["tar", "-x", "-C", str(prefix), "--no-same-owner",
                              *[f"--exclude={s}" for s in skip]],
                             stdin=fsys.stdout, stderr=subprocess.PIPE, text=True,
                             timeout=timeout)
        status = fsys.wait(timeout=10)  # tar has read everything: dpkg-deb is ending
    except subprocess.TimeoutExpired:
        raise ProvisionError(f"unpacking {deb.name} (dpkg-deb | tar) hung: not done within "
                             f"{timeout:.0f} s; check the disk under {prefix} and retry"
                             ) from None
    finally:
        assert fsys.stdout is not None
        fsys.stdout.close()
        if fsys.poll() is None:
            fsys.kill()
            fsys.wait()
    if status != 0 or tar.returncode != 0:
        raise ProvisionError(f"could not unpack {deb.name}: {tar.stderr.strip()}")


def fetch(packages: Sequence[str], suite: Suite, prefix: Path,
          apt_root: Path) -> list[tuple[str, str]]:
    """Resolve, download and unpack ``packages`` with their dependencies into ``prefix``."""
    apt = PrivateApt(apt_root, suite.suites)
    closure = apt.resolve(packages, suite.target)
    debs = apt.download(closure)
    _say(f"unpacking {len(debs)} packages into {prefix}")
    unpack(debs, prefix)
    return closure


def _say(msg: str) -> None:
    print(f"[provision] {msg}", file=sys.stderr, flush=True)
