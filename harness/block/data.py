"""The data of a copy-before-write run: image size, patterns, the regions written and not.

Images are raw so that a blkdebug ``sector`` is the guest offset: fault rules hit the
copy-before-write of the guest-written regions only.  The source is filled with
:data:`ORIGINAL`; the guest writes :data:`NEW` (one :data:`CHUNK` each) at
:data:`GUEST_WRITES`; :data:`UNTOUCHED` regions are never written.
"""

from __future__ import annotations

KiB = 1024
MiB = 1024 * KiB
IMAGE_SIZE = 4 * MiB
CHUNK = 64 * KiB
ORIGINAL = 0xAA
NEW = 0x55
GUEST_WRITES: tuple[int, ...] = (1 * MiB, 2 * MiB)
UNTOUCHED: tuple[int, ...] = (0, 3 * MiB)


def first_difference(a: bytes | bytearray, b: bytes | bytearray) -> int | None:
    """The offset of the first byte in which ``a`` and ``b`` differ (the shorter one's
    length if one is the other's start); None if they are equal.

    Each step compares whole slices (one ``memcmp``), halving the range that holds the
    first difference, so a few MiB cost milliseconds, not a loop over every byte.
    """
    if a == b:
        return None
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi  # one is the other's start
    while hi - lo > 64:  # the first difference lies in [lo, hi)
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return next(i for i in range(lo, hi) if a[i] != b[i])
