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
freed; the rest of the snapshot reads as before.  Builds before 10.0 abort on an
unaligned discard (departure ``snapshot-discard-unaligned-aborts``).
"""

from __future__ import annotations

import pytest

from harness.block.nbd import NbdExport
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
def test_nbd_client_reads(scenario, images, build_info):
    s, model = after_history(scenario)
    assert s.vm is not None
    export = NbdExport(s.vm, build_info, images, s.transcript, node=s.topology.snapshot_node)
    export.start()
    for name, (offset, length) in (READ_SHAPES | LEAVING_A_COPIED_CLUSTER).items():
        result, data = export.read_data(offset, length)
        assert data is not None, f"NBD read {name} at {offset}+{length}: {result.output}"
        assert_same_bytes(f"NBD read {name} at {offset}+{length}", data,
                          model.original[offset:offset + length], offset)
    export.stop()
    s.stop()


def push_backup(s: Scenario, **extra: object) -> dict[str, object]:
    """Add the backup node, run the push backup at full speed, wait for its end."""
    s.images.create(s.topology.image("backup").name, 4 * MiB, "raw")
    s.cmd("blockdev-add", s.topology.raw_node("backup"))
    s.cmd("blockdev-backup", {**s.topology.push_backup_args(), **extra})
    assert s.vm is not None
    end: dict[str, object] = s.vm.wait_event("BLOCK_JOB_COMPLETED", {"device": s.topology.job})
    s.transcript.event(end)
    return end


@pytest.mark.requires("blockdev-backup.x-perf")
@pytest.mark.parametrize("chunk", [pytest.param(CLUSTER, id="one-cluster-per-read"),
                                   pytest.param(None, id="default-chunk-larger-than-a-cluster")])
def test_push_backup_reads(scenario, chunk):
    s, model = after_history(scenario)
    end = push_backup(s, **({"x-perf": {"max-chunk": chunk}} if chunk else {}))
    assert "error" not in end["data"], end  # type: ignore[operator]
    backup = s.images.read_raw(s.topology.image("backup"))  # at once: QEMU still runs
    assert_same_bytes("the push backup, read when BLOCK_JOB_COMPLETED came", backup,
                      model.original)
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
def test_discard_on_the_snapshot(scenario, offset, length):
    """After the history (cluster 16 copied), discard around clusters 16 and 17, then
    the guest writes to 17 (discarded) and 18 (not, but touched by the unaligned one)."""
    s, model = after_history(scenario)
    gone = discarded_clusters(offset, length)
    assert list(gone) == [16, 17]
    assert s.vm is not None
    result = s.vm.qemu_io(s.topology.snapshot_node, f"discard {offset} {length}", device=False)
    s.transcript.log(f"snapshot discard at {offset}+{length}: {result.output}")
    assert result.ok, f"discard on the snapshot-access node: {result.output}"
    for c in (17, 18):
        write = s.guest_request(f"write -P {NEW:#x} {c * CLUSTER} {CLUSTER}")
        assert write.ok, f"guest write to cluster {c}: {write.output}"
    for c in (15, 16, 17, 18, 19):
        read, data = s.read_snapshot_data(c * CLUSTER, CLUSTER)
        if c in gone:
            assert read.error == SNAPSHOT_GONE, (
                f"snapshot read of discarded cluster {c}: expected {SNAPSHOT_GONE!r}, "
                f"got {read.error or 'data'}")
        else:
            assert data is not None, f"snapshot read of cluster {c}: {read.output}"
            assert_same_bytes(f"snapshot read of cluster {c} (not discarded)", data,
                              model.original[c * CLUSTER:(c + 1) * CLUSTER], c * CLUSTER)
    s.stop()
    target = s.images.read_raw(s.topology.image("target"))
    for c in IMAGE_CLUSTERS:
        held = target[c * CLUSTER:(c + 1) * CLUSTER]
        if c in (18, 32):  # copied before a guest write, not discarded
            assert held == model.original[c * CLUSTER:(c + 1) * CLUSTER], \
                f"target cluster {c}: the old data was not copied"
        else:
            assert held == bytes(CLUSTER), (
                f"target cluster {c}: " + ("discarded, its space not freed" if c in gone
                                           else "copied though not needed"))


@pytest.mark.requires("blockdev-backup.discard-source")
def test_push_backup_discard_source(scenario):
    """The push backup discards what it copied: the backup is the point-in-time image,
    the temporary image is freed whole, the snapshot is gone, and later guest writes
    are not copied."""
    s, model = after_history(scenario)
    end = push_backup(s, **{"discard-source": True})
    assert "error" not in end["data"], end  # type: ignore[operator]
    backup = s.images.read_raw(s.topology.image("backup"))
    assert_same_bytes("the push backup with discard-source", backup, model.original)
    write = s.guest_request(f"write -P {NEW:#x} {3 * MiB} {CLUSTER}")
    assert write.ok, f"guest write after the backup: {write.output}"
    for offset in (MiB, 3 * MiB):
        read, _ = s.read_snapshot_data(offset, CLUSTER)
        assert read.error == SNAPSHOT_GONE, (
            f"snapshot read at {offset} after discard-source: expected {SNAPSHOT_GONE!r}, "
            f"got {read.error or 'data'}")
    s.stop()
    target = s.images.read_raw(s.topology.image("target"))
    assert target == bytes(len(target)), \
        "discard-source: the temporary image still holds data (copied regions not discarded)"
