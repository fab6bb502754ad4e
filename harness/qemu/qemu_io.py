"""What ``qemu-io`` printed, read: the first failure, and which pattern reads held.

The same parsing serves HMP ``qemu-io`` inside QEMU and the standalone tool, whose
outputs are the same text.
"""

from __future__ import annotations

import functools
import re
import sys
from array import array
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

    @functools.cached_property  # read often; a read -v's output is a megabyte
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
        return parse_dump(self.output, offset, length)


def abridged(output: str, keep: int = 2048) -> str:
    """``output`` for a log: whole up to ``2 * keep`` characters, else its start and end
    around a line saying how much is left out (a ``read -v`` dump's ten thousand lines;
    QEMU's stdout log keeps them), with any line of the middle that names a failure."""
    if len(output) <= 2 * keep:
        return output
    middle = output[keep:-keep]
    failures = [line for line in middle.splitlines() if "failed" in line or "qemu-io:" in line] \
        if "failed" in middle or "qemu-io:" in middle else []
    return "\n".join([output[:keep], f"[... {len(middle)} characters left out ...]",
                      *failures, output[-keep:]])


def parse_dump(text: str, offset: int, length: int) -> bytes | None:
    """The bytes of the ``read -v offset length`` dump in ``text``; None unless its
    lines hold exactly that range: each line at its offset, 16 bytes a line but the last.

    A dump of a few clusters is ten thousand lines: its full lines are read column by
    column (:func:`_full_dump_lines`), the rest line by line (:func:`_dump_by_lines`).
    """
    full = length // 16
    start = text.find(f"{offset:08x}:  ")
    if full and start >= 0 and (start == 0 or text[start - 1] == "\n"):
        end = start + full * _LINE
        head = _full_dump_lines(text[start:end], offset, full)
        if head is not None:
            # The last, shorter line, and no dump line anywhere else.
            tail = _dump_by_lines(text[:start] + text[end:], offset + 16 * full,
                                  length - 16 * full)
            return None if tail is None else head + tail
    return _dump_by_lines(text, offset, length)


def _dump_by_lines(text: str, offset: int, length: int) -> bytes | None:
    """:func:`parse_dump` by a regular expression over every line (any address width)."""
    lines = _DUMP_LINE.findall(text)
    if not lines:
        return None if length else b""
    data = bytes.fromhex("".join(hex_bytes for _, hex_bytes in lines))
    # Contiguous from offset: every line but the last holds 16 bytes, each at its place.
    full = all(len(h) == 48 for _, h in lines[:-1])
    starts = [int(at, 16) for at, _ in lines]
    if not full or starts != list(range(offset, offset + 16 * len(lines), 16)):
        return None
    return data if len(data) == length else None


# A full dump line: "%08x:  " (8 columns while offsets stay below 4 GiB), 16 x "xx ", a
# space, 16 characters (the bytes as text), a newline.
_LINE = 8 + 3 + 16 * 3 + 1 + 16 + 1
_HEX = range(11, 11 + 16 * 3)
_SEPARATORS = ((8, ":"), *((col, " ") for col in (9, 10, *_HEX[2::3], 11 + 16 * 3)),
               (_LINE - 1, "\n"))
_NOT_DIGITS = (*range(11), *range(11 + 16 * 3, _LINE))


def _full_dump_lines(block: str, offset: int, lines: int) -> bytes | None:
    """The bytes of ``lines`` full dump lines from ``offset`` (``block``: those lines
    exactly, as :data:`_LINE` describes them), or None.  Every check looks at one
    column of all lines at once (a stride of :data:`_LINE`), never at a line."""
    if len(block) != lines * _LINE or offset + 16 * lines > 1 << 32:
        return None
    if any(block[col::_LINE] != char * lines for col, char in _SEPARATORS):
        return None
    # The addresses, as the 8 hex digits of 32-bit big-endian numbers, column by column.
    addresses = array("I", range(offset, offset + 16 * lines, 16))
    if addresses.itemsize != 4:
        return None
    if sys.byteorder == "little":
        addresses.byteswap()
    want = addresses.tobytes().hex()
    if any(block[col::_LINE] != want[col::8] for col in range(8)):
        return None
    try:
        digits = bytearray(block.encode("ascii"))
    except UnicodeEncodeError:
        return None
    blank = b" " * lines
    for col in _NOT_DIGITS:
        digits[col::_LINE] = blank  # only the hex digits of the bytes are left
    try:
        data = bytes.fromhex(digits.decode("ascii"))
    except ValueError:
        return None
    return data if len(data) == 16 * lines else None
