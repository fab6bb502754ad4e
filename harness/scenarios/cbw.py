"""Copy-before-write scenarios: build a layout, inject a fault, drive guest I/O and the job.

A scenario is one run of one layout (:class:`ScenarioSpec`: an ``on-cbw-error``
value, a fault, a job policy).  It returns an :class:`Observation` of what users rely
on (the guest writes' results, the job's events and end, the data left in source and
backup); the test asserts on it.  Every step is also written to a :class:`Transcript`.

The parts, each with one job:

* :class:`~harness.block.topology.Topology` (from the spec): the block graph;
* :class:`Scenario`: launches QEMU on it, writes as the guest, reads the snapshot.
  Fleecing layouts run as QEMU's own copy-before-write iotest does: ``-machine none``,
  no device, the "guest" is HMP ``qemu-io`` on the copy-before-write node, which
  nothing removes.  A backup job's filter goes when the job ends, and a job may end
  mid-scenario (a QEMU that aborts the job when the snapshot breaks, as documented):
  there the guest writes through a SCSI disk (virtio-mmio on ``-machine microvm``),
  which QEMU moves back to the source with the filter's removal, as it would a real
  guest's (QEMU waits under ``-S``, the disk has its geometry: nothing reads it behind
  the scenario's back);
* :class:`JobDriver`: follows the job to its end, as its error policy asks;
* :func:`judge_data`: reads the images offline into the data verdicts.

The data (:mod:`harness.block.data`): the source is filled with ``ORIGINAL``; the
guest writes ``NEW`` at ``GUEST_WRITES``.  ``sync=full`` jobs start with ``speed=1``
and 64 KiB chunks, so they copy one chunk and wait: the guest writes
deterministically hit uncopied data; ``block-job-set-speed`` releases the job: to
full speed (0), or to :data:`CRUISE_SPEED` if it ignores errors.
"""

from __future__ import annotations

import errno as errno_mod
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..block.data import CHUNK, GUEST_WRITES, IMAGE_SIZE, NEW, ORIGINAL, UNTOUCHED, KiB, MiB
from ..block.faults import NO_FAULT, Fault
from ..block.images import Images, pattern_bytes
from ..block.topology import SCENARIO_DEVICE, Layout, Topology, guest_device
from ..errors import QEMUUnresponsive
from ..qemu.machine import Machine
from ..qemu.qemu_io import QemuIoResult
from ..qemu.transcript import Transcript, path_filter

IOTHREAD = "iothread0"
# The disk's CHS geometry (4 MiB), given so that the device does not read sector 0 to
# guess it: that read would consume a one-shot blkdebug rule that names no sector.
GEOMETRY = {"cyls": 8, "heads": 16, "secs": 64}

__all__ = [
    "CHUNK", "CRUISE_SPEED", "GUEST_WRITES", "IMAGE_SIZE", "JOB", "NEW", "NO_FAULT",
    "ON_CBW_ERROR_VALUES", "ORIGINAL", "POLICIES", "POLICY_CASES", "POLICY_CASE_IDS",
    "UNTOUCHED", "Fault", "JobDriver", "JobOutcome", "KiB", "Layout", "MiB", "Observation",
    "Scenario", "ScenarioSpec", "judge_data", "run", "value_id",
]

JOB = "job0"
# A job that ignores errors retries a failing chunk at once, forever: at full speed
# that is >100,000 BLOCK_JOB_ERROR events a second, more than the harness can read, and
# the reply to the cancel waits behind them.  At this speed (about a thousand 64 KiB
# chunks a second, failed ones included) the retries come ~1000 a second and the 4 MiB
# copy still takes ~0.06 s.
CRUISE_SPEED = 64 * MiB

# The option values under test; None means the option is left out (the default).
ON_CBW_ERROR_VALUES: tuple[str | None, ...] = (None, "break-guest-write", "break-snapshot")
POLICIES: tuple[str, ...] = ("report", "stop", "ignore", "enospc")
# Each job policy with a fault's errno; enospc is tried with both, as it tells them apart.
POLICY_CASES: tuple[tuple[str, int], ...] = (
    *((p, errno_mod.EIO) for p in POLICIES), ("enospc", errno_mod.ENOSPC))
