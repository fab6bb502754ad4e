"""The copy-before-write block graphs, built in one place.

A :class:`Topology` names and builds every piece of one copy-before-write layout:
the raw ``source`` / ``target`` (/ ``backup``) nodes over blkdebug with a fault's
rules, the ``copy-before-write`` node (its ``on-cbw-error``, ``cbw-timeout``), the
``snapshot-access`` node, a throttled target (``throttle`` node + ``throttle-group``
object), and the ``blockdev-backup`` arguments.  Whoever uses it (the scenario
driver, the cbw-timeout layout, the guest) decides what goes on the command line
and what over QMP; :func:`guest_device` gives a guest's disk device on top.

Layouts::

    backup-sync-none / -full:  blockdev-backup source -> target, filter-node-name "cbw"
    fleecing:                  copy-before-write "cbw" (file source, target target)
                               + snapshot-access "snapshot" on cbw
    push-from-snapshot:        fleecing + blockdev-backup snapshot -> backup, sync=full

Writes that must be copied first go to the ``cbw`` node in every layout: below it the
filter takes the source's write permission, so a writer on ``source`` is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .faults import NO_FAULT, Fault

THROTTLE_GROUP = "tg0"
DEVICE_KINDS = ("virtio-blk", "virtio-scsi", "ahci")


class Layout(StrEnum):
    """Where the copy-before-write filter comes from, and who reads the snapshot."""

    BACKUP_SYNC_NONE = "backup-sync-none"        # blockdev-backup sync=none + filter-node-name
    BACKUP_SYNC_FULL = "backup-sync-full"        # blockdev-backup sync=full while the guest writes
    FLEECING = "fleecing"                        # copy-before-write + snapshot-access
    PUSH_FROM_SNAPSHOT = "push-from-snapshot"    # fleecing + blockdev-backup from snapshot-access

    @property
    def uses_backup_on_cbw_error(self) -> bool:
        """Does ``on-cbw-error`` go to ``blockdev-backup`` (else to the CBW node)?"""
        return self in (Layout.BACKUP_SYNC_NONE, Layout.BACKUP_SYNC_FULL)

    @property
    def has_snapshot(self) -> bool:
        """A copy-before-write node made by blockdev-add, with snapshot-access on top."""
        return self in (Layout.FLEECING, Layout.PUSH_FROM_SNAPSHOT)

    @property
    def has_job(self) -> bool:
        return self is not Layout.FLEECING


@dataclass(frozen=True)
class Topology:
    """One copy-before-write layout's nodes and arguments.

    ``prefix`` starts every node-name and image name (a guest's disks each have their
    own graph).  ``fault``: blkdebug under the source and target with its rules; None
    for no blkdebug at all.  ``throttle_bps``: the copy-before-write's target is a
    throttle node of group :data:`THROTTLE_GROUP` limited to this write rate.  ``unmap``:
    every node passes discards down (``discard: unmap``); by default QEMU drops a discard
    at the first node, before the copy-before-write filter sees it.
    """

    layout: Layout
    folder: Path
    on_cbw_error: str | None = None
    cbw_timeout: int | None = None
    fault: Fault | None = NO_FAULT
    throttle_bps: int | None = None
    prefix: str = ""
    job: str = "job0"
    unmap: bool = False
    qcow2: tuple[str, ...] = ()  # roles whose image is qcow2 (made by the caller); else raw
    min_cluster_size: int | None = None  # the copy-before-write node's min-cluster-size

    # ------------------------------------------------------------ names
    def node(self, role: str) -> str:
        """The node-name of ``source``, ``target``, ``backup``, ``cbw``, ``snapshot``..."""
        return f"{self.prefix}{role}"

    def image_format(self, role: str) -> str:
        return "qcow2" if role in self.qcow2 else "raw"

    def image(self, role: str) -> Path:
        return self.folder / f"{self.prefix}{role}.{self.image_format(role)}"

    @property
    def image_roles(self) -> tuple[str, ...]:
        """The nodes with an image of their own (raw, one per role)."""
        if self.layout is Layout.PUSH_FROM_SNAPSHOT:
            return ("source", "target", "backup")
        return ("source", "target")

    @property
    def write_node(self) -> str:
        """Where a writer goes to be copied before: the copy-before-write node."""
        return self.node("cbw")

    @property
    def device_node(self) -> str:
        """What a guest device attaches to at launch: the copy-before-write node, or for
        a backup layout the source, above which the job inserts its filter."""
        return self.write_node if self.layout.has_snapshot else self.node("source")

    @property
    def writes_through_device(self) -> bool:
        """A backup job's filter goes with the job, which may end mid-scenario: writers
        need a device, which QEMU re-attaches to the source then (no node name to lose)."""
        return not self.layout.has_snapshot

    @property
    def snapshot_node(self) -> str:
        return self.node("snapshot")

    @property
    def group(self) -> str:
        return f"{self.prefix}{THROTTLE_GROUP}"

    # ------------------------------------------------------------ nodes
    def raw_node(self, role: str) -> dict[str, Any]:
        """A raw (or qcow2, see ``qcow2``) node on its image; over blkdebug (source,
        target) when a fault is set.  A qcow2 target opens no backing file: the job
        writes the top layer only."""
        image = {"driver": "file", "filename": str(self.image(role)), **self._discard}
        node: dict[str, Any] = {"driver": self.image_format(role), "node-name": self.node(role),
                                **self._discard}
        if role == "target" and role in self.qcow2:
            node["backing"] = None
        if self.fault is not None and role in ("source", "target"):
            return {**node, "file": self.fault.blkdebug(role, self.node(f"{role}-debug"), image)}
        return {**node, "file": image}

    @property
    def _discard(self) -> dict[str, str]:
        return {"discard": "unmap"} if self.unmap else {}

    def image_nodes(self) -> list[dict[str, Any]]:
        return [self.raw_node(role) for role in self.image_roles]

    def throttle_group(self) -> dict[str, Any]:
        """``object-add`` arguments of the target's throttle group."""
        assert self.throttle_bps is not None
        return {"qom-type": "throttle-group", "id": self.group,
                "limits": {"bps-write": self.throttle_bps}}

    def cbw_node(self, **extra: Any) -> dict[str, Any]:
        """The copy-before-write node (fleecing layouts), ``extra`` options added."""
        target = self.node("throttled-target" if self.throttle_bps else "target")
        opts: dict[str, Any] = {"driver": "copy-before-write", "node-name": self.node("cbw"),
                                "file": self.node("source"), "target": target, **self._discard}
        if self.on_cbw_error is not None:
            opts["on-cbw-error"] = self.on_cbw_error
        if self.cbw_timeout is not None:
            opts["cbw-timeout"] = self.cbw_timeout
        if self.min_cluster_size is not None:
            opts["min-cluster-size"] = self.min_cluster_size
        opts.update(extra)
        return opts

    def filter_nodes(self) -> list[dict[str, Any]]:
        """The nodes above the images, in the order they are added: a throttle node on
        the target if throttled, the copy-before-write node and snapshot-access (for
        the layouts that make them; a backup job makes its own filter)."""
        if not self.layout.has_snapshot:
            return []
        nodes = []
        if self.throttle_bps:
            nodes.append({"driver": "throttle", "node-name": self.node("throttled-target"),
                          "throttle-group": self.group, "file": self.node("target")})
        return [*nodes, self.cbw_node(),
                {"driver": "snapshot-access", "node-name": self.snapshot_node,
                 "file": self.node("cbw"), **self._discard}]

    def backup_args(self, *, on_source_error: str | None = None,
                    on_target_error: str | None = None, speed: int | None = None,
                    max_chunk: int | None = None) -> dict[str, Any] | None:
        """``blockdev-backup`` arguments of the layout's job (None for fleecing)."""
        if self.layout is Layout.FLEECING:
            return None
        if self.layout is Layout.PUSH_FROM_SNAPSHOT:
            args: dict[str, Any] = self.push_backup_args()
        else:
            args = {"job-id": self.job, "device": self.node("source"),
                    "target": self.node("target"),
                    "sync": "none" if self.layout is Layout.BACKUP_SYNC_NONE else "full",
                    "filter-node-name": self.node("cbw")}
            if self.on_cbw_error is not None:
                args["on-cbw-error"] = self.on_cbw_error
        if speed is not None:
            args["speed"] = speed
        if max_chunk is not None:
            args["x-perf"] = {"max-chunk": max_chunk}
        for key, value in (("on-source-error", on_source_error),
                           ("on-target-error", on_target_error)):
            if value is not None:
                args[key] = value
        return args


    def push_backup_args(self) -> dict[str, Any]:
        """``blockdev-backup`` of the snapshot-access node to ``backup``, sync=full (a push
        backup from the fleecing snapshot; any layout with a snapshot)."""
        return {"job-id": self.job, "device": self.snapshot_node,
                "target": self.node("backup"), "sync": "full"}


# The qdev id of the one disk a scenario layout with a device has (qemu-io -d writes to it).
SCENARIO_DEVICE = "disk0"


def guest_device(kind: str, qdev_id: str, drive: str, *, werror: str | None = None,
                 rerror: str | None = None) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """A guest disk of ``kind`` on node ``drive``: its controller (None for virtio-blk)
    and its ``-device`` dict."""
    dev: dict[str, Any] = {"id": qdev_id, "drive": drive}
    controller: dict[str, Any] | None = None
    if kind == "virtio-blk":
        dev["driver"] = "virtio-blk-pci"
    elif kind == "virtio-scsi":
        controller = {"driver": "virtio-scsi-pci", "id": "scsi0"}
        dev.update(driver="scsi-hd", bus="scsi0.0")
    elif kind == "ahci":
        controller = {"driver": "ahci", "id": "ahci0"}
        dev.update(driver="ide-hd", bus="ahci0.0")
    else:
        raise ConfigError(f"unknown guest disk kind {kind!r}: use {', '.join(DEVICE_KINDS)}")
    for key, policy in (("werror", werror), ("rerror", rerror)):
        if policy is not None:
            dev[key] = policy
    return controller, dev
