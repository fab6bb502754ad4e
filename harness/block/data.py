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
