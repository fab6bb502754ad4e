"""Many explorer examples in one QEMU: a fresh fleecing graph and fresh images per example.

A QEMU start costs more than a whole example, so one ``-machine none`` QEMU serves
them all.  Each example (:class:`FleecingRig`) adds its own nodes, named with its own
prefix, on its own raw images, and removes both when it ends (``blockdev-del`` top
down, then the files): nothing of one example is left for the next
(``harness/tests/test_explorer.py`` proves it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..block.blkdebug import BlkdebugRules, InjectError, blkdebug_node
from ..block.images import Images
from ..block.topology import Layout, Topology
from ..qemu import probe
from ..qemu.builds import QemuBuild
from ..qemu.machine import Machine
from ..qemu.qemu_io import QemuIoResult
from .model import (
    CLUSTER,
    CLUSTERS,
    IMAGE_SIZE,
    SECTOR,
    FaultPlan,
    original_image,
    original_pattern,
)

# Where each fault site puts its rule: (role, blkdebug event, iotype).
_RULE_PLACES = {"source-read": ("source", "read_aio", "read"),
                "target-write": ("target", "write_aio", "write")}


def fault_rules(fault: FaultPlan, role: str) -> BlkdebugRules | None:
    """The blkdebug rules under ``role`` (source / target) for ``fault``."""
    if fault.site is None or _RULE_PLACES[fault.site][0] != role:
        return None
    _, event, iotype = _RULE_PLACES[fault.site]
    sector = None if fault.cluster is None else fault.cluster * CLUSTER // SECTOR
    return BlkdebugRules([InjectError(event, iotype=iotype, errno=fault.errno, sector=sector,
                                      once=fault.once)])


_BACKUP_ON_CBW_ERROR: dict[str, bool] = {}


def _backup_on_cbw_error(build: QemuBuild) -> bool:
    """Does the build's blockdev-backup take on-cbw-error?  (A probe starts a QEMU:
    once per build and process.)"""
    key = str(build.qemu_system)
    if key not in _BACKUP_ON_CBW_ERROR:
        _BACKUP_ON_CBW_ERROR[key] = probe.probe(build).has("blockdev-backup.on-cbw-error")
    return _BACKUP_ON_CBW_ERROR[key]


class ExploreSession:
    """One QEMU serving examples one after the other; ``close()`` ends it."""

    def __init__(self, build: QemuBuild, workdir: Path, *, name: str = "explore"):
        self.workdir = Path(workdir)
        self.backup_on_cbw_error = _backup_on_cbw_error(build)
        self.vm = Machine(build, self.workdir, name=name, machine_type="none").launch()
        self.examples = 0

    def new_rig(self, on_cbw_error: str | None, fault: FaultPlan, *,
                layout: Layout = Layout.FLEECING) -> CbwRig:
        self.examples += 1
        return CbwRig(self.vm, example_topology(self.workdir, self.examples, on_cbw_error,
                                                layout), fault)

    def node_names(self) -> list[str]:
        """Every named node QEMU holds now."""
        return sorted(n["node-name"] for n in self.vm.cmd("query-named-block-nodes"))

    def close(self) -> None:
        self.vm.shutdown()


LAYOUTS = (Layout.FLEECING, Layout.BACKUP_SYNC_NONE)


def example_topology(folder: Path, number: int, on_cbw_error: str | None,
                     layout: Layout = Layout.FLEECING) -> Topology:
    """The names of example ``number``'s nodes and images (blkdebug is added by the rig)."""
    if layout not in LAYOUTS:
        raise ValueError(f"the explorer does not draw {layout.value} yet")
    return Topology(layout, folder, on_cbw_error=on_cbw_error, fault=None,
                    prefix=f"x{number}-", job=f"x{number}-job")


def record_images(topology: Topology, images: Images) -> None:
    """Make the example's images through :class:`Images`, which records them in
    ``images.jsonl`` (for a reproducer: ``replay.py`` remakes them from it)."""
    source = images.create(topology.image("source").name, IMAGE_SIZE, "raw")
    for cluster in range(CLUSTERS):
        images.write(source, original_pattern(cluster), cluster * CLUSTER, CLUSTER, "raw")
    images.create(topology.image("target").name, IMAGE_SIZE, "raw")


class CbwRig:
    """One example's graph: raw source and target over blkdebug (the fault's rule, or
    none); fleecing: the copy-before-write node and snapshot-access on top;
    backup-sync-none: a ``blockdev-backup sync=none`` job whose filter is the
    copy-before-write node.  ``images_made``: the images exist already
    (:func:`record_images`)."""

    def __init__(self, vm: Machine, topology: Topology, fault: FaultPlan, *,
                 images_made: bool = False):
        self.vm = vm
        self.topology = topology
        self.added: list[str] = []
        if not images_made:  # plain writes: an example is too short for the recorder
            self.topology.image("source").write_bytes(original_image())
            with open(self.topology.image("target"), "wb") as f:
                f.truncate(IMAGE_SIZE)
        for role in ("source", "target"):
            image = {"driver": "file", "filename": str(self.topology.image(role))}
            self._add({"driver": "raw", "node-name": self.topology.node(role),
                       "file": blkdebug_node(self.topology.node(f"{role}-debug"), image,
                                             fault_rules(fault, role))})
        for node in self.topology.filter_nodes():
            self._add(node)
        self.job_running = False
        backup = self.topology.backup_args()
        if backup is not None:
            self.vm.cmd("blockdev-backup", backup)
            self.job_running = True

    def job_status(self) -> str | None:
        """The job's status (query-jobs); None once it is gone."""
        return next((j["status"] for j in self.vm.cmd("query-jobs")
                     if j["id"] == self.topology.job), None)

    def cancel_job(self) -> tuple[str, str | None]:
        """Cancel the job; (the event that ended it, its error).  Its filter goes with it."""
        job = self.topology.job
        self.vm.cmd("block-job-cancel", {"device": job, "force": True})
        end = self.vm.wait_any_event([("BLOCK_JOB_CANCELLED", {"device": job}),
                                      ("BLOCK_JOB_COMPLETED", {"device": job})])
        self.vm.wait_job_status(job, "null")
        self.job_running = False
        return end["event"], end["data"].get("error")

    def _add(self, node: dict[str, Any]) -> None:
        self.vm.cmd("blockdev-add", node)
        self.added.append(node["node-name"])

    def guest_write(self, offset: int, length: int, pattern: int) -> QemuIoResult:
        """Through the copy-before-write node; once a job took its filter away, to the
        source."""
        detached = self.topology.layout.has_job and not self.job_running
        return self.vm.qemu_io(self.topology.node("source") if detached
                               else self.topology.write_node,
                               f"write -P {pattern:#x} {offset} {length}", device=False)

    def snapshot_read(self, offset: int, length: int, pattern: int) -> QemuIoResult:
        return self.vm.qemu_io(self.topology.snapshot_node,
                               f"read -P {pattern:#x} {offset} {length}", device=False)

    def image_bytes(self, role: str) -> bytes:
        """The ``source`` or ``target`` image as it is on disk now (QEMU writes through
        the page cache, which this read sees)."""
        return self.topology.image(role).read_bytes()

    def source_bytes(self) -> bytes:
        return self.image_bytes("source")

    def close(self) -> None:
        """End the job, remove the example's nodes (top down) and images."""
        if self.job_running:
            self.cancel_job()
        while self.added:
            self.vm.cmd("blockdev-del", {"node-name": self.added.pop()})
        for role in ("source", "target"):
            try:
                os.unlink(self.topology.image(role))
            except FileNotFoundError:
                pass
