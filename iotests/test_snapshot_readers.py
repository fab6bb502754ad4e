"""The fleecing snapshot's other readers, and discards of it: byte for byte.

test_request_shapes.py reads the snapshot-access node directly with each shape of
read.  Here the same snapshot (fleecing layout, seeded source, the same guest
history: the clusters at 1 MiB and 2 MiB copied, the rest not) is read

* over NBD (the node exported read-only, the build's ``qemu-io -r`` as the client):
  every shape of :data:`READ_SHAPES` (aligned, unaligned, inside one cluster, larger
  than one, spanning copied and not-yet-copied clusters), one connection each;
* by a push backup (``blockdev-backup`` sync=full from the snapshot-access node): a
  job reads whole clusters only, so its shapes are its chunk: one cluster per read
  (``x-perf`` max-chunk 64 KiB) or its default chunk, larger than a cluster, whose
  reads go from copied clusters on into uncopied ones.  The backup, read as soon as
  BLOCK_JOB_COMPLETED comes, is the point-in-time image.

A read that starts in a copied cluster and goes on into an uncopied one is the
recorded departure ``snapshot-read-leaving-copied-cluster`` of direct reads on builds
before 10.0; neither reader here meets it there: QEMU's NBD server (structured reads)
and block-copy split their reads where the node's block status changes, i.e. at the
edge of a copied cluster.

Discards of the snapshot (what copy-before-write.c does for a discard on the
snapshot-access node, which the fleecing scheme uses to free the temporary image;
``blockdev-backup`` ``discard-source``, QAPI: "Discard blocks on source which have
already been copied to the target", since 9.1): only whole block-copy clusters are
discarded (an unaligned discard shrinks to the clusters it covers); a discarded
cluster is no longer part of the snapshot: reads of it fail (EACCES), the guest's
writes to it are not copied any more, and its space in the temporary image is
freed; the rest of the snapshot reads as before.  Builds before 9.1 abort on an
unaligned discard (departure ``snapshot-discard-unaligned-aborts``).
"""

from __future__ import annotations

import pytest

from harness.block.nbd import NbdExport
from harness.plugin.rows import CaseRow
from harness.scenarios.cbw import NEW, NO_FAULT, MiB, Scenario
from iotests.expectations import BROKEN_SNAPSHOT_ERROR, assert_same_bytes, errno_text
from iotests.test_request_shapes import (
    CLUSTER,
    HISTORY,
    LEAVING_A_COPIED_CLUSTER,
    READ_SHAPES,
    PointInTime,
    fleecing,
    run_requests,
)

