"""Which QEMU releases Debian's archive serves for amd64, found from its indexes.

The archive's suite aliases (``oldstable`` ... ``unstable``, with backports) are read
through the project's private apt (:mod:`harness.qemu.debian`); each ``qemu-system-x86``
version found becomes a release named by its upstream version (``10.0.2``).  A series
name (``10.0``) picks the newest of its series.  The index is cached for a day.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass

from ..errors import ConfigError
from . import debian
from .cache import cache_root, locked

# Aliases, not codenames: the archive says which codename each stands for today.
SUITE_ALIASES = ("oldstable", "oldstable-backports", "stable", "stable-backports",
                 "testing", "unstable")
PACKAGE = "qemu-system-x86"
INDEX_MAX_AGE = 24 * 3600.0
_UPSTREAM = re.compile(r"^(?:\d+:)?(\d+\.\d+(?:\.\d+)?)")
_SERIES = re.compile(r"^\d+\.\d+$")


@dataclass(frozen=True)
class Available:
    """One QEMU version the archive serves, and the suite that serves it."""

    upstream: str        # "10.0.2"
    debian_version: str  # "1:10.0.2+ds-1~bpo12+1"
    suite: str           # codename, e.g. "bookworm-backports"
    base: str            # the suite it depends on, e.g. "bookworm"

    @property
    def key(self) -> tuple[int, ...]:
        return version_key(self.upstream)

    def to_suite(self) -> debian.Suite:
        suites = (self.base, self.suite) if self.base != self.suite else (self.suite,)
        return debian.Suite(suites, self.suite)


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version))


def upstream_of(debian_version: str) -> str | None:
    m = _UPSTREAM.match(debian_version)
    return m.group(1) if m else None


class _IndexReader(debian.PrivateApt):
    """The private apt, asked what the indexes hold rather than to install anything."""

    def codenames(self) -> dict[str, str]:
        """alias -> codename, from each suite's signed Release file."""
        out = {}
        for alias in self.suites:
            hits = list((self.root / "state/lists").glob(f"*_dists_{alias}_InRelease"))
            text = hits[0].read_text(errors="replace") if hits else ""
            m = re.search(r"^Codename:\s*(\S+)", text, re.M)
            out[alias] = m.group(1) if m else alias  # "bookworm-backports" for backports
        return out

    def madison(self, package: str) -> list[tuple[str, str]]:
        """(version, alias) for every version of ``package`` in the indexes."""
        import subprocess
        proc = subprocess.run(["apt-cache", *self._options(), "madison", package],
                              capture_output=True, text=True)
        rows = []
        for line in proc.stdout.splitlines():
            cells = [c.strip() for c in line.split("|")]
            if len(cells) == 3 and "amd64" in cells[2]:
                rows.append((cells[1], cells[2].split()[1].split("/")[0]))
        return rows


def discover(refresh: bool = False) -> list[Available]:
    """Every QEMU version served for amd64, newest first (cached for a day)."""
    root = cache_root() / "apt" / "releases"
    index = cache_root() / "releases.json"
    with locked(root, "the release index"):
        if not refresh and index.exists() and \
                time.time() - index.stat().st_mtime < INDEX_MAX_AGE:
            return [Available(**a) for a in json.loads(index.read_text())]
        reader = _IndexReader(root, SUITE_ALIASES)
        reader.update()
        codenames = reader.codenames()
        found: dict[str, Available] = {}
        rows = sorted(reader.madison(PACKAGE), key=lambda r: SUITE_ALIASES.index(r[1])
                      if r[1] in SUITE_ALIASES else len(SUITE_ALIASES))
        for version, alias in rows:
            upstream = upstream_of(version)
            if upstream is None or alias not in codenames:
                continue
            suite = codenames[alias]
            # The first suite listing a version (the most stable one) serves it.
            if upstream not in found:
                found[upstream] = Available(upstream, version, suite,
                                            suite.removesuffix("-backports"))
        result = sorted(found.values(), key=lambda a: a.key, reverse=True)
        index.write_text(json.dumps([a.__dict__ for a in result], indent=1))
        return result


def choose(name: str, available: list[Available]) -> Available:
    """The release ``name`` stands for: exact version, or the newest of a series."""
    exact = [a for a in available if a.upstream == name]
    if exact:
        return exact[0]
    if _SERIES.match(name):
        series = [a for a in available if a.upstream.startswith(name + ".")]
        if series:
            return max(series, key=lambda a: a.key)
    known = ", ".join(a.upstream for a in available) or "none"
    raise ConfigError(f"unknown QEMU release {name!r}: Debian's archive serves {known} "
                      "(or pass a build directory / qemu-system path)")


def find(name: str) -> Available:
    return choose(name, discover())


def lookup(name: str) -> str:
    """Validate a release name without fetching QEMU; returns the name to provision.

    Names the cache already provisions are answered offline."""
    from .builds import RELEASES, release_dir
    if name in RELEASES or (release_dir(name) / "complete.json").exists():
        return name
    find(name)
    return name


def ordered_names(available: list[Available]) -> list[str]:
    """Every release by its exact name, oldest first (what a release bisect walks)."""
    return [a.upstream for a in sorted(available, key=lambda a: a.key)]


def describe(available: list[Available]) -> str:
    return "\n".join(f"{a.upstream:10} {a.suite:20} {a.debian_version}" for a in available)


