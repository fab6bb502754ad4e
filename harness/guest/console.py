"""The protocol with the guest's init: the I/O plan out, typed results back.

Out: a list of operations (:class:`Read`, :class:`Write`) becomes the ``cbw.ops=``
kernel parameter (:func:`guest_cmdline`), in a compact syntax (one letter per kind,
the device without ``/dev/``: the command line holds 2047 bytes, and a boot serves
a dozen disks of six operations each).
Back: the serial console log becomes a :class:`GuestReport` (:func:`parse_console`),
so tests never grep raw console text.  The line formats are documented in init.sh.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..errors import ConfigError, HarnessError
from .kernel import GuestKernel

# x86's COMMAND_LINE_SIZE is 2048 including the terminating NUL.
MAX_CMDLINE = 2047
# O_DIRECT needs offsets and lengths aligned to the logical block size.
DIRECT_ALIGN = 512
# Boot options that cut TCG boot time without changing block-layer behaviour.
# Measured under TCG: acpi=off saves ~0.3 s (init then ends with a reset, see
# qemu_guest_args), skipping the jitter-entropy self-test ~0.1 s.
FAST_BOOT = ("mitigations=off", "nokaslr", "acpi=off", "initcall_blacklist=jent_mod_init",
             "i8042.noaux", "i8042.nokbd", "i8042.nopnp", "8250.nr_uarts=1",
             "cryptomgr.notests", "random.trust_cpu=on")
_DEVICE = re.compile(r"^/dev/[A-Za-z0-9_/-]+$")


class GuestError(HarnessError):
    """The guest's console log is not a valid report (no boot, garbage, panic)."""

    def __init__(self, message: str, log: str = ""):
        self.message = message
        self.log = log
        super().__init__(message)

    def __str__(self) -> str:
        if not self.log:
            return self.message
        lines = self.log.replace("\r", "").rstrip().splitlines()
        shown = lines[-80:]
        cut = f" (last {len(shown)} of {len(lines)} lines)" if len(lines) > len(shown) else ""
        return f"{self.message}\nguest console log{cut}:\n  " + "\n  ".join(shown)


# ------------------------------------------------------------------ plan (host -> guest)

@dataclass(frozen=True)
class Read:
    """Read ``length`` bytes at ``offset`` of ``device`` with O_DIRECT (from the disk, not cache).

    The guest keeps the data in RAM to digest it: keep ``length`` to a few MiB.
    """

    device: str
    offset: int
    length: int

    def token(self) -> str:
        """This operation in ``cbw.ops`` syntax."""
        _check_io(self.device, self.offset, self.length, direct=True)
        return f"r:{_short(self.device)}:{self.offset}:{self.length}"


@dataclass(frozen=True)
class Write:
    """Write ``length`` bytes equal to ``pattern`` at ``offset``.

    ``mode="direct"``: one O_DIRECT write (dd oflag=direct);
    ``mode="fsync"``: a buffered write then fsync (dd conv=fsync).
    """

    device: str
    offset: int
    length: int
    pattern: int
    mode: Literal["direct", "fsync"] = "direct"

    def token(self) -> str:
        """This operation in ``cbw.ops`` syntax."""
        _check_io(self.device, self.offset, self.length, direct=self.mode == "direct")
        if not 0 <= self.pattern <= 0xFF:
            raise ConfigError(f"write pattern {self.pattern!r} is not a byte: use 0..255")
        if self.mode not in ("direct", "fsync"):
            raise ConfigError(f"write mode {self.mode!r} is unknown: use 'direct' or 'fsync'")
        kind = "w" if self.mode == "direct" else "f"
        return f"{kind}:{_short(self.device)}:{self.offset}:{self.length}:{self.pattern:02x}"


Op = Read | Write


