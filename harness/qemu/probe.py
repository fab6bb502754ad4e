"""What a build can do: version, accelerators and QMP schema, once per run.

Tests ask for capabilities by name (``"blockdev-backup.on-cbw-error"``), never by
version number; a capability is a question asked of the build's own QMP schema.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, HarnessError, MissingCapability
from .builds import QemuBuild
from .cache import cache_root


class Schema:
    """Queries on ``query-qmp-schema`` output (type names there are opaque numbers)."""

    def __init__(self, entries: Iterable[dict[str, Any]]):
        self.entries = list(entries)
        self._by_name = {e["name"]: e for e in self.entries}

    def _get(self, name: str) -> dict[str, Any] | None:
        return self._by_name.get(name)

    def has_command(self, command: str) -> bool:
        e = self._get(command)
        return e is not None and e.get("meta-type") == "command"

    def _members(self, type_name: str, variant: str | None = None) -> list[dict[str, Any]]:
        t = self._get(type_name)
        if t is None or t.get("meta-type") != "object":
            return []
        members = list(t.get("members", []))
        if variant is not None:
            for v in t.get("variants", []):
                if v["case"] == variant:
                    members += self._members(v["type"])
                    break
            else:
                return []
        return members

    def command_args(self, command: str) -> set[str]:
        e = self._get(command)
        if e is None or e.get("meta-type") != "command":
            return set()
        t = self._get(e["arg-type"])
        if t is None:
            return set()
        names = {m["name"] for m in t.get("members", [])}
        for v in t.get("variants", []):  # boxed unions (blockdev-backup is flat)
            names |= {m["name"] for m in self._members(v["type"])}
        return names

    def block_drivers(self) -> set[str]:
        opts = self._blockdev_options()
        tag = next((m for m in opts.get("members", []) if m["name"] == opts.get("tag")), None)
        return set(self.enum_values(tag["type"])) if tag else set()

    def _blockdev_options(self) -> dict[str, Any]:
        cmd = self._get("blockdev-add")
        if not cmd:
            return {}
        return self._get(cmd["arg-type"]) or {}

    def driver_options(self, driver: str) -> set[str]:
        """Options of ``blockdev-add`` for one driver (common ones included); empty if unknown."""
        opts = self._blockdev_options()
        return {m["name"] for m in self._members(opts.get("name", ""), driver)} if opts else set()

    def driver_member_type(self, driver: str, member: str) -> dict[str, Any] | None:
        opts = self._blockdev_options()
        for m in self._members(opts.get("name", ""), driver):
            if m["name"] == member:
                return self._get(m["type"])
        return None

    def enum_values(self, type_name: str) -> list[str]:
        t = self._get(type_name)
        if t is None or t.get("meta-type") != "enum":
            return []
        if "members" in t:
            return [m["name"] for m in t["members"]]
        return list(t.get("values", []))

    def blkdebug_events(self) -> list[str]:
        """Values of ``BlkdebugEvent``, the events a blkdebug rule may name."""
        array = self.driver_member_type("blkdebug", "inject-error")
        if not array or array.get("meta-type") != "array":
            return []
        rule = self._get(array["element-type"])
        for m in (rule or {}).get("members", []):
            if m["name"] == "event":
                return self.enum_values(m["type"])
        return []

    def event_members(self, event: str) -> set[str]:
        """The data members the schema declares for ``event``; empty if unknown."""
        e = self._get(event)
        if e is None or e.get("meta-type") != "event":
            return set()
        return {m["name"] for m in self._members(e.get("arg-type", ""))}

    def command_arg_type(self, command: str, arg: str) -> dict[str, Any] | None:
        e = self._get(command)
        t = self._get(e["arg-type"]) if e and e.get("meta-type") == "command" else None
        for m in (t or {}).get("members", []):
            if m["name"] == arg:
                return self._get(m["type"])
        return None

    def unix_address_members(self, address_type: dict[str, Any] | None) -> set[str]:
        """Members of a socket address union's ``unix`` case (legacy form: under ``data``)."""
        case = next((v["type"] for v in (address_type or {}).get("variants", [])
                     if v["case"] == "unix"), None)
        members = {m["name"]: m["type"] for m in self._members(case or "")}
        if "data" in members:
            members = {m["name"]: m["type"] for m in self._members(members["data"])}
        return set(members)

    def command_arg_enum(self, command: str, arg: str) -> list[str]:
        e = self._get(command)
        t = self._get(e["arg-type"]) if e else None
        for m in (t or {}).get("members", []):
            if m["name"] == arg:
                return self.enum_values(m["type"])
        return []