POLICY_CASE_IDS = tuple(f"{p}-{errno_mod.errorcode[c]}" for p, c in POLICY_CASES)


def value_id(value: str | None) -> str:
    return value or "omitted"


@dataclass(frozen=True)
class ScenarioSpec:
    """What one scenario runs: a layout, an ``on-cbw-error`` value, a fault, a job policy.

    ``release_speed``: the job's speed once the guest has written (None: full speed,
    or :data:`CRUISE_SPEED` for a job that ignores errors).  ``seed``: fill the source
    with pseudo-random data (:func:`~harness.block.images.seeded_bytes`), in which a
    read at a wrong offset shows, instead of the uniform :data:`ORIGINAL`.
    """

    layout: Layout
    on_cbw_error: str | None = None
    fault: Fault = NO_FAULT
    on_source_error: str | None = None
    on_target_error: str | None = None
    cbw_timeout: int | None = None
    release_speed: int | None = None
    seed: int | None = None  # the source holds seeded_bytes(seed) instead of ORIGINAL
    unmap: bool = False  # every node passes discards down (Topology.unmap)
    min_cluster_size: int | None = None  # the copy-before-write node's (fleecing layouts)
    iothread: bool = False  # the guest's disk controller runs in an iothread (backup layouts)

    @property
    def policy(self) -> str:
        """The job's error policies, joined ("" if left to the defaults)."""
        return "+".join(sorted({p for p in (self.on_source_error, self.on_target_error) if p}))

    @property
    def speed_after_brake(self) -> int:
        if self.release_speed is not None:
            return self.release_speed
        return CRUISE_SPEED if "ignore" in (self.on_source_error, self.on_target_error) else 0

    @property
    def braked(self) -> bool:
        """sync=full jobs start braked (see the module docstring)."""
        return self.layout in (Layout.BACKUP_SYNC_FULL, Layout.PUSH_FROM_SNAPSHOT)

    def topology(self, images: Images) -> Topology:
        return Topology(self.layout, images.folder, on_cbw_error=self.on_cbw_error,
                        cbw_timeout=self.cbw_timeout, fault=self.fault, job=JOB,
                        unmap=self.unmap, min_cluster_size=self.min_cluster_size)

    def backup_args(self, topology: Topology) -> dict[str, Any] | None:
        brake = {"speed": 1, "max_chunk": CHUNK} if self.braked else {}
        return topology.backup_args(on_source_error=self.on_source_error,
                                    on_target_error=self.on_target_error, **brake)


@dataclass
class JobOutcome:
    """How a job ended, as QMP said it."""

    end: str                          # completed | failed | cancelled | running | absent
    error: str | None = None          # BLOCK_JOB_COMPLETED's error text
    errors: list[dict[str, Any]] = field(default_factory=list)   # BLOCK_JOB_ERROR data
    paused_on_error: bool = False     # the job paused after an error (stop / enospc)
    paused_again_after_resume: bool = False
    statuses: list[str] = field(default_factory=list)            # JOB_STATUS_CHANGE, drained
    status_before_cancel: str | None = None  # sync=none: query-jobs status when it was ended

    @property
    def error_actions(self) -> list[tuple[str, str]]:
        return [(e["operation"], e["action"]) for e in self.errors]

    def describe(self) -> str:
        text = self.end + (f" ({self.error})" if self.error else "")
        if self.errors:
            text += f"; BLOCK_JOB_ERROR {self.errors[0]['operation']}/{self.errors[0]['action']}"
        if self.paused_on_error:
            text += "; paused" + (", again after resume" if self.paused_again_after_resume
                                  else "")
        return text


