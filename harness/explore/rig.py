"""Many explorer examples in one QEMU: a fresh graph and fresh images per example.

A QEMU start costs more than a whole example, so one QEMU (``-machine pc -S``, no
guest runs, a virtio-scsi controller for the backup layouts' disks) serves them all.
Each example (:class:`CbwRig`) adds its own nodes, named with its own prefix, on its
own raw images (and, for a backup layout, its own SCSI disk), and removes all of them
when it ends: nothing of one example is left for the next
(``harness/tests/test_explorer.py`` proves it).  A ``blockdev-add`` costs about the
same for one node as for a tree of them, so the graph is added in as few commands as
QEMU allows (:func:`example_graph`), and the job's status is read from its events
rather than asked for (:meth:`CbwRig.job_status`): commands are most of an example's
time.

Backup layouts write through a disk, as the suite does (ARCHITECTURE.md): the job's
filter goes with the job, which may end at any step, and QEMU moves the disk back to
the source then; a node name would be gone.

A QEMU that stops answering (the push backup's livelock) is killed at once
(:meth:`CbwRig.abandon`); the next example gets a fresh one.  So does every
:data:`EXAMPLES_PER_QEMU`-th example, to keep its logs short.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..block.blkdebug import BlkdebugRules, blkdebug_node
from ..block.images import Images
from ..block.topology import Layout, Topology
from ..errors import CommandFailed, WaitTimeout
from ..qemu import probe
from ..qemu.builds import QemuBuild
from ..qemu.machine import Machine
from ..qemu.qemu_io import QemuIoResult
from .model import (
    BRAKE,
    CLUSTER,
    CLUSTERS,
    IMAGE_SIZE,
    SECTOR,
    FaultPlan,
    JobEvent,
    JobPlan,
    original_image,
    original_pattern,
)

T = TypeVar("T")

# Where each fault site puts its rule: (role, blkdebug event, iotype).
_RULE_PLACES = {"source-read": ("source", "read_aio", "read"),
                "target-write": ("target", "write_aio", "write")}
COMMAND_TIMEOUT = 2.0   # replies take milliseconds; a livelocked QEMU never replies
EVENT_TIMEOUT = 5.0     # a job's next event comes within milliseconds when it comes
EXAMPLES_PER_QEMU = 300
CONTROLLER = "scsi0"
# The disk's CHS geometry (256 KiB), given so that the disk does not read sector 0 to
# guess it: that read would consume a one-shot blkdebug rule that names no sector.
GEOMETRY = {"cyls": 1, "heads": 16, "secs": 32}
_JOB_ENDS = ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")


def fault_rules(fault: FaultPlan, role: str) -> BlkdebugRules | None:
    """The blkdebug rules under ``role`` (source / target) for ``fault``."""
    if fault.site is None or _RULE_PLACES[fault.site][0] != role:
        return None
    _, event, iotype = _RULE_PLACES[fault.site]
    sector = None if fault.cluster is None else fault.cluster * CLUSTER // SECTOR
    return BlkdebugRules.fail(event, iotype=iotype, errno=fault.errno, sector=sector,
                              once=fault.once, skip=fault.after)


_PROBED: dict[str, probe.BuildInfo] = {}


def _probed(build: QemuBuild) -> probe.BuildInfo:
    """The build's version and capabilities.  (A probe starts a QEMU: once per build
    and process.)"""
    key = str(build.qemu_system)
    if key not in _PROBED:
        _PROBED[key] = probe.probe(build)
    return _PROBED[key]


def probed_version(build: QemuBuild) -> tuple[int, ...]:
    return _probed(build).version_tuple


def launch_machine(build: QemuBuild, folder: Path, name: str) -> Machine:
    """The explorer's QEMU: no guest runs (``-S``); a SCSI controller for the disks."""
    return Machine(build, folder, name=name, machine_type="pc",
                   args=["-S", "-device", json.dumps({"driver": "virtio-scsi-pci",
                                                      "id": CONTROLLER})],
                   command_timeout=COMMAND_TIMEOUT, event_timeout=EVENT_TIMEOUT).launch()


