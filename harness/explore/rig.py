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


class ExploreSession:
    """One QEMU serving examples one after the other; ``close()`` ends it."""

    def __init__(self, build: QemuBuild, workdir: Path, *, name: str = "explore"):
        self.workdir = Path(workdir)
        self.vm = Machine(build, self.workdir, name=name, machine_type="none").launch()
        self.examples = 0

    def new_rig(self, on_cbw_error: str | None, fault: FaultPlan, *,
                images_made: bool = False) -> FleecingRig:
        self.examples += 1
        return FleecingRig(self.vm, example_topology(self.workdir, self.examples, on_cbw_error),
                           fault, images_made=images_made)

    def node_names(self) -> list[str]:
        """Every named node QEMU holds now."""
        return sorted(n["node-name"] for n in self.vm.cmd("query-named-block-nodes"))

    def close(self) -> None:
        self.vm.shutdown()


def example_topology(folder: Path, number: int, on_cbw_error: str | None) -> Topology:
    """The names of example ``number``'s nodes and images (blkdebug is added by the rig)."""
    return Topology(Layout.FLEECING, folder, on_cbw_error=on_cbw_error, fault=None,
                    prefix=f"x{number}-")


def record_images(topology: Topology, images: Images) -> None:
    """Make the example's images through :class:`Images`, which records them in
    ``images.jsonl`` (for a reproducer: ``replay.py`` remakes them from it)."""
    source = images.create(topology.image("source").name, IMAGE_SIZE, "raw")
    for cluster in range(CLUSTERS):
        images.write(source, original_pattern(cluster), cluster * CLUSTER, CLUSTER, "raw")
    images.create(topology.image("target").name, IMAGE_SIZE, "raw")


class FleecingRig:
    """One example's fleecing graph: raw source and target over blkdebug (the fault's
    rule, or none), the copy-before-write node and snapshot-access on top.
    ``images_made``: the images exist already (:func:`record_images`)."""

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

    def _add(self, node: dict[str, Any]) -> None:
        self.vm.cmd("blockdev-add", node)
        self.added.append(node["node-name"])

    def guest_write(self, offset: int, length: int, pattern: int) -> QemuIoResult:
        return self.vm.qemu_io(self.topology.write_node,
                               f"write -P {pattern:#x} {offset} {length}", device=False)

    def snapshot_read(self, offset: int, length: int, pattern: int) -> QemuIoResult:
        return self.vm.qemu_io(self.topology.snapshot_node,
                               f"read -P {pattern:#x} {offset} {length}", device=False)

    def source_bytes(self) -> bytes:
        """The source image as it is on disk now (QEMU writes through the page cache,
        which this read sees)."""
        return self.topology.image("source").read_bytes()

    def close(self) -> None:
        """Remove the example's nodes (top down) and images."""
        while self.added:
            self.vm.cmd("blockdev-del", {"node-name": self.added.pop()})
        for role in ("source", "target"):
            try:
                os.unlink(self.topology.image(role))
            except FileNotFoundError:
                pass