@dataclass
class Observation:
    """What one scenario run saw."""

    layout: Layout
    on_cbw_error: str | None
    fault: Fault
    guest_writes: dict[int, QemuIoResult] = field(default_factory=dict)
    snapshot_reads: dict[int, QemuIoResult] = field(default_factory=dict)
    job: JobOutcome | None = None
    source_holds_new: dict[int, bool] = field(default_factory=dict)
    source_holds_original: dict[int, bool] = field(default_factory=dict)
    backup_is_point_in_time: bool | None = None
    backup_holds_original: dict[int, bool] = field(default_factory=dict)
    unresponsive: str | None = None  # the harness's error, if QEMU stopped answering QMP


    @property
    def ended_job(self) -> JobOutcome:
        """How the scenario's job ended (an error of the test if it ran none)."""
        assert self.job is not None, "the scenario ran no job to its end"
        return self.job

    @property
    def job_reported_success(self) -> bool:
        """The job ended the way a good backup ends: completed without error; for sync=none,
        which runs until the user ends it, cancelled while running without an error."""
        if self.job is None:
            return False
        if self.layout is Layout.BACKUP_SYNC_NONE:
            return self.job.end == "cancelled" and not self.job.errors
        return self.job.end == "completed"

    @property
    def failed_writes(self) -> list[int]:
        return [off for off, r in self.guest_writes.items() if not r.ok]

    @property
    def write_errors(self) -> set[str]:
        return {r.error for r in self.guest_writes.values() if r.error}


# ---------------------------------------------------------------- the job
class JobDriver:
    """Follows one backup job to its end, as its error policy asks; bounded throughout.

    sync=none never ends by itself: it is cancelled.  After an error the job is
    driven as a user would: ``stop`` -> resume once (it must pause again while
    the fault persists) -> cancel; ``ignore`` -> a few retries -> cancel.
    """

    _ENDS = (("BLOCK_JOB_COMPLETED", {"device": JOB}), ("BLOCK_JOB_CANCELLED", {"device": JOB}),
             ("BLOCK_JOB_ERROR", {"device": JOB}))

    def __init__(self, vm: Machine, transcript: Transcript, *, runs_until_cancelled: bool,
                 release_speed: int):
        self.vm = vm
        self.transcript = transcript
        self.runs_until_cancelled = runs_until_cancelled
        self.release_speed = release_speed
        self._logged_errors: list[dict[str, Any]] = []
        self._error_pauses: list[dict[str, Any]] = []  # JOB_STATUS_CHANGE paused after errors

    def cmd(self, command: str, args: Mapping[str, Any] | None = None) -> Any:
        return self.transcript.execute(self.vm, command, args)

    def finish(self, *, ignore_errors_before_cancel: int = 3) -> JobOutcome:
        outcome = JobOutcome(end="running")
        if self.runs_until_cancelled:
            outcome.status_before_cancel = self.status()
            if outcome.status_before_cancel in (None, "aborting", "concluded", "null"):
                self._await_end(outcome)  # it ended by itself: nothing to cancel
            else:
                self._cancel(outcome)
        else:
            self.cmd("block-job-set-speed", {"device": JOB, "speed": self.release_speed})
            self._follow(outcome, ignore_errors_before_cancel)
        self.vm.wait_job_status(JOB, "null")  # auto-dismissed: the stream is complete
        outcome.statuses = self._statuses()
        outcome.errors = [e["data"] for e in self.vm.events_named("BLOCK_JOB_ERROR",
                                                                  {"device": JOB})]
        self.transcript.log(f"job: {outcome.describe()}; statuses {outcome.statuses}")
        return outcome

    def status(self) -> str | None:
        """The job's status as ``query-jobs`` has it (None once it is gone)."""
        status = next((j["status"] for j in self.vm.cmd("query-jobs") if j["id"] == JOB), None)
        self.transcript.log(f"job status: {status or 'gone'}")
        return status

    def _next_event(self) -> dict[str, Any]:
        event = self.vm.wait_any_event(self._ENDS)
        if event["event"] != "BLOCK_JOB_ERROR" or event["data"] not in self._logged_errors:
            self.transcript.event(event)  # repeats of an ignored error are left out
            if event["event"] == "BLOCK_JOB_ERROR":
                self._logged_errors.append(event["data"])
        return event

    def _follow(self, outcome: JobOutcome, ignores: int) -> None:
        resumed = False
        errors_seen = 0
        while True:
            event = self._next_event()
            if event["event"] == "BLOCK_JOB_ERROR":
                errors_seen += 1
                action = event["data"]["action"]
                if action == "stop":
                    self._error_pauses.append(self.vm.wait_job_status(JOB, "paused",
                                                                      after=event))
                    if resumed:
                        outcome.paused_again_after_resume = True
                        self._cancel(outcome)
                        return
                    outcome.paused_on_error = resumed = True
                    self.cmd("block-job-resume", {"device": JOB})
                elif action == "ignore" and errors_seen >= ignores:
                    self._cancel(outcome)
                    return
                continue
            self._ended(outcome, event)
            return

    def _cancel(self, outcome: JobOutcome) -> None:
        self.cmd("block-job-cancel", {"device": JOB, "force": True})
        self._await_end(outcome)

    def _await_end(self, outcome: JobOutcome) -> None:
        # An ignoring job may have queued thousands of BLOCK_JOB_ERRORs: skip to the end.
        event = self.vm.wait_any_event(self._ENDS[:2])
        self.transcript.event(event)
        self._ended(outcome, event)

    @staticmethod
    def _ended(outcome: JobOutcome, event: Mapping[str, Any]) -> None:
        outcome.error = event["data"].get("error")
        if event["event"] == "BLOCK_JOB_CANCELLED":
            outcome.end = "cancelled"
        else:
            outcome.end = "failed" if outcome.error else "completed"

    def _statuses(self) -> list[str]:
        """The job's status changes, less the paused/running pairs of drains.

        Graph changes, HMP qemu-io and cancelling all drain I/O, which pauses a running
        job for a moment, at times that depend on scheduling.  Only the pauses that
        followed a BLOCK_JOB_ERROR with action stop are kept.
        """
        out: list[dict[str, Any]] = []
        for e in self.vm.events_named("JOB_STATUS_CHANGE", {"id": JOB}):
            if e["data"]["status"] == "running" and out and \
                    out[-1]["data"]["status"] == "paused" and \
                    not any(out[-1] is p for p in self._error_pauses):
                out.pop()
                continue
            out.append(e)
        return [e["data"]["status"] for e in out]