class ExploreSession:
    """QEMUs serving examples one after the other; ``close()`` ends the last one."""

    def __init__(self, build: QemuBuild, workdir: Path, *, name: str = "explore"):
        self.build = build
        self.workdir = Path(workdir)
        self.name = name
        info = _probed(build)
        self.version = info.version_tuple
        self.backup_on_cbw_error = info.has("blockdev-backup.on-cbw-error")
        self.examples = 0
        self.launches = 0
        self.vm: Machine | None = None
        self._served = 0

    def machine(self) -> Machine:
        """The QEMU for the next example: the current one, or a fresh one."""
        if self.vm is not None and not self.vm.is_running:
            self.vm = None  # killed: it stopped answering (CbwRig.abandon)
        if self.vm is not None and self._served >= EXAMPLES_PER_QEMU:
            self.close()
        if self.vm is None:
            self.launches += 1
            suffix = "" if self.launches == 1 else f"-{self.launches}"
            self.vm = launch_machine(self.build, self.workdir, self.name + suffix)
            self._served = 0
        self._served += 1
        return self.vm

    def new_rig(self, on_cbw_error: str | None, fault: FaultPlan, *,
                layout: Layout = Layout.FLEECING, job: JobPlan | None = None) -> CbwRig:
        self.examples += 1
        vm = self.machine()
        vm.forget_events()  # the earlier examples' events: nothing waits for them
        return CbwRig(vm, example_topology(self.workdir, self.examples, on_cbw_error, layout),
                      fault, job or JobPlan())

    def node_names(self) -> list[str]:
        """Every named node QEMU holds now."""
        assert self.vm is not None
        return sorted(n["node-name"] for n in self.vm.cmd("query-named-block-nodes"))

    def close(self) -> None:
        if self.vm is not None:
            vm, self.vm = self.vm, None
            vm.shutdown()


LAYOUTS = (Layout.FLEECING, Layout.BACKUP_SYNC_NONE, Layout.BACKUP_SYNC_FULL,
           Layout.PUSH_FROM_SNAPSHOT)


def example_topology(folder: Path, number: int, on_cbw_error: str | None,
                     layout: Layout = Layout.FLEECING) -> Topology:
    """The names of example ``number``'s nodes and images (blkdebug is added by the rig).
    Fleecing layouts pass discards down (``unmap``), so that a guest discard reaches
    the copy-before-write filter."""
    if layout not in LAYOUTS:
        raise ValueError(f"the explorer does not draw {layout.value}")
    return Topology(layout, folder, on_cbw_error=on_cbw_error, fault=None,
                    prefix=f"x{number}-", job=f"x{number}-job", unmap=layout.has_snapshot)


def record_images(topology: Topology, images: Images) -> None:
    """Make the example's images through :class:`Images`, which records them in
    ``images.jsonl`` (for a reproducer: ``replay.py`` remakes them from it)."""
    source = images.create(topology.image("source").name, IMAGE_SIZE, "raw")
    for cluster in range(CLUSTERS):
        images.write(source, original_pattern(cluster), cluster * CLUSTER, CLUSTER, "raw")
    for role in topology.image_roles[1:]:
        images.create(topology.image(role).name, IMAGE_SIZE, "raw")


def _job_event(event: dict[str, Any]) -> JobEvent:
    data = event["data"]
    if event["event"] == "BLOCK_JOB_ERROR":
        return JobEvent("error", data.get("operation"), data.get("action"))
    if event["event"] == "BLOCK_JOB_CANCELLED":
        return JobEvent("cancelled")
    return JobEvent("completed", error=data.get("error"))


def example_graph(topology: Topology, fault: FaultPlan) -> list[dict[str, Any]]:
    """The ``blockdev-add`` arguments of an example's graph, as few as QEMU allows: each
    node that only one other node uses is defined inline in that one (fleecing: one
    tree, snapshot-access at its top; push: and the backup image; backup layouts:
    source and target, whose parents come later).  Deleting a top node deletes what
    it defined inline."""
    discard = {"discard": "unmap"} if topology.unmap else {}
    defined: dict[str, dict[str, Any]] = {}
    for role in topology.image_roles:
        # Relative to QEMU's working directory, the topology's folder: a replay
        # runs the same commands in a folder of its own.
        image = {"driver": "file", "filename": topology.image(role).name}
        file: dict[str, Any] = image
        if role in ("source", "target"):
            file = blkdebug_node(topology.node(f"{role}-debug"), image,
                                 fault_rules(fault, role))
        defined[topology.node(role)] = {"driver": "raw", "node-name": topology.node(role),
                                        **discard, "file": file}
    for node in topology.filter_nodes():
        node = dict(node)
        for child in ("file", "target"):
            if isinstance(node.get(child), str) and node[child] in defined:
                node[child] = defined.pop(node[child])
        defined[node["node-name"]] = node
    return list(defined.values())


