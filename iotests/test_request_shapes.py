"""Request shapes through a copy-before-write node, and reads of its snapshot, byte for byte.

Fleecing layout (copy-before-write node + snapshot-access, ``-machine none``, the
"guest" is HMP qemu-io on the copy-before-write node), the source filled with seeded
pseudo-random data so that a byte from a wrong offset shows.  The copy-before-write
copies whole block-copy clusters (64 KiB for a raw target, which has no cluster size
of its own) before a request changes any byte of them, once: a cluster already
copied is never copied again, so the target keeps the point-in-time data.

Each case runs a short list of guest requests (writes of every shape, write-zeroes
with and without unmap, discard; every node has discard=unmap) under each
``on-cbw-error`` value, without a fault and with a one-shot fault on the copy's write
of the cluster at 1 MiB to the target (every shape touches that cluster), and
checks against a model of the documented behaviour (:class:`PointInTime`):

* each request's result: under break-guest-write (and omitted) exactly the request
  whose copy met the fault fails, with the fault's error; under break-snapshot it
  succeeds and the snapshot is broken from then on;
* the snapshot's reads: the point-in-time bytes, or EACCES once broken;
* the source afterwards: the requests that succeeded applied, the others not;
* the target afterwards: the old data of every cluster that had to be copied, zeros
  in every cluster no request touched (nothing is copied twice or needlessly); a
  cluster whose copy failed holds zeros or its old data, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from harness.block.data import first_difference
from harness.scenarios.cbw import (
    GUEST_WRITES,
    IMAGE_SIZE,
    NEW,
    NO_FAULT,
    ON_CBW_ERROR_VALUES,
    Fault,
    KiB,
    Layout,
    MiB,
    Scenario,
    value_id,
)
from iotests.expectations import BROKEN_SNAPSHOT_ERROR, assert_same_bytes, errno_text

pytestmark = pytest.mark.requires("copy-before-write.on-cbw-error", "snapshot-access")

CLUSTER = 64 * KiB  # block-copy's cluster size with a raw target
SEED = 0xCB  # the source's seeded data
OTHER = 0x3C  # a second guest pattern, for a rewrite
FAULT_CLUSTER = GUEST_WRITES[0] // CLUSTER  # a one-shot Fault's rule names the sector at 1 MiB

VALUES = pytest.mark.parametrize("on_cbw_error", ON_CBW_ERROR_VALUES, ids=value_id)
# One fault site: the copy's read of the source fails the same way (test_fleecing.py
# covers both sites), and make check has a time budget.
FAULTS = pytest.mark.parametrize("fault", [NO_FAULT, Fault("target-write", once=True)],
                                 ids=lambda f: f.name)


@dataclass(frozen=True)
class Request:
    """One guest request: ``write`` (pattern), ``zero`` (write -z), ``zero-unmap`` (-z -u)."""

    op: str
    offset: int
    length: int
    pattern: int = NEW

    @property
    def command(self) -> str:
        if self.op == "discard":
            return f"discard {self.offset} {self.length}"
        flags = {"write": f"-P {self.pattern:#x}", "zero": "-z", "zero-unmap": "-z -u"}[self.op]
        return f"write {flags} {self.offset} {self.length}"

    @property
    def clusters(self) -> range:
        """The clusters whose old data must be copied before this request."""
        return range(self.offset // CLUSTER, -(-(self.offset + self.length) // CLUSTER))

    def new_bytes(self) -> bytes | None:
        """What the request leaves in its range (None after a discard: the old bytes or
        zeros, as the layers below choose)."""
        if self.op == "discard":
            return None
        return bytes([self.pattern if self.op == "write" else 0]) * self.length


@dataclass
class PointInTime:
    """The documented outcome of guest requests through a copy-before-write node whose
    copy of :data:`FAULT_CLUSTER` meets a one-shot fault (if ``fault.injects``)."""

    original: bytes
    on_cbw_error: str | None
    fault: Fault
    written: list[tuple[int, bytes]] = field(default_factory=list)  # in the source, in order
    copied: set[int] = field(default_factory=set)  # clusters the target must hold
    touched: set[int] = field(default_factory=set)
    discarded: list[range] = field(default_factory=list)  # source bytes: old or zero
    broken: bool = False
    fault_pending: bool = field(init=False)

    def __post_init__(self) -> None:
        self.fault_pending = self.fault.injects

    def expected_source(self) -> bytearray:
        """What the source must hold: the original with the successful writes applied."""
        source = bytearray(self.original)
        for offset, data in self.written:
            source[offset:offset + len(data)] = data
        return source

    def request(self, req: Request) -> str | None:
        """Apply ``req``; the error it must meet (None: it succeeds)."""
        self.touched.update(req.clusters)
        to_copy = set() if self.broken else set(req.clusters) - self.copied
        if self.fault_pending and FAULT_CLUSTER in to_copy:
            self.fault_pending = False
            if self.on_cbw_error != "break-snapshot":
                return errno_text(self.fault.errno)
            self.broken, to_copy = True, set()
        self.copied |= to_copy
        new = req.new_bytes()
        if new is None:
            self.discarded.append(range(req.offset, req.offset + req.length))
        else:
            self.written.append((req.offset, new))
        return None

    def snapshot_read(self, offset: int, length: int) -> bytes | str:
        """The point-in-time bytes, or the error of a broken snapshot."""
        if self.broken:
            return errno_text(BROKEN_SNAPSHOT_ERROR)
        return self.original[offset:offset + length]


@dataclass(frozen=True)
class Shape:
    name: str
    requests: tuple[Request, ...]


WRITE_SHAPES = (
    Shape("sub-cluster", (Request("write", MiB + 4 * KiB, 4 * KiB),)),
    Shape("unaligned", (Request("write", MiB + 1000, 3000),)),
    Shape("sub-sector", (Request("write", MiB + 7, 100),)),
    Shape("straddling-two-clusters", (Request("write", MiB - 4 * KiB, 8 * KiB),)),
    Shape("several-clusters", (Request("write", MiB, 3 * CLUSTER),)),
    Shape("unaligned-several-clusters", (Request("write", MiB - 5000, 140_000),)),
    Shape("rewrite-of-copied-region", (Request("write", MiB, CLUSTER),
                                       Request("write", MiB + 4 * KiB, 8 * KiB, OTHER))),
    Shape("rewrite-overlapping-copied", (Request("write", MiB, 4 * KiB),
                                         Request("write", MiB - 2 * KiB, 2 * CLUSTER, OTHER))),
    Shape("write-zeroes", (Request("zero", MiB + 512, 8 * KiB),)),
    Shape("write-zeroes-unmap", (Request("zero-unmap", MiB, 2 * CLUSTER),)),
    Shape("write-zeroes-unaligned", (Request("zero", MiB - 1000, 5000),)),
    Shape("discard-aligned", (Request("discard", MiB, 2 * CLUSTER),)),
    Shape("discard-unaligned", (Request("discard", MiB - 3000, CLUSTER + 5000),)),
    Shape("discard-sub-cluster", (Request("discard", MiB + 4 * KiB, 4 * KiB),)),
)

# The guest's writes before the snapshot is read: cluster 16 (1 MiB) and 32 (2 MiB)
# are copied (unless the fault stops the first), the rest is not.
HISTORY = (Request("write", MiB + 4 * KiB, 4 * KiB), Request("write", 2 * MiB, CLUSTER))
READ_SHAPES = {
    "aligned-copied-cluster": (MiB, CLUSTER),
    "aligned-uncopied-cluster": (3 * MiB, CLUSTER),
    "unaligned-inside-a-cluster": (MiB + 1000, 3000),
    "sub-sector": (2 * MiB + 7, 100),
    "larger-than-a-cluster-uncopied": (3 * MiB - CLUSTER, 3 * CLUSTER),
    "unaligned-from-uncopied-into-copied": (MiB - 5000, 35_000),
    "aligned-from-uncopied-into-copied": (2 * MiB - CLUSTER, 2 * CLUSTER),
}
# Reads that leave a copied cluster for one not copied: 7.2 reads the whole rest of
# the request from the source (see the departure).
LEAVING_A_COPIED_CLUSTER = {
    "larger-than-a-cluster": (2 * MiB - CLUSTER, 3 * CLUSTER),
    "unaligned-larger-than-a-cluster": (2 * MiB - 333, CLUSTER + 1000),
    "unaligned-spanning-copied-and-not": (MiB - 5000, 80_000),
}

def run_requests(s: Scenario, model: PointInTime, requests: tuple[Request, ...]) -> list[str]:
    """The guest's requests, each checked against the model; the failures seen."""
    failures = []
    for req in requests:
        result = s.guest_request(req.command)
        expected = model.request(req)
        assert result.error == expected, (
            f"guest {req.command}: expected {expected or 'success'}, got {result.output!r}")
        if result.error:
            failures.append(f"guest {req.command}: {result.error}")
    return failures