# ------------------------------------------------------------ verdicts
def judge_data(images: Images, topology: Topology, original: bytes, obs: Observation,
               transcript: Transcript) -> Observation:
    """Read the images (QEMU stopped) into ``obs``'s data verdicts; ``original`` is the
    data the source held before QEMU started."""
    source, target = topology.image("source"), topology.image("target")
    probed = GUEST_WRITES + UNTOUCHED
    obs.source_holds_new.update(images.holds_each(source, NEW, probed, CHUNK, "raw"))
    obs.source_holds_original.update(images.holds_each(source, ORIGINAL, probed, CHUNK, "raw"))
    layout = topology.layout
    if layout is Layout.BACKUP_SYNC_FULL:
        obs.backup_is_point_in_time = images.holds_data(target, original)
    elif layout is Layout.PUSH_FROM_SNAPSHOT and obs.job is not None:
        obs.backup_is_point_in_time = images.holds_data(topology.image("backup"), original)
    elif layout is Layout.BACKUP_SYNC_NONE:
        # A sync=none target holds only what the copy-before-write saved (zeros
        # elsewhere): the point-in-time image is the target over the source, as a
        # qcow2 target with the source as its backing file shows it.  So every region
        # the guest changed must be in the target; comparing the whole target with
        # the original data would be wrong.
        obs.backup_holds_original.update(
            images.holds_each(target, ORIGINAL, GUEST_WRITES, CHUNK, "raw"))
        obs.backup_is_point_in_time = all(
            obs.backup_holds_original[off] or obs.source_holds_original[off]
            for off in GUEST_WRITES)
    changed = [str(o) for o, v in obs.source_holds_new.items() if v]
    transcript.log(f"source holds new data at: {', '.join(changed) or 'nowhere'}")
    if obs.backup_is_point_in_time is not None:
        transcript.log(f"backup is point-in-time: {obs.backup_is_point_in_time}")
    if obs.backup_holds_original:
        transcript.log(f"target holds old data: {obs.backup_holds_original}")
    return obs