class CbwRig:
    """One example's graph: raw source and target over blkdebug (the fault's rule, or
    none); fleecing: the copy-before-write node and snapshot-access on top; push: and
    a braked ``blockdev-backup`` from the snapshot to a raw backup image; backup
    sync=none / full: a SCSI disk on the source and the braked job whose filter is the
    copy-before-write node.  ``images_made``: the images exist already
    (:func:`record_images`).  The job is started by :meth:`start_job`."""

    def __init__(self, vm: Machine, topology: Topology, fault: FaultPlan,
                 job: JobPlan | None = None, *, images_made: bool = False):
        self.vm = vm
        self.topology = topology
        self.plan = job or JobPlan()
        self.added: list[str] = []
        self.device: str | None = None
        self.job_present = False
        self.dead = False  # QEMU stopped answering: nothing more to ask it
        if not images_made:  # plain writes: an example is too short for the recorder
            self.topology.image("source").write_bytes(original_image())
            for role in self.topology.image_roles[1:]:
                with open(self.topology.image(role), "wb") as f:
                    f.truncate(IMAGE_SIZE)
        for node in example_graph(topology, fault):
            self._add(node)
        if self.topology.writes_through_device:
            self.device = f"{topology.prefix}disk"
            self.vm.cmd("device_add", {"driver": "scsi-hd", "id": self.device,
                                       "drive": self.topology.node("source"),
                                       "bus": f"{CONTROLLER}.0", **GEOMETRY})

    # ------------------------------------------------------------------ job
    @property
    def job(self) -> str:
        return self.topology.job

    def start_job(self) -> None:
        """blockdev-backup; sync=full and push start braked (one chunk, then wait)."""
        braked = self.topology.layout is not Layout.BACKUP_SYNC_NONE
        brake = {"speed": BRAKE, "max_chunk": CLUSTER} if braked else {}
        args = self.topology.backup_args(on_source_error=self.plan.on_source_error,
                                         on_target_error=self.plan.on_target_error, **brake)
        assert args is not None
        self.vm.cmd("blockdev-backup", args)
        self.job_present = True

    def first_chunk_copied(self) -> bool:
        """A braked job copies its first chunk at once: wait (bounded) until it has,
        or until it met an error or ended.  QEMU sends no event for a copied chunk, so
        this polls ``query-jobs``; False if the chunk was not copied."""
        def done() -> bool | None:
            if self.vm.events_named("BLOCK_JOB_ERROR", {"device": self.job}):
                return False
            job = self._query()
            if job is None or job["status"] not in ("created", "running"):
                return False
            return True if job["current-progress"] >= CLUSTER else None
        return self._poll(done, "the job's first chunk")

    def job_events(self, expected: list[JobEvent]) -> list[JobEvent]:
        """Wait for the job events the model expects, in order, as far as QEMU agrees:
        the observed ones (an ``error``/``completed``/``cancelled`` that differs from
        the expectation ends the list; so does one that does not come)."""
        seen: list[JobEvent] = []
        for want in expected:
            if want.kind == "spinning":
                break
            if want.kind == "paused":
                status = self.job_status_becomes("paused")
                seen.append(JobEvent("paused") if status == "paused" else
                            JobEvent(status or "gone"))
                if status != "paused":
                    break
                continue
            wanted = ["BLOCK_JOB_ERROR", *_JOB_ENDS]
            if want.kind != "error":
                wanted = list(_JOB_ENDS)
            try:
                event = self.vm.wait_any_event([(n, {"device": self.job}) for n in wanted])
            except WaitTimeout:
                seen.append(JobEvent("nothing"))
                break
            got = _job_event(event)
            seen.append(got)
            if got.kind != "error":
                self.vm.wait_job_status(self.job, "null")  # its filter is gone now
                self.job_present = False
            if got.kind != want.kind:
                break
        return seen

    def _query(self) -> dict[str, Any] | None:
        return next((j for j in self.vm.cmd("query-jobs") if j["id"] == self.job), None)

    def job_status(self) -> str | None:
        """The job's status as of QEMU's last reply, from its events: QEMU sends a
        JOB_STATUS_CHANGE for every change, before the reply to any later command (no
        command needed).  None before it was created and once it is gone."""
        status = None
        for event in self.vm.events_named("JOB_STATUS_CHANGE", {"id": self.job}):
            status = event["data"]["status"]
        return None if status == "null" else status

    def queried_job_status(self) -> str | None:
        """The job's status by ``query-jobs`` (a command: the state now); None once it
        is gone."""
        job = self._query()
        return None if job is None else str(job["status"])

    def job_status_becomes(self, status: str) -> str | None:
        """Wait (bounded) until the job's events say ``status``, or that it ended; the
        last status (None: gone)."""
        ends = (status, "concluded", "aborting", None)
        try:
            self.vm.wait_for(lambda: self.job_status() in ends, f"job {self.job} {status}")
        except WaitTimeout:
            pass
        return self.job_status()

    def _poll(self, check: Callable[[], bool | None], what: str,
              timeout: float = EVENT_TIMEOUT) -> bool:
        """``check()`` until it says True or False; False after ``timeout``.  For job
        states that no event announces (each call is a QMP command: bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            answer = check()
            if answer is not None:
                return answer
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)

    def set_speed(self, speed: int) -> None:
        self.vm.cmd("block-job-set-speed", {"device": self.job, "speed": speed})

    def pause_job(self) -> str | None:
        self.vm.cmd("block-job-pause", {"device": self.job})
        return self.job_status_becomes("paused")

    def resume_job(self) -> None:
        self.vm.cmd("block-job-resume", {"device": self.job})

    def cancel_job(self) -> tuple[str, str | None]:
        """Cancel the job; (the event that ended it, its error).  Its filter goes with it."""
        self.vm.cmd("block-job-cancel", {"device": self.job, "force": True})
        end = self.vm.wait_any_event([(n, {"device": self.job}) for n in _JOB_ENDS])
        self.vm.wait_job_status(self.job, "null")
        self.job_present = False
        return end["event"], end["data"].get("error")

    def _add(self, node: dict[str, Any]) -> None:
        self.vm.cmd("blockdev-add", node)
        self.added.append(node["node-name"])

    # ---------------------------------------------------------------- guest
    def guest(self, command: str) -> QemuIoResult:
        """A guest request: through the disk (backup layouts), or the copy-before-write
        node."""
        if self.device is not None:
            return self.vm.qemu_io(self.device, command, device=True)
        return self.vm.qemu_io(self.topology.write_node, command, device=False)

    def guest_write(self, offset: int, length: int, pattern: int) -> QemuIoResult:
        return self.guest(f"write -P {pattern:#x} {offset} {length}")

    def guest_write_zeroes(self, offset: int, length: int) -> QemuIoResult:
        return self.guest(f"write -z {offset} {length}")

    def guest_discard(self, offset: int, length: int) -> QemuIoResult:
        return self.guest(f"discard {offset} {length}")

    def snapshot_read(self, offset: int, length: int, pattern: int, *,
                      check: tuple[int, int] | None = None) -> QemuIoResult:
        """Read the snapshot, checking that it holds ``pattern`` (only in ``check``:
        (start, length) relative to ``offset``, when given)."""
        part = f"-s {check[0]} -l {check[1]} " if check else ""
        return self.vm.qemu_io(self.topology.snapshot_node,
                               f"read -P {pattern:#x} {part}{offset} {length}", device=False)

    def source_read(self, offset: int, length: int, pattern: int | None) -> QemuIoResult:
        """Read the source node itself (checking ``pattern`` if given): qemu-io's
        BlockBackend on it drains the source's parents when it goes."""
        check = "" if pattern is None else f"-P {pattern:#x} "
        return self.vm.qemu_io(self.topology.node("source"), f"read {check}{offset} {length}",
                               device=False)

    def image_bytes(self, role: str) -> bytes:
        """The ``source``, ``target`` or ``backup`` image as it is on disk now (QEMU
        writes through the page cache, which this read sees)."""
        return self.topology.image(role).read_bytes()

    def source_bytes(self) -> bytes:
        return self.image_bytes("source")

    def abandon(self) -> None:
        """QEMU stopped answering: SIGKILL it now (no quit it would not read); its
        session starts a fresh one for the next example."""
        self.dead = True
        self.vm.shutdown(quit_timeout=0)

    def close(self) -> None:
        """End the job, remove the example's disk, nodes (top down) and images."""
        if not self.dead:
            if self.job_present and self.job_status() is not None:
                try:
                    self.cancel_job()
                except CommandFailed:  # it ended meanwhile (as its events will say)
                    self.vm.wait_job_status(self.job, "null")
            if self.device is not None:
                self.vm.cmd("device_del", {"id": self.device})
                self.vm.wait_event("DEVICE_DELETED", {"device": self.device})
            while self.added:
                self.vm.cmd("blockdev-del", {"node-name": self.added.pop()})
        for role in self.topology.image_roles:
            try:
                os.unlink(self.topology.image(role))
            except FileNotFoundError:
                pass