@dataclass(frozen=True)
class Capability:
    name: str
    description: str
    check: Callable[[BuildInfo], bool]


def _nbd_on_abstract_socket(schema: Schema) -> bool:
    server_addr = schema.command_arg_type("nbd-server-start", "addr")
    client_addr = schema.driver_member_type("nbd", "server")
    return ("abstract" in schema.unix_address_members(server_addr)
            and "abstract" in schema.unix_address_members(client_addr)
            and (schema.has_command("block-export-add") or schema.has_command("nbd-server-add")))


def _cap(name: str, description: str, check: Callable[[BuildInfo], bool]) -> Capability:
    return Capability(name, description, check)


CAPABILITIES: dict[str, Capability] = {c.name: c for c in [
    _cap("machine.microvm", "the microvm machine type (virtio-mmio devices)",
         lambda b: "microvm" in b.machines),
    _cap("blockdev-backup.on-cbw-error", "blockdev-backup accepts on-cbw-error",
         lambda b: "on-cbw-error" in b.schema.command_args("blockdev-backup")),
    _cap("blockdev-backup.x-perf", "blockdev-backup accepts x-perf (max-chunk)",
         lambda b: "x-perf" in b.schema.command_args("blockdev-backup")),
    _cap("blockdev-backup.auto-finalize",
         "blockdev-backup accepts auto-finalize and auto-dismiss (job-finalize, job-dismiss)",
         lambda b: {"auto-finalize", "auto-dismiss"} <= b.schema.command_args("blockdev-backup")),
    _cap("blockdev-backup.bitmap-mode", "blockdev-backup accepts bitmap and bitmap-mode",
         lambda b: {"bitmap", "bitmap-mode"} <= b.schema.command_args("blockdev-backup")),
    _cap("blockdev-backup.discard-source",
         "blockdev-backup accepts discard-source (discard on the source what was copied)",
         lambda b: "discard-source" in b.schema.command_args("blockdev-backup")),
    _cap("drive-backup", "the drive-backup command (BackupCommon with a target file)",
         lambda b: b.schema.has_command("drive-backup")),
    _cap("copy-before-write.min-cluster-size",
         "the copy-before-write driver has min-cluster-size",
         lambda b: "min-cluster-size" in b.schema.driver_options("copy-before-write")),
    _cap("transaction.completion-mode",
         "transaction accepts properties (completion-mode grouped)",
         lambda b: "properties" in b.schema.command_args("transaction")),
    _cap("copy-before-write", "the copy-before-write block driver",
         lambda b: "copy-before-write" in b.schema.block_drivers()),
    _cap("copy-before-write.on-cbw-error", "the copy-before-write driver has on-cbw-error",
         lambda b: "on-cbw-error" in b.schema.driver_options("copy-before-write")),
    _cap("copy-before-write.cbw-timeout", "the copy-before-write driver has cbw-timeout",
         lambda b: "cbw-timeout" in b.schema.driver_options("copy-before-write")),
    _cap("snapshot-access", "the snapshot-access block driver",
         lambda b: "snapshot-access" in b.schema.block_drivers()),
    _cap("blkdebug", "the blkdebug block driver",
         lambda b: "blkdebug" in b.schema.block_drivers()),
    _cap("throttle", "the throttle block driver with throttle-group objects",
         lambda b: "throttle" in b.schema.block_drivers()),
    _cap("accel.tcg", "the TCG accelerator", lambda b: "tcg" in b.accelerators),
    _cap("nbd.abstract-unix-socket",
         "an NBD server (nbd-server-start, with block-export-add or nbd-server-add) and "
         "client (the nbd block driver) on an abstract unix socket",
         lambda b: _nbd_on_abstract_socket(b.schema)),
    _cap("event.BLOCK_IO_ERROR.qom-path", "BLOCK_IO_ERROR names the device by qom-path",
         lambda b: "qom-path" in b.schema.event_members("BLOCK_IO_ERROR")),
]}


