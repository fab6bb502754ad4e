"""Backup modes and image formats: sync=top, qcow2 cluster sizes, a compressed target,
the copy-before-write ``min-cluster-size``, ``drive-backup``.

Each backup runs under ``-machine none``, braked as in the rest of the suite (speed 1,
one chunk, so that the guest's writes meet data the job has not copied), the "guest"
being HMP qemu-io on the job's filter node (``filter-node-name``); then the job is
released and must complete.  Documented (QAPI ``MirrorSyncMode``, ``BackupCommon``,
``BlockdevOptionsCbw``):

* the backup is the point-in-time image, whatever the formats and cluster sizes of
  source and target (block-copy copies whole clusters of the larger of 64 KiB and the
  target's cluster size), also when the target is written ``compress``-ed;
* ``sync=top``: only what the source's top layer allocates is copied; the target,
  over the same backing file, is the point-in-time image (what the top layer did not
  allocate the backing file still holds: nothing to save before a write there);
* ``min-cluster-size``: the copy-before-write copies at least that much, aligned,
  before a guest write (the snapshot reads the same);
* ``drive-backup`` (where the build still has it) is a backup like blockdev-backup,
  to a target file it opens itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from harness.block.images import Images
from harness.block.topology import Layout, Topology
from harness.plugin.rows import CaseRow
from harness.qemu.machine import Machine
from harness.scenarios.cbw import CHUNK, IMAGE_SIZE, NEW, ORIGINAL, KiB, MiB
from iotests.expectations import assert_same_bytes

pytestmark = pytest.mark.requires("blockdev-backup.x-perf")

TOP = 0x5A  # the top layer's data (sync=top)
SEED = 0xF0
TOP_CLUSTERS = (0, 2 * MiB, 3 * MiB)  # what sync=top's source allocates in its top layer
# Guest writes while the job is braked: a sub-cluster write, and one whole cluster.
GUEST_WRITES = ((MiB + 4 * KiB, 4 * KiB), (3 * MiB, CHUNK))


def launch(launch_vm, topology: Topology, roles: tuple[str, ...] = ("source", "target")
           ) -> Machine:
    args: list[str] = []
    for role in roles:
        args += ["-blockdev", json.dumps(topology.raw_node(role))]
    vm: Machine = launch_vm(args, machine_type="none")
    return vm


def braked_backup(vm: Machine, command: str, args: dict[str, Any]) -> None:
    vm.cmd(command, args)
    vm.wait_job_status(args["job-id"], "running")


def guest_writes(vm: Machine, topology: Topology, row: CaseRow,
                 writes: tuple[tuple[int, int], ...] = GUEST_WRITES) -> None:
    for offset, length in writes:
        request = f"write -P {NEW:#x} {offset} {length}"
        result = vm.qemu_io(topology.write_node, request, device=False)
        row.guest(request, result)
        assert result.ok, f"guest write at {offset}+{length}: {result.output}"


def release_to_completion(vm: Machine, job: str, row: CaseRow) -> None:
    vm.cmd("block-job-set-speed", {"device": job, "speed": 0})
    end = vm.wait_event("BLOCK_JOB_COMPLETED", {"device": job})
    row.job_ended(end)
    assert row.job == "completed", f"the backup failed: {end['data']}"
    vm.wait_job_status(job, "null")


def top_layer_extents(images: Images, path: Path) -> list[dict[str, Any]]:
    return [e for e in images.map(path) if e["depth"] == 0 and e["data"]]


def test_sync_top(launch_vm, images, case_row):
    """base.raw (old data) <- source.qcow2 whose top layer holds the clusters at 0, 2 MiB
    and 3 MiB; the guest writes into 1 MiB (only in the backing file) and 2 MiB (in the
    top) while the job has copied the first only."""
    base = images.create("base.raw", IMAGE_SIZE, "raw")
    images.write(base, ORIGINAL, 0, IMAGE_SIZE, "raw")
    topology = Topology(Layout.BACKUP_SYNC_FULL, images.folder, fault=None,
                        qcow2=("source", "target"))
    over_base = [f"backing_file={base.name}", "backing_fmt=raw"]
    source = images.create(topology.image("source").name, IMAGE_SIZE, "qcow2", over_base)
    images.qemu_io(source, *(f"write -P {TOP:#x} {off} {CHUNK}" for off in TOP_CLUSTERS))
    original = images.copy(source, images.path("original.qcow2"))  # the same backing file
    target = images.create(topology.image("target").name, IMAGE_SIZE, "qcow2", over_base)
    vm = launch(launch_vm, topology)
    args = topology.backup_args(speed=1, max_chunk=CHUNK)
    assert args is not None
    braked_backup(vm, "blockdev-backup", {**args, "sync": "top"})
    row = case_row("sync-top", "guest writes in and outside the top layer")
    guest_writes(vm, topology, row, ((MiB, CHUNK), (2 * MiB + 4 * KiB, 4 * KiB)))
    release_to_completion(vm, topology.job, row)
    vm.shutdown()
    same = images.identical(target, original)
    copied = [(e["start"], e["length"]) for e in top_layer_extents(images, target)]
    row.saw("backup", same)
    row.saw("copied", "top layer only" if copied == [(off, CHUNK) for off in TOP_CLUSTERS]
            else f"{len(copied)} extents")
    assert same, "sync=top: the target over the backing file is not the point-in-time image"
    assert copied == [(off, CHUNK) for off in TOP_CLUSTERS], \
        f"sync=top: the target's top layer should hold the source's top clusters only: {copied}"


FORMATS = {
    "source-64k-target-1m": (64 * KiB, MiB, False),
    "source-1m-target-64k": (MiB, 64 * KiB, False),
    "compressed-target": (64 * KiB, 64 * KiB, True),
}


@pytest.mark.parametrize("source_cluster,target_cluster,compress", FORMATS.values(),
                         ids=FORMATS.keys())
def test_qcow2_source_and_target(launch_vm, images, case_row, source_cluster, target_cluster,
                                 compress):
    row = case_row("qcow2-formats", f"source {source_cluster // KiB} KiB clusters, target "
                   f"{target_cluster // KiB} KiB" + (", compressed" if compress else ""))
    topology = Topology(Layout.BACKUP_SYNC_FULL, images.folder, fault=None,
                        qcow2=("source", "target"))
    source = images.create(topology.image("source").name, IMAGE_SIZE, "qcow2",
                           [f"cluster_size={source_cluster}"])
    images.write(source, ORIGINAL, 0, IMAGE_SIZE)
    original = images.copy(source, images.path("original.qcow2"))
    target = images.create(topology.image("target").name, IMAGE_SIZE, "qcow2",
                           [f"cluster_size={target_cluster}"])
    vm = launch(launch_vm, topology)
    args = topology.backup_args(speed=1, max_chunk=max(CHUNK, target_cluster))
    assert args is not None
    braked_backup(vm, "blockdev-backup", {**args, **({"compress": True} if compress else {})})
    guest_writes(vm, topology, row)
    release_to_completion(vm, topology.job, row)
    vm.shutdown()
    same = images.identical(target, original)
    row.saw("backup", same)
    assert same, "the backup is not the point-in-time image"
    if compress:  # uniform data compresses to a few bytes a cluster (qemu-img map of 7.2
        # does not say "compressed"): the file is far smaller than its data
        size = target.stat().st_size
        row.saw("compressed", size < IMAGE_SIZE // 4)
        assert size < IMAGE_SIZE // 4, \
            f"compress: true, but the target file takes {size} bytes for {IMAGE_SIZE} of data"


@pytest.mark.requires("copy-before-write.min-cluster-size", "snapshot-access")
def test_min_cluster_size(scenario, case_row):
    """Fleecing with min-cluster-size 256 KiB: a 4 KiB guest write in the second 64 KiB
    of [1 MiB, 1.25 MiB) copies all 256 KiB first."""
    size = 256 * KiB
    s = scenario(layout=Layout.FLEECING, seed=SEED, min_cluster_size=size)
    s.start()
    row = case_row("min-cluster-size", "256 KiB, a 4 KiB guest write")
    original = s.original_data
    request = f"write -P {NEW:#x} {MiB + 68 * KiB} {4 * KiB}"
    row.guest(request, write := s.guest_request(request))
    assert write.ok, write.output
    result, data = s.read_snapshot_data(MiB, size)
    row.saw("snapshot", result.error or data == original[MiB:MiB + size])
    assert data is not None, result.output
    assert_same_bytes("snapshot read of the copied region", data, original[MiB:MiB + size], MiB)
    s.stop()
    target = s.images.read_raw(s.topology.image("target"))
    row.saw("target", target[MiB:MiB + size] == original[MiB:MiB + size] and
            target[:MiB] + target[MiB + size:] == bytes(IMAGE_SIZE - size))
    assert_same_bytes(f"the target's {size // KiB} KiB around the write",
                      target[MiB:MiB + size], original[MiB:MiB + size], MiB)
    rest = target[:MiB] + target[MiB + size:]
    assert rest == bytes(len(rest)), "the target holds data outside the copied region"


@pytest.mark.requires("drive-backup")
def test_drive_backup(launch_vm, images, case_row):
    row = case_row("drive-backup", "braked, two guest writes")
    topology = Topology(Layout.BACKUP_SYNC_FULL, images.folder, fault=None)
    source = images.create(topology.image("source").name, IMAGE_SIZE, "raw")
    original = images.fill_seeded(source, SEED, 0, IMAGE_SIZE)
    target = images.create(topology.image("target").name, IMAGE_SIZE, "raw")
    vm = launch(launch_vm, topology, roles=("source",))  # drive-backup opens the target
    args = topology.backup_args(speed=1, max_chunk=CHUNK)
    assert args is not None
    braked_backup(vm, "drive-backup", {**args, "target": str(target), "format": "raw",
                                       "mode": "existing"})
    guest_writes(vm, topology, row)
    release_to_completion(vm, topology.job, row)
    backup = images.read_raw(target)
    row.saw("backup", backup == original)
    assert_same_bytes("drive-backup's target, read at completion", backup, original)
    vm.shutdown()