# ------------------------------------------------------------ the scenario
class Scenario:
    """One spec's topology on one machine: set up, write as the guest, drive the job,
    observe.  ``name`` names the machine (its log files in the test's folder).
    ``microvm``: a layout whose guest writes go through a disk puts it on virtio-mmio
    under ``-machine microvm`` (the build must have it: capability ``machine.microvm``),
    which starts on ~15 ms less CPU than ``pc``, where it is otherwise."""

    def __init__(self, launch_vm: Callable[..., Machine], images: Images, spec: ScenarioSpec,
                 *, transcript: Transcript | None = None, name: str = "vm",
                 command_timeout: float | None = None, microvm: bool = False):
        self.launch_vm = launch_vm
        self.microvm = microvm
        self.images = images
        self.spec = spec
        self.topology = spec.topology(images)
        self.name = name
        self.command_timeout = command_timeout
        self.transcript = transcript or Transcript()
        self.transcript.add_filter(path_filter(images.folder))
        self.obs = Observation(spec.layout, spec.on_cbw_error, spec.fault)
        self.original_data = b""  # what the source holds before QEMU starts
        self.vm: Machine | None = None
        self.job: JobDriver | None = None

    @property
    def layout(self) -> Layout:
        return self.spec.layout

    # ------------------------------------------------------------- set-up
    def _make_images(self) -> None:
        source = self.images.create(self.topology.image("source").name, IMAGE_SIZE, "raw")
        # The point-in-time reference stays in memory (the recipe remakes it).
        if self.spec.seed is None:
            self.images.write(source, ORIGINAL, 0, IMAGE_SIZE, "raw")
            self.original_data = pattern_bytes(ORIGINAL, IMAGE_SIZE)
        else:
            self.original_data = self.images.fill_seeded(source, self.spec.seed, 0, IMAGE_SIZE)
        for role in self.topology.image_roles[1:]:
            self.images.create(self.topology.image(role).name, IMAGE_SIZE, "raw")

    def start(self) -> Machine:
        """Create images, launch QEMU with the image nodes, add the filters, start the job."""
        self._make_images()
        args: list[str] = []
        # no-flush: the images are read back offline through the page cache, so QEMU
        # need not fdatasync each of them at its exit (an I/O wait on a shared disk).
        # Not under a blkdebug config of the user's: with no-flush QEMU neither flushes
        # nor raises blkdebug's flush events, so a rule on a flush would never fire (the
        # harness's own rules are on reads and writes only).
        cache = {"cache": {"no-flush": True}} if self.spec.fault.config is None else {}
        for node in self.topology.image_nodes():
            args += ["-blockdev", json.dumps({**node, **cache})]
        machine_type = "none"
        if self.topology.writes_through_device:
            controller, disk = guest_device("virtio-scsi", SCENARIO_DEVICE,
                                            self.topology.device_node)
            assert controller is not None
            if self.spec.iothread:
                args += ["-object", f"iothread,id={IOTHREAD}"]
                controller["iothread"] = IOTHREAD
            # An iothread stays on PCI: QEMU 7.2's virtio-mmio has no ioeventfd under
            # TCG, which an iothread needs.
            if self.microvm and not self.spec.iothread:
                controller["driver"] = "virtio-scsi-device"
                machine_type = "microvm"
            else:
                machine_type = "pc"
            args += ["-S", "-device", json.dumps(controller),
                     "-device", json.dumps({**disk, **GEOMETRY})]
        kwargs = {"command_timeout": self.command_timeout} if self.command_timeout else {}
        self.vm = self.launch_vm(args, name=self.name, machine_type=machine_type, **kwargs)
        spec = self.spec
        self.transcript.log(f"=== {spec.layout.value}, on-cbw-error="
                            f"{value_id(spec.on_cbw_error)}, fault {spec.fault.name} ===")
        for node in self.topology.filter_nodes():
            self.cmd("blockdev-add", node)
        backup = spec.backup_args(self.topology)
        if backup is not None:
            self.cmd("blockdev-backup", backup)
            self.job = JobDriver(self.vm, self.transcript,
                                 runs_until_cancelled=spec.layout is Layout.BACKUP_SYNC_NONE,
                                 release_speed=spec.speed_after_brake)
        return self.vm

    # -------------------------------------------------------------- steps
    def cmd(self, command: str, args: Mapping[str, Any] | None = None) -> Any:
        assert self.vm is not None
        return self.transcript.execute(self.vm, command, args)

    def guest_write(self, offset: int, length: int = CHUNK, pattern: int = NEW) -> QemuIoResult:
        """A write as the guest's: through the disk, or the copy-before-write node."""
        result = self._as_guest(f"write -P {pattern:#x} {offset} {length}")
        self.transcript.log(f"guest write {pattern:#x} at {offset}+{length}: {result.output}")
        self.obs.guest_writes[offset] = result
        return result

    def guest_request(self, command: str) -> QemuIoResult:
        """Any qemu-io request as the guest's (``write -z``, ``discard``...), logged."""
        result = self._as_guest(command)
        self.transcript.log(f"guest {command}: {result.output}")
        return result

    def _as_guest(self, command: str) -> QemuIoResult:
        assert self.vm is not None
        if self.topology.writes_through_device:
            return self.vm.qemu_io(SCENARIO_DEVICE, command, device=True)
        return self.vm.qemu_io(self.topology.write_node, command, device=False)

    def read_snapshot_data(self, offset: int, length: int) -> tuple[QemuIoResult, bytes | None]:
        """Read the snapshot-access node (``read -v``): the result, and the bytes read
        (None if the read failed).  The dump is not logged: only its verdict is."""
        assert self.vm is not None
        result = self.vm.qemu_io(self.topology.snapshot_node, f"read -v {offset} {length}",
                                 device=False)
        data = result.dumped(offset, length)
        self.transcript.log(f"snapshot read at {offset}+{length}: "
                            f"{result.error or ('read' if data is not None else result.output)}")
        return result, data

    def guest_writes(self) -> None:
        for offset in GUEST_WRITES:
            self.guest_write(offset)

    def read_snapshot(self, offset: int, pattern: int = ORIGINAL) -> QemuIoResult:
        assert self.vm is not None
        result = self.vm.qemu_io(self.topology.snapshot_node,
                                 f"read -P {pattern:#x} {offset} {CHUNK}", device=False)
        self.transcript.log(f"snapshot read at {offset}: {result.output}")
        self.obs.snapshot_reads[offset] = result
        return result

    def finish_job(self, *, ignore_errors_before_cancel: int = 3) -> JobOutcome:
        """Let the job run to its end, following its error policy (:class:`JobDriver`)."""
        assert self.job is not None, f"{self.layout.value} has no job"
        self.obs.job = self.job.finish(ignore_errors_before_cancel=ignore_errors_before_cancel)
        return self.obs.job

    # ------------------------------------------------------------ verdicts
    def stop(self) -> None:
        """Shut QEMU down so the images can be read offline; raises
        :class:`~harness.errors.AbnormalShutdown` if QEMU ended abnormally (an abort
        in answer to ``quit`` is a block-layer bug too)."""
        if self.vm is not None:
            self.vm.shutdown()

    def abandon(self) -> None:
        """QEMU stopped answering: SIGKILL it now rather than wait on a ``quit`` it won't read."""
        if self.vm is not None:
            self.vm.shutdown(quit_timeout=0)

    def check_data(self) -> Observation:
        """Stop QEMU, read the images and fill in the data verdicts."""
        self.stop()
        return judge_data(self.images, self.topology, self.original_data, self.obs,
                          self.transcript)


def run(scenario: Scenario, *, read_snapshot: bool = True) -> Observation:
    """The standard story: start, two guest writes, snapshot reads, job to its end, data.

    If QEMU stops answering, it is killed at once and :class:`QEMUUnresponsive` raised.
    """
    try:
        scenario.start()
        scenario.guest_writes()
        if read_snapshot and scenario.layout.has_snapshot:
            for off in GUEST_WRITES + UNTOUCHED:
                scenario.read_snapshot(off)
        if scenario.layout.has_job:
            scenario.finish_job()
    except QEMUUnresponsive as exc:
        scenario.obs.unresponsive = exc.message
        scenario.abandon()
        raise
    return scenario.check_data()