@dataclass
class BuildInfo:
    """A probed build: what the header shows and what capability checks read."""

    build: QemuBuild
    version: str
    package: str
    accelerators: list[str]
    schema: Schema
    tool_versions: dict[str, str] = field(default_factory=dict)
    machines: list[str] = field(default_factory=list)  # machine types and their aliases

    @property
    def version_tuple(self) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", self.version)[:3])

    def mixed_versions(self) -> str | None:
        """One line naming each binary's origin and version when their versions differ."""
        versions = {tool: version_of(line) for tool, line in self.tool_versions.items()}
        if len(set(versions.values())) <= 1:
            return None
        return "binaries of different QEMU versions: " + ", ".join(
            f"{tool} {version} ({self.build.origin.get(tool, '?')})"
            for tool, version in versions.items())

    def has(self, capability: str) -> bool:
        return self._capability(capability).check(self)

    def require(self, capability: str) -> None:
        cap = self._capability(capability)
        if not cap.check(self):
            raise MissingCapability(f"build lacks capability {cap.name!r}: "
                                    f"{cap.description} (QEMU {self.version})")

    @staticmethod
    def _capability(name: str) -> Capability:
        try:
            return CAPABILITIES[name]
        except KeyError:
            raise ConfigError(f"unknown capability {name!r}; known: "
                              f"{', '.join(sorted(CAPABILITIES))}") from None

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "package": self.package,
                "accelerators": self.accelerators, "schema": self.schema.entries,
                "tool_versions": self.tool_versions, "machines": self.machines}

    @classmethod
    def from_json(cls, build: QemuBuild, data: dict[str, Any]) -> BuildInfo:
        return cls(build, data["version"], data["package"], data["accelerators"],
                   Schema(data["schema"]), data.get("tool_versions", {}), data["machines"])


# What each tool's ``--version`` says first: "QEMU emulator version 11.1.3 (...)",
# "qemu-img version 11.1.3 (...)", "qemu-io version 11.1.3 (...)".
_VERSION_LINE = {"qemu-system-x86_64": re.compile(r"^QEMU emulator version (\S+)"),
                 "qemu-img": re.compile(r"^qemu-img version (\S+)"),
                 "qemu-io": re.compile(r"^qemu-io version (\S+)")}


def tool_version(tool: str, binary: Path, origin: str = "") -> str:
    """The first line of ``binary --version``; a one-line ConfigError unless it is
    ``tool`` of some QEMU."""
    where = f"{binary}" + (f" ({origin})" if origin else "")
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                             timeout=30, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"{where} --version did not answer within 30 s: "
                          f"not a working {tool}") from None
    except OSError as exc:
        raise ConfigError(f"{where} does not run ({exc.strerror}); pass a working {tool}"
                          ) from None
    lines = (out.stdout or out.stderr).strip().splitlines()
    first = lines[0].strip() if lines else ""
    if out.returncode != 0 or not _VERSION_LINE[tool].match(first):
        said = f"its --version said {first[:80]!r}" if first else "its --version printed nothing"
        raise ConfigError(f"{where} is not a QEMU binary ({said}); pass QEMU's {tool}")
    return first


def version_of(first_line: str) -> str:
    """'11.1.3' from a --version first line."""
    m = re.search(r"version (\S+)", first_line)
    return m.group(1) if m else "?"