def check_snapshot_read(s: Scenario, model: PointInTime, offset: int, length: int) -> bool:
    """Read the snapshot at ``offset``; True if the read failed (as it had to)."""
    result, data = s.read_snapshot_data(offset, length)
    expected = model.snapshot_read(offset, length)
    if isinstance(expected, str):
        assert result.error == expected, (
            f"snapshot read at {offset}+{length} of a broken snapshot: expected {expected!r}, "
            f"got {result.error or 'data'}")
        return True
    assert result.ok and data is not None, f"snapshot read at {offset}+{length}: " \
        f"{result.error or 'its dump did not cover the range'}"
    assert_same_bytes(f"snapshot read at {offset}+{length}", data, expected, offset)
    return False


def check_images(s: Scenario, model: PointInTime) -> None:
    """QEMU stopped: the source holds what succeeded; the target the copied clusters."""
    source = bytearray(s.images.read_raw(s.topology.image("source")))
    expected = model.expected_source()
    for r in model.discarded:  # a discarded byte may read as zero: take the model's there
        got, want = source[r.start:r.stop], expected[r.start:r.stop]
        if got != want:
            source[r.start:r.stop] = want if not got.strip(b"\0") else \
                bytes(a if a else b for a, b in zip(got, want, strict=True))
    first = first_difference(source, expected)
    if first is not None:
        pytest.fail(f"source differs from the requests that succeeded, first at {first}")
    target = s.images.read_raw(s.topology.image("target"))
    zeros = bytes(CLUSTER)
    for c in range(IMAGE_SIZE // CLUSTER):
        held = target[c * CLUSTER:(c + 1) * CLUSTER]
        old = model.original[c * CLUSTER:(c + 1) * CLUSTER]
        where = f"target cluster {c} (at {c * CLUSTER})"
        if c in model.copied:
            assert held == old, f"{where}: the old data was not copied before the guest's request"
        elif c in model.touched:
            assert held in (zeros, old), f"{where}: neither the old data nor untouched"
        else:
            assert held == zeros, f"{where}: copied though no request touched it"


def assert_trace(fault: Fault, failures: list[str]) -> None:
    if fault.injects:
        assert failures, "the injected fault left no trace: did blkdebug fire?"
    else:
        assert not failures, f"control run without a fault: {failures}"


def fleecing(scenario, on_cbw_error: str | None, fault: Fault) -> tuple[Scenario, PointInTime]:
    s = scenario(layout=Layout.FLEECING, on_cbw_error=on_cbw_error, fault=fault, seed=SEED,
                 unmap=True)
    s.start()
    return s, PointInTime(s.original_data, on_cbw_error, fault)


@pytest.mark.parametrize("shape", WRITE_SHAPES, ids=lambda shape: shape.name)
@FAULTS
@VALUES
def test_guest_request_shape(scenario, on_cbw_error, fault, shape):
    s, model = fleecing(scenario, on_cbw_error, fault)
    failures = run_requests(s, model, shape.requests)
    first, last = min(model.touched), max(model.touched) + 1
    if check_snapshot_read(s, model, first * CLUSTER, (last - first) * CLUSTER):
        failures.append("snapshot read failed")
    s.stop()
    check_images(s, model)
    assert_trace(fault, failures)


def read_after_history(scenario, on_cbw_error: str | None, fault: Fault, offset: int,
                       length: int) -> None:
    s, model = fleecing(scenario, on_cbw_error, fault)
    failures = run_requests(s, model, HISTORY)
    if check_snapshot_read(s, model, offset, length):
        failures.append("snapshot read failed")
    s.stop()
    assert_trace(fault, failures)


@pytest.mark.parametrize("offset,length", READ_SHAPES.values(), ids=READ_SHAPES.keys())
@FAULTS
@VALUES
def test_snapshot_read_shape(scenario, on_cbw_error, fault, offset, length):
    read_after_history(scenario, on_cbw_error, fault, offset, length)


@pytest.mark.departure("snapshot-read-leaving-copied-cluster")
@pytest.mark.parametrize("offset,length", LEAVING_A_COPIED_CLUSTER.values(),
                         ids=LEAVING_A_COPIED_CLUSTER.keys())
@VALUES
def test_snapshot_read_leaving_a_copied_cluster(scenario, on_cbw_error, offset, length):
    """Without a fault (a fault only keeps a cluster from being copied)."""
    read_after_history(scenario, on_cbw_error, NO_FAULT, offset, length)
