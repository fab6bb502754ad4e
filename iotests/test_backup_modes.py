"""blockdev-backup sync=bitmap / incremental: what each bitmap-mode leaves in the bitmap.

A raw source (uniform old data) with a dirty bitmap of 64 KiB granularity; the
"guest" (HMP qemu-io on the source node, before any job) writes new data to two
clusters, at 0 and at 2 MiB, so the bitmap has two dirty clusters.  The backup
copies them (the job walks the image in order: the one at 0 first).  The failing
run has a persistent fault on the target's write at 2 MiB: the job copies the
cluster at 0, then its write of the one at 2 MiB fails (on-target-error report, the
default): the job fails.

Documented (QAPI ``BitmapSyncMode``): ``on-success`` syncs the bitmap only when the
job succeeds (the behaviour of ``sync=incremental``); ``always`` syncs it whatever
the outcome, i.e. clears what was copied; ``never`` leaves it as it was.  The target
of a successful run holds the dirty clusters' data, and nothing else.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from harness.block.topology import Layout, Topology
from harness.qemu.machine import Machine
from harness.scenarios.cbw import CHUNK, IMAGE_SIZE, NEW, ORIGINAL, Fault, MiB

pytestmark = pytest.mark.requires("blockdev-backup.bitmap-mode")

BITMAP = "bm0"
DIRTY = (0, 2 * MiB)  # written before the backup; a persistent Fault fails 1 MiB and 2 MiB
FAILING = 2 * MiB
FAULT = Fault("target-write", once=False)

# (sync, bitmap-mode, fault) -> the dirty clusters left in the bitmap
CASES = {
    ("bitmap", "on-success", False): (),
    ("bitmap", "always", False): (),
    ("bitmap", "never", False): DIRTY,
    ("incremental", None, False): (),
    ("bitmap", "on-success", True): DIRTY,
    ("bitmap", "always", True): (FAILING,),
    ("bitmap", "never", True): DIRTY,
    ("incremental", None, True): DIRTY,
}


def case_id(case: tuple[str, str | None, bool]) -> str:
    sync, mode, fault = case
    return f"{sync}-{mode or 'mode-omitted'}-{'target-write-fails' if fault else 'no-fault'}"


def dirty_count(vm: Machine, node: str) -> int:
    nodes = [n for n in vm.cmd("query-named-block-nodes") if n.get("node-name") == node]
    assert len(nodes) == 1, f"node {node} not found"
    bitmaps = [b for b in nodes[0].get("dirty-bitmaps", []) if b["name"] == BITMAP]
    assert len(bitmaps) == 1, f"bitmap {BITMAP} not on {node}: {nodes[0].get('dirty-bitmaps')}"
    count: int = bitmaps[0]["count"]
    return count


@pytest.mark.parametrize("case,left", CASES.items(), ids=[case_id(c) for c in CASES])
def test_bitmap_left_after_the_job(launch_vm, images, case, left):
    sync, mode, faulty = case
    topology = Topology(Layout.BACKUP_SYNC_FULL, images.folder, fault=FAULT if faulty else None)
    source = images.create(topology.image("source").name, IMAGE_SIZE, "raw")
    images.write(source, ORIGINAL, 0, IMAGE_SIZE, "raw")
    images.create(topology.image("target").name, IMAGE_SIZE, "raw")
    args: list[str] = []
    for node in topology.image_nodes():
        args += ["-blockdev", json.dumps(node)]
    vm = launch_vm(args, machine_type="none")
    source_node = topology.node("source")
    vm.cmd("block-dirty-bitmap-add", {"node": source_node, "name": BITMAP,
                                      "granularity": CHUNK})
    for off in DIRTY:
        result = vm.qemu_io(source_node, f"write -P {NEW:#x} {off} {CHUNK}", device=False)
        assert result.ok, result.output
    assert dirty_count(vm, source_node) == len(DIRTY) * CHUNK

    backup: dict[str, Any] = {"job-id": topology.job, "device": source_node,
                              "target": topology.node("target"), "sync": sync,
                              "bitmap": BITMAP}
    if mode is not None:
        backup["bitmap-mode"] = mode
    vm.cmd("blockdev-backup", backup)
    end = vm.wait_event("BLOCK_JOB_COMPLETED", {"device": topology.job})
    if faulty:
        assert end["data"].get("error") == "Input/output error", end["data"]
    else:
        assert "error" not in end["data"], end["data"]
    vm.wait_job_status(topology.job, "null")
    assert dirty_count(vm, source_node) == len(left) * CHUNK, (
        f"bitmap-mode {mode or 'omitted'} after a {'failed' if faulty else 'successful'} job: "
        f"expected the clusters at {list(left)} dirty")
    vm.shutdown()
    target = topology.image("target")
    if not faulty:
        assert images.holds_each(target, NEW, DIRTY, CHUNK, "raw") == dict.fromkeys(DIRTY, True)
        assert images.holds(target, 0, MiB, MiB, "raw"), "a clean cluster was copied"
    else:
        assert images.holds(target, NEW, 0, CHUNK, "raw"), "the first dirty cluster not copied"