def accelerators(qemu_system: Path) -> list[str]:
    try:
        out = subprocess.run([str(qemu_system), "-accel", "help"], capture_output=True,
                             text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"{qemu_system} -accel help failed ({exc}); pass a working "
                          "qemu-system-x86_64") from None
    return [line.strip() for line in out.stdout.splitlines()[1:] if line.strip()]


# Bump when the probe asks new questions or BuildInfo's JSON changes.
PROBE_FORMAT = 2
PROBES_KEPT = 100  # the probe cache's newest entries (each ~0.3 MB of schema)


def probe(build: QemuBuild) -> BuildInfo:
    """What the build has: asked of it once per set of binaries, then read from the cache.

    Every pytest process of a run shares one probe already; the cache serves the
    self-tests' and bisect's many short runs of the same build (0.4 s each).  Its key is
    each binary's identity on disk (path, inode, size, times, and the same for its
    resolved path), so a rebuilt or re-provisioned QEMU is probed again; a probe that
    fails is never cached."""
    key = _cache_key(build)
    entry = cache_root() / "probes" / f"{key}.json" if key else None
    if entry is not None:
        try:
            info = BuildInfo.from_json(build, json.loads(entry.read_text()))
            os.utime(entry)  # recently used: kept by the pruning below
            return info
        except (OSError, ValueError, KeyError, TypeError):
            pass  # absent or unreadable: probe again
    info = _probe(build)
    if entry is not None:
        _store(entry, info)
    return info


def _cache_key(build: QemuBuild) -> str | None:
    ident: list[object] = [PROBE_FORMAT]
    for path in (build.qemu_system, build.qemu_img, build.qemu_io):
        for p in (Path(path), Path(path).resolve()):
            try:
                st = p.stat()
            except OSError:
                return None  # the probe itself says what is wrong with it
            ident.append([str(p), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:32]


def _store(entry: Path, info: BuildInfo) -> None:
    """Write atomically (xdist workers and parallel runs may probe at once), then keep
    the PROBES_KEPT newest; a cache that cannot be written is only slower."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(info.to_json()))
        tmp.rename(entry)
        entries = sorted(entry.parent.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for old in entries[:-PROBES_KEPT]:
            old.unlink(missing_ok=True)
    except OSError:
        pass


def _probe(build: QemuBuild) -> BuildInfo:
    """Start the build once (no guest) and ask it what it has."""
    from .machine import Machine  # machine imports builds; keep probe importable alone

    tool_versions = {tool: tool_version(tool, path, build.origin.get(tool, "")) for tool, path
                     in [("qemu-system-x86_64", build.qemu_system),
                         ("qemu-img", build.qemu_img), ("qemu-io", build.qemu_io)]}
    accels = accelerators(build.qemu_system)
    if "tcg" not in accels:
        raise ConfigError(f"{build.qemu_system} has no TCG accelerator (has: {', '.join(accels)}); "
                          "the harness runs guests under TCG: build QEMU with TCG")
    with tempfile.TemporaryDirectory(prefix="cbw-probe-") as tmp:
        vm = Machine(build, Path(tmp), name="probe", machine_type="none")
        try:
            vm.launch()
            schema = vm.cmd("query-qmp-schema")
            version = vm.cmd("query-version")
            machines = sorted({name for m in vm.cmd("query-machines")
                               for name in (m["name"], m.get("alias")) if name})
        except HarnessError as exc:
            raise ConfigError(f"{build.qemu_system} failed its probe: {exc}") from None
        finally:
            vm.shutdown()
    q = version["qemu"]
    return BuildInfo(build, f"{q['major']}.{q['minor']}.{q['micro']}",
                     version.get("package", "").strip(), accels, Schema(schema), tool_versions,
                     machines)


def save(info: BuildInfo, path: Path) -> None:
    path.write_text(json.dumps(info.to_json()))


def load(build: QemuBuild, path: Path) -> BuildInfo:
    return BuildInfo.from_json(build, json.loads(path.read_text()))