def _check_io(device: str, offset: int, length: int, direct: bool) -> None:
    if not _DEVICE.match(device):
        raise ConfigError(f"guest device {device!r} is not a /dev path of letters, digits, _ - /")
    if not (isinstance(offset, int) and isinstance(length, int) and offset >= 0 and length > 0):
        raise ConfigError(f"I/O on {device} at {offset!r} length {length!r}: use whole bytes, "
                          "offset >= 0 and length > 0")
    if direct and (offset % DIRECT_ALIGN or length % DIRECT_ALIGN):
        raise ConfigError(f"O_DIRECT I/O on {device} at {offset} length {length}: align both to "
                          f"{DIRECT_ALIGN} bytes, or use Write(mode='fsync')")


def _short(device: str) -> str:
    """A device as ``cbw.ops`` names it: without ``/dev/`` (init puts it back)."""
    return device.removeprefix("/dev/")


def format_ops(ops: Sequence[Op]) -> str:
    """The value of the ``cbw.ops`` kernel parameter for ``ops``: comma-separated
    ``r:DEV:OFF:LEN`` (read), ``w:DEV:OFF:LEN:HEX`` (O_DIRECT write of the byte HEX),
    ``f:DEV:OFF:LEN:HEX`` (buffered write + fsync); DEV is the path under ``/dev/``,
    OFF and LEN are bytes.  The guest reports each as ``op=read|write|fsyncwrite
    dev=/dev/DEV`` (init.sh)."""
    return ",".join(op.token() for op in ops)


def parse_ops(value: str) -> list[Op]:
    """Inverse of :func:`format_ops`."""
    ops: list[Op] = []
    for token in filter(None, value.split(",")):
        kind, *args = token.split(":")
        try:
            if kind == "r" and len(args) == 3:
                ops.append(Read("/dev/" + args[0], int(args[1]), int(args[2])))
            elif kind in ("w", "f") and len(args) == 4:
                ops.append(Write("/dev/" + args[0], int(args[1]), int(args[2]),
                                 int(args[3], 16), "direct" if kind == "w" else "fsync"))
            else:
                raise ValueError(token)
        except ValueError:
            raise ConfigError(f"bad guest operation {token!r} in cbw.ops") from None
    return ops


def guest_cmdline(ops: Sequence[Op], console: str = "ttyS0", *, disk_wait: int = 10,
                  verbose: bool = False, extra: Sequence[str] = ()) -> str:
    """The kernel command line that makes the guest run ``ops`` and report on ``console``.

    The console shows only kernel emergencies (panics) unless ``verbose``; the other
    kernel messages logged during the plan come back as ``CBW-KMSG`` lines.
    """
    parts = [f"console={console}", "loglevel=7" if verbose else "loglevel=1",
             "panic=-1",  # reboot at once on panic; with -no-reboot QEMU exits
             *FAST_BOOT, f"cbw.wait={int(disk_wait)}", *extra]
    if ops:
        parts.append(f"cbw.ops={format_ops(ops)}")
    line = " ".join(parts)
    if len(line) > MAX_CMDLINE:
        raise ConfigError(f"guest kernel command line is {len(line)} bytes, over x86's "
                          f"{MAX_CMDLINE}: split the plan over fewer operations per boot")
    return line


def qemu_guest_args(kernel: GuestKernel, initramfs: Path, cmdline: str,
                    serial: str | None = "stdio") -> list[str]:
    """QEMU options that boot the guest (direct kernel boot) with its console on ``serial``
    (None: no ``-serial``, for ``Machine(console=True)``, which adds its own).

    ``-no-reboot`` is essential: the guest ends by resetting (no ACPI to power off
    with) and panics reset too (``panic=-1``); it makes QEMU exit instead of
    booting the guest again.  QEMU then reports a SHUTDOWN event, reason guest-reset.
    """
    return ["-kernel", str(kernel.boot_image), "-initrd", str(initramfs), "-append", cmdline,
            *(["-serial", serial] if serial is not None else []), "-no-reboot"]