pytestmark = pytest.mark.requires("copy-before-write.on-cbw-error", "snapshot-access")
NBD = pytest.mark.requires("nbd.abstract-unix-socket")
SNAPSHOT_GONE = errno_text(BROKEN_SNAPSHOT_ERROR)  # a discarded region's reads fail so
IMAGE_CLUSTERS = range(4 * MiB // CLUSTER)


def after_history(scenario) -> tuple[Scenario, PointInTime]:
    """The fleecing snapshot, no fault, after the guest's :data:`HISTORY`."""
    s, model = fleecing(scenario, None, NO_FAULT)
    assert run_requests(s, model, HISTORY) == []
    return s, model


@NBD
def test_nbd_client_reads(scenario, images, build_info, case_row):
    row = case_row("nbd-read-shapes", "every read shape, after writes at 1 MiB and 2 MiB")
    s, model = after_history(scenario)
    assert s.vm is not None
    export = NbdExport(s.vm, build_info, images, s.transcript, node=s.topology.snapshot_node)
    export.start()
    reads = {}
    for name, (offset, length) in (READ_SHAPES | LEAVING_A_COPIED_CLUSTER).items():
        result, data = export.read_data(offset, length)
        reads[name] = (offset, result, data)
    row.saw_each("NBD reads", {name: r.error or d == model.original[o:o + len(d or b"")]
                               for name, (o, r, d) in reads.items()})
    export.stop()
    s.stop()
    for name, (offset, result, data) in reads.items():
        what = f"NBD read {name} at {offset}+{len(data or b'')}"
        assert data is not None, f"{what}: {result.output}"
        assert_same_bytes(what, data, model.original[offset:offset + len(data)], offset)


def push_backup(s: Scenario, row: CaseRow, **extra: object) -> None:
    """Add the backup node, run the push backup at full speed, wait for its end: it
    must complete."""
    s.images.create(s.topology.image("backup").name, 4 * MiB, "raw")
    s.cmd("blockdev-add", s.topology.raw_node("backup"))
    s.cmd("blockdev-backup", {**s.topology.push_backup_args(), **extra})
    assert s.vm is not None
    end = s.vm.wait_event("BLOCK_JOB_COMPLETED", {"device": s.topology.job})
    s.transcript.event(end)
    row.job_ended(end)
    assert row.job == "completed", f"the push backup: {end['data']}"


def check_backup(s: Scenario, row: CaseRow, model: PointInTime, what: str) -> None:
    """The backup, read at once (QEMU still runs), is the point-in-time image."""
    backup = s.images.read_raw(s.topology.image("backup"))
    row.saw("backup", backup == model.original)
    assert_same_bytes(f"{what}, read when BLOCK_JOB_COMPLETED came", backup, model.original)


@pytest.mark.requires("blockdev-backup.x-perf")
@pytest.mark.parametrize("chunk", [pytest.param(CLUSTER, id="one-cluster-per-read"),
                                   pytest.param(None, id="default-chunk-larger-than-a-cluster")])
def test_push_backup_reads(scenario, case_row, chunk):
    row = case_row("push-read-shapes", f"max-chunk {chunk // 1024} KiB" if chunk
                   else "default chunk")
    s, model = after_history(scenario)
    push_backup(s, row, **({"x-perf": {"max-chunk": chunk}} if chunk else {}))
    check_backup(s, row, model, "the push backup")
    s.stop()


def discarded_clusters(offset: int, length: int) -> range:
    """The block-copy clusters a discard of the snapshot covers whole."""
    return range(-(-offset // CLUSTER), (offset + length) // CLUSTER)


DISCARDS = [
    pytest.param(MiB, 2 * CLUSTER, id="aligned"),
    pytest.param(MiB - 1000, 2 * CLUSTER + 2000, id="unaligned",
                 marks=pytest.mark.departure("snapshot-discard-unaligned-aborts")),
]


@pytest.mark.parametrize("offset,length", DISCARDS)
def test_discard_on_the_snapshot(scenario, case_row, offset, length):
    """After the history (cluster 16 copied), discard around clusters 16 and 17, then
    the guest writes to 17 (discarded) and 18 (not, but touched by the unaligned one)."""
    row = case_row("snapshot-discard", "aligned" if offset % CLUSTER == 0 else "unaligned")
    s, model = after_history(scenario)
    gone = discarded_clusters(offset, length)
    assert list(gone) == [16, 17]
    assert s.vm is not None
    result = s.vm.qemu_io(s.topology.snapshot_node, f"discard {offset} {length}", device=False)
    s.transcript.log(f"snapshot discard at {offset}+{length}: {result.output}")
    row.saw("discard", result.error or "ok")
    assert result.ok, f"discard on the snapshot-access node: {result.output}"
    for c in (17, 18):
        request = f"write -P {NEW:#x} {c * CLUSTER} {CLUSTER}"
        row.guest(request, s.guest_request(request))
    assert all(e is None for e in row.requests.values()), f"guest writes: {row.requests}"
    reads = {c: s.read_snapshot_data(c * CLUSTER, CLUSTER) for c in (15, 16, 17, 18, 19)}
    row.saw("discarded", "/".join(sorted({r.error or "data" for c, (r, _) in reads.items()
                                           if c in gone})))
    row.saw_each("kept", {str(c): r.error or d == model.original[c * CLUSTER:(c + 1) * CLUSTER]
                          for c, (r, d) in reads.items() if c not in gone})
    for c, (read, data) in reads.items():
        old = model.original[c * CLUSTER:(c + 1) * CLUSTER]
        if c in gone:
            assert read.error == SNAPSHOT_GONE, (
                f"snapshot read of discarded cluster {c}: expected {SNAPSHOT_GONE!r}, "
                f"got {read.error or 'data'}")
        else:
            assert data is not None, f"snapshot read of cluster {c}: {read.output}"
            assert_same_bytes(f"snapshot read of cluster {c} (not discarded)", data, old,
                              c * CLUSTER)
    s.stop()
    target = s.images.read_raw(s.topology.image("target"))
    copied = (18, 32)  # copied before a guest write, not discarded
    wrong = [c for c in IMAGE_CLUSTERS if target[c * CLUSTER:(c + 1) * CLUSTER] !=
             (model.original[c * CLUSTER:(c + 1) * CLUSTER] if c in copied else bytes(CLUSTER))]
    row.saw("target", f"cluster {wrong[0]} wrong" if wrong else "ok")
    for c in wrong[:1]:
        pytest.fail(f"target cluster {c}: " + (
            "the old data was not copied" if c in copied else
            "discarded, its space not freed" if c in gone else "copied though not needed"))


@pytest.mark.requires("blockdev-backup.discard-source")
def test_push_backup_discard_source(scenario, case_row):
    """The push backup discards what it copied: the backup is the point-in-time image,
    the temporary image is freed whole, the snapshot is gone, and later guest writes
    are not copied."""
    row = case_row("discard-source", "push backup with discard-source")
    s, model = after_history(scenario)
    push_backup(s, row, **{"discard-source": True})
    check_backup(s, row, model, "the push backup with discard-source")
    request = f"write -P {NEW:#x} {3 * MiB} {CLUSTER}"
    row.guest(request, s.guest_request(request))
    assert row.requests[request] is None, f"guest write after the backup: {row.requests}"
    reads = {offset: s.read_snapshot_data(offset, CLUSTER)[0] for offset in (MiB, 3 * MiB)}
    row.saw("snapshot", "/".join(sorted({r.error or "data" for r in reads.values()})))
    for offset, read in reads.items():
        assert read.error == SNAPSHOT_GONE, (
            f"snapshot read at {offset} after discard-source: expected {SNAPSHOT_GONE!r}, "
            f"got {read.error or 'data'}")
    s.stop()
    target = s.images.read_raw(s.topology.image("target"))
    row.saw("temp image", "freed" if target == bytes(len(target)) else "holds data")
    assert target == bytes(len(target)), \
        "discard-source: the temporary image still holds data (copied regions not discarded)"
