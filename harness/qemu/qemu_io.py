"""What ``qemu-io`` printed, read: the first failure, and which pattern reads held.

The same parsing serves HMP ``qemu-io`` inside QEMU and the standalone tool, whose
outputs are the same text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from .replay import qemu_io_error  # one parser; replay.py stays standard-library only

_PATTERN_FAILED = re.compile(r"Pattern verification failed at offset (\d+)")
# read -v: "00100000:  aa 55 ...  .U..": the offset, then up to 16 bytes in hex.
_DUMP_LINE = re.compile(r"^([0-9a-f]{8,}):  ((?:[0-9a-f]{2} ){1,16})", re.M)
_READ_DONE = re.compile(r"^read \d+/\d+ bytes at offset (\d+)$", re.M)
# The time a completed command took by qemu-io's own clock: "1 ops; 00.61 sec (...)" or,
# from a second on, "1 ops; 0:00:02.00 (...)".  A failed command reports none.
_ELAPSED = re.compile(r"ops; (?:(\d+):(\d+):(\d+\.\d+)|(\d+\.\d+) sec)")


@dataclass(frozen=True)
class QemuIoResult:
    """What a ``qemu-io`` command printed, and whether it failed."""

    command: str
    output: str

    @property
    def error(self) -> str | None:
        """The error text (``Input/output error``) of the first failure line, if any."""
        return qemu_io_error(self.output)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def elapsed(self) -> float | None:
        """Seconds the (completed) command took inside QEMU, by qemu-io's own report."""
        m = _ELAPSED.search(self.output)
        if m is None:
            return None
        if m.group(4) is not None:
            return float(m.group(4))
        return int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))

    def pattern_reads(self, offsets: Iterable[int]) -> dict[int, bool] | None:
        """For ``read -P`` commands at ``offsets``: does each range hold the pattern?
        None if a read did not complete (an I/O error, not a data verdict)."""
        wanted = set(offsets)
        failed = {int(m) for m in _PATTERN_FAILED.findall(self.output)}
        done = {int(m) for m in _READ_DONE.findall(self.output)}
        if done != wanted:
            return None
        return {o: o not in failed for o in sorted(wanted)}

    def dumped(self, offset: int, length: int) -> bytes | None:
        """The bytes a ``read -v offset length`` dumped; None if the dump is not exactly
        that range (the read failed, or its output was cut)."""
        lines = _DUMP_LINE.findall(self.output)
        if not lines:
            return None if length else b""
        data = bytes.fromhex("".join(hex_bytes for _, hex_bytes in lines))
        # Contiguous from offset: every line but the last holds 16 bytes, each at its place.
        full = all(len(h) == 48 for _, h in lines[:-1])
        starts = [int(at, 16) for at, _ in lines]
        if not full or starts != list(range(offset, offset + 16 * len(lines), 16)):
            return None
        return data if len(data) == length else None