def pattern_md5(pattern: int, length: int) -> str:
    """md5 of ``length`` bytes equal to ``pattern``: what a :class:`GuestOp` read of it reports."""
    return hashlib.md5(bytes([pattern]) * length).hexdigest()


# --------------------------------------------------------------- report (guest -> host)

@dataclass(frozen=True)
class KernelMessage:
    """A kernel log record forwarded by the guest (``CBW-KMSG``).

    ``op`` is the index of the operation during which it was logged: the guest marks
    the end of each operation in the kernel log and cuts the log at those marks
    (init.sh, kmsg.awk); -1 for an error logged during boot.
    """

    op: int
    level: int
    time: float
    text: str


@dataclass(frozen=True)
class GuestOp:
    """The outcome of one planned operation (``CBW-RESULT``)."""

    index: int
    op: str                      # read | write | fsyncwrite
    device: str                  # the disk's path in the guest
    offset: int
    length: int
    rc: int                      # exit status of the guest command
    errno_text: str              # e.g. "Input/output error"; "" on success
    message: str                 # the guest command's whole error output
    start: float                 # guest uptime (s, 10 ms resolution)
    end: float
    pattern: int | None = None   # writes: the byte written
    got: int | None = None       # reads: bytes actually read
    md5: str | None = None       # reads: md5 of the bytes read
    head: bytes | None = None    # reads: the first 16 bytes read
    fill: int | None = None      # reads: the byte every read byte equals, if uniform

    @property
    def ok(self) -> bool:
        """True if the operation succeeded."""
        return self.rc == 0


IO_ERROR = re.compile(r"I/O error|critical (medium|target) error|Medium Error|"
                      r"failed command|tag#\d+ FAILED|Sense Key|error, dev ", re.I)


@dataclass
class GuestReport:
    """Everything the guest reported on its console, typed."""

    ready: bool
    ready_time: float | None
    done: bool
    ops: list[GuestOp]
    kmsg: list[KernelMessage]
    panic: str | None
    module_failures: list[str]
    missing_devices: list[str]
    log: str = field(repr=False)
    # CBW-KLOST: the guest's kernel log overwrote records before the guest read them;
    # the records up to the end of each of these operations were not attributed.
    kmsg_lost: list[int] = field(default_factory=list)

    @property
    def io_errors(self) -> list[KernelMessage]:
        """Forwarded kernel messages about failed block I/O."""
        return [m for m in self.kmsg if IO_ERROR.search(m.text)]

    def kmsg_during(self, op: GuestOp | int) -> list[KernelMessage]:
        """Kernel messages logged while ``op`` (or the op of that index) ran."""
        index = op if isinstance(op, int) else op.index
        return [m for m in self.kmsg if m.op == index]

    @property
    def boot_errors(self) -> list[KernelMessage]:
        """Kernel errors logged before the plan started (e.g. a partition scan that failed)."""
        return self.kmsg_during(-1)

    def check(self) -> GuestReport:
        """Raise :class:`GuestError` unless the guest ran its whole plan cleanly; return self."""
        if self.panic:
            raise GuestError(f"guest kernel panicked: {self.panic}", self.log)
        if self.module_failures:
            raise GuestError(f"guest could not load modules: {'; '.join(self.module_failures)}",
                             self.log)
        if self.missing_devices:
            raise GuestError(f"guest disks never appeared: {' '.join(self.missing_devices)} "
                             "(wrong disk kind for the loaded modules, or wrong device path?)",
                             self.log)
        if not self.done:
            raise GuestError(f"guest stopped after {len(self.ops)} operations without CBW-DONE "
                             "(hung I/O, or QEMU ended early; the guest prints the kernel "
                             "messages of its operations after the last one)", self.log)
        if self.kmsg_lost:
            raise GuestError("the guest kernel's log overwrote messages before they were read "
                             f"(those up to the end of operation {self.kmsg_lost[-1]}): plan "
                             "fewer operations per boot, or add log_buf_len=4M to its command "
                             "line", self.log)
        return self


_LINE = re.compile(r"CBW-(READY|RESULT|KMSG|KLOST|DONE|MODFAIL|NODEV)\b ?(.*)$")
_FIELD = re.compile(r'(\w+)=("[^"]*"|\S*)')
_PANIC = re.compile(r"Kernel panic - not syncing.*")


def parse_console(text: str) -> GuestReport:
    """Parse the guest's console log.

    Raises :class:`GuestError` (carrying the log) if the guest never got ready or a
    protocol line is malformed.  A report of a plan cut short is returned as is;
    call :meth:`GuestReport.check` to demand a complete, clean run.
    """
    report = GuestReport(False, None, False, [], [], None, [], [], text)
    panic = _PANIC.search(text)
    report.panic = panic.group(0).strip() if panic else None
    for raw in text.replace("\r", "").splitlines():
        m = _LINE.search(raw)
        if m:
            try:
                _take(report, m.group(1), m.group(2))
            except (KeyError, ValueError) as e:
                raise GuestError(f"malformed guest line ({e}): {raw.strip()!r}", text) from None
    if not report.ready:
        why = f"its kernel panicked: {report.panic}" if report.panic else \
            "no CBW-READY line (not booted, wrong kernel/initrd/console, or garbage on the console)"
        raise GuestError(f"guest never got ready: {why}", text)
    return report


def _take(report: GuestReport, kind: str, rest: str) -> None:
    if kind == "KMSG":
        m = re.fullmatch(r"i=(-?\d+) lvl=(\d) t=([\d.]+) ?(.*)", rest)
        if m is None:
            raise ValueError("bad CBW-KMSG fields")
        report.kmsg.append(KernelMessage(int(m[1]), int(m[2]), float(m[3]), m[4]))
        return
    f = {k: v[1:-1] if v.startswith('"') else v for k, v in _FIELD.findall(rest)}
    if kind == "READY":
        report.ready, report.ready_time = True, float(f["t"])
    elif kind == "DONE":
        report.done = True
    elif kind == "MODFAIL":
        report.module_failures.append(f"{f['module']}: {f.get('err', '')}")
    elif kind == "NODEV":
        report.missing_devices.append(f["dev"])
    elif kind == "KLOST":
        report.kmsg_lost.append(int(f["i"]))
    elif kind == "RESULT":
        op = _result(f)
        if op.index != len(report.ops):
            raise ValueError(f"operation {op.index} reported after {len(report.ops)} others")
        report.ops.append(op)


def _uniform_fill(got: int, md5: str | None, head: bytes | None) -> int | None:
    """The byte every one of ``got`` bytes read equals, if they are uniform: the first
    byte, when the md5 of ``got`` copies of it is the read's md5."""
    if not got or not head or md5 is None:
        return None
    return head[0] if pattern_md5(head[0], got) == md5 else None


def _result(f: dict[str, str]) -> GuestOp:
    is_read = f["op"] == "read"
    head_hex = f.get("head")
    head = bytes.fromhex(head_hex) if is_read and head_hex is not None else None
    got = int(f["got"]) if is_read else None
    md5 = f.get("md5") if is_read else None
    fill = f.get("fill")  # older guests said it; now derived from md5
    return GuestOp(
        index=int(f["i"]), op=f["op"], device=f["dev"], offset=int(f["off"]),
        length=int(f["len"]), rc=int(f["rc"]), errno_text=f.get("err", ""),
        message=f.get("msg", ""), start=float(f["t0"]), end=float(f["t1"]),
        pattern=int(f["pat"], 16) if "pat" in f else None,
        got=got, md5=md5, head=head,
        fill=(None if not is_read else _uniform_fill(got or 0, md5, head) if fill is None
              else int(fill, 16) if fill != "-" else None),
    )
