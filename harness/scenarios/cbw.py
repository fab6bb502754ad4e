"""Copy-before-write scenarios: build a layout, inject a fault, drive guest I/O and the job.

A scenario is one run of one layout with one ``on-cbw-error`` value, one fault and
one job policy.  It returns an :class:`Observation` of what users rely on (the guest
write's result, the job's events and end, the data left in source and backup); the
test asserts on it.  Every step is also written to a :class:`Transcript`.

Images are raw so that a blkdebug ``sector`` is the guest offset: rules hit the
copy-before-write of the guest-written regions only, never the job's own first copy.
The source is filled with :data:`ORIGINAL`; the guest writes :data:`NEW` at
:data:`GUEST_WRITES`.  ``sync=full`` jobs start with ``speed=1`` and 64 KiB chunks,
so they copy one chunk and wait: the guest writes deterministically hit uncopied
data; ``block-job-set-speed`` releases the job: to full speed (0), or to
:data:`CRUISE_SPEED` if it ignores errors.

Nothing but the scenario touches the disks: QEMU starts with ``-S`` (no firmware
runs) and the device is given its geometry (it does not read sector 0 to guess it).
"""

from __future__ import annotations

import errno as errno_mod
import json
import shutil
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from ..block.blkdebug import BlkdebugRules, InjectError, blkdebug_node, load
from ..block.images import Images
from ..errors import ConfigError, QEMUUnresponsive
from ..qemu.machine import Machine, QemuIoResult
from ..qemu.transcript import Transcript, path_filter

KiB = 1024
MiB = 1024 * KiB
IMAGE_SIZE = 4 * MiB
CHUNK = 64 * KiB
ORIGINAL = 0xAA
NEW = 0x55
GUEST_WRITES: tuple[int, ...] = (1 * MiB, 2 * MiB)
UNTOUCHED: tuple[int, ...] = (0, 3 * MiB)
DEVICE = "disk0"
JOB = "job0"
# A job that ignores errors retries a failing chunk at once, forever: at full speed
# that is >100,000 BLOCK_JOB_ERROR events a second, more than the harness can read, and
# the reply to the cancel waits behind them.  At this speed (about a thousand 64 KiB
# chunks a second, failed ones included) the retries come ~1000 a second and the 4 MiB
# copy still takes ~0.06 s.
CRUISE_SPEED = 64 * MiB
# The disk's CHS geometry (4 MiB), given so that the device does not read sector 0 to
# guess it: that read would consume a one-shot blkdebug rule that names no sector.
GEOMETRY = {"cyls": 8, "heads": 16, "secs": 64}

# The option values under test; None means the option is left out (the default).
ON_CBW_ERROR_VALUES: tuple[str | None, ...] = (None, "break-guest-write", "break-snapshot")
POLICIES: tuple[str, ...] = ("report", "stop", "ignore", "enospc")
# Each job policy with a fault's errno; enospc is tried with both, as it tells them apart.
POLICY_CASES: tuple[tuple[str, int], ...] = (
    *((p, errno_mod.EIO) for p in POLICIES), ("enospc", errno_mod.ENOSPC))
POLICY_CASE_IDS = tuple(f"{p}-{errno_mod.errorcode[c]}" for p, c in POLICY_CASES)


def value_id(value: str | None) -> str:
    return value or "omitted"


class Layout(str, Enum):
    """Where the copy-before-write filter comes from, and who reads the snapshot."""

    BACKUP_SYNC_NONE = "backup-sync-none"        # blockdev-backup sync=none + filter-node-name
    BACKUP_SYNC_FULL = "backup-sync-full"        # blockdev-backup sync=full while the guest writes
    FLEECING = "fleecing"                        # copy-before-write + snapshot-access, read by qemu-io
    PUSH_FROM_SNAPSHOT = "push-from-snapshot"    # fleecing + blockdev-backup from snapshot-access

    @property
    def uses_backup_on_cbw_error(self) -> bool:
        """Does ``on-cbw-error`` go to ``blockdev-backup`` (else to the CBW node)?"""
        return self in (Layout.BACKUP_SYNC_NONE, Layout.BACKUP_SYNC_FULL)


@dataclass(frozen=True)
class Fault:
    """A blkdebug fault in the copy-before-write path.

    ``site``: ``target-write`` (the copy's write to the target), ``source-read``
    (the copy's read of the old data), ``both``, or ``none`` (the control run).
    ``once``: only the first guest write's copy fails; otherwise every copy of
    the guest-written regions fails, so the job's own copy of them fails too.
    ``config``: the rules come from a blkdebug config file instead (see
    :meth:`from_config`), given to blkdebug as that file or, ``inline``, as QMP.
    """

    site: str = "none"
    once: bool = True
    errno: int = errno_mod.EIO
    config: Path | None = None  # the rules of this blkdebug config file replace the built ones
    inline: bool = True         # with config: send the file's rules inline, else the file itself

    def __post_init__(self) -> None:
        if self.site not in ("none", "target-write", "source-read", "both"):
            raise ValueError(f"unknown fault site {self.site!r}")

    @classmethod
    def from_config(cls, path: Path, *, inline: bool,
                    valid_events: Collection[str] | None = None) -> Fault:
        """The fault of a ``configs/*.conf`` file: one inject-error rule, whose event says
        where it goes (``read_aio``: under the source, ``write_aio``: under the target).

        Unlike the built rules, a file's rule names no sector: it fails the next
        matching I/O on the node, whatever the region.
        """
        rules = load(path, valid_events)
        sites = {"read_aio": "source-read", "write_aio": "target-write"}
        if len(rules.inject_error) != 1 or rules.set_state or \
                rules.inject_error[0].event not in sites:
            raise ConfigError(f"{path}: a copy-before-write fault file holds one [inject-error] "
                              f"rule on read_aio (source) or write_aio (target)")
        rule = rules.inject_error[0]
        return cls(sites[rule.event], once=rule.once, errno=rule.errno, config=Path(path),
                   inline=inline)

    @property
    def name(self) -> str:
        if self.site == "none":
            return "no-fault"
        if self.config is not None:
            return f"{self.config.name} ({'inline' if self.inline else 'config file'})"
        return (f"{self.site}-{'once' if self.once else 'always'}-"
                f"{errno_mod.errorcode.get(self.errno, self.errno)}")

    @property
    def injects(self) -> bool:
        return self.site != "none"

    def _rules(self, event: str, iotype: str) -> BlkdebugRules:
        # iotype: an armed rule would otherwise fail any I/O on the node (the guest's
        # own write to the source, a flush), not only the copy-before-write's.
        offsets = GUEST_WRITES[:1] if self.once else GUEST_WRITES
        return BlkdebugRules([InjectError(event, iotype=iotype, errno=self.errno,
                                          sector=off // 512, once=self.once)
                              for off in offsets])

    def blkdebug(self, node: str, image: Mapping[str, Any]) -> dict[str, Any]:
        """The blkdebug node under ``node`` ("source" or "target"), with this fault's rules
        if it strikes there (none otherwise: blkdebug then passes I/O through)."""
        event, iotype, sites = {"source": ("read_aio", "read", ("source-read", "both")),
                                "target": ("write_aio", "write", ("target-write", "both"))}[node]
        rules: BlkdebugRules | None = None
        config: Path | None = None
        if self.site in sites:
            if self.config is None:
                rules = self._rules(event, iotype)
            elif self.inline:
                rules = load(self.config)
            else:
                config = self.config
        return blkdebug_node(f"{node}-debug", image, rules, config)

    def failing_writes(self) -> tuple[int, ...]:
        """Guest write offsets whose copy-before-write meets the fault."""
        if not self.injects:
            return ()
        return GUEST_WRITES[:1] if self.once else GUEST_WRITES


NO_FAULT = Fault()


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

    def summary(self) -> dict[str, str]:
        """One row of the run's summary table."""
        failed = self.failed_writes
        guest = ("all ok" if not failed else
                 f"{len(failed)}/{len(self.guest_writes)} failed: {sorted(self.write_errors)[0]}")
        return {"scenario": f"{self.layout.value} / {self.fault.name}",
                "on_cbw_error": value_id(self.on_cbw_error), "guest_write": guest,
                "job": self._job_summary(), "data": self._data_summary()}

    def _job_summary(self) -> str:
        if self.unresponsive:
            return "QEMU stopped answering QMP"
        return self.job.describe() if self.job else "-"

    def _data_summary(self) -> str:
        parts = []
        if self.snapshot_reads:
            bad = [r for r in self.snapshot_reads.values() if not r.ok]
            parts.append("snapshot reads ok" if not bad else
                         f"snapshot reads fail: {bad[0].error}")
        if self.backup_holds_original:
            copied = [o for o, v in self.backup_holds_original.items() if v]
            parts.append(f"target has old data at {len(copied)}/"
                         f"{len(self.backup_holds_original)}")
        if self.backup_is_point_in_time is not None:
            parts.append("backup point-in-time" if self.backup_is_point_in_time else
                         "backup NOT point-in-time")
        return "; ".join(parts)


class Scenario:
    """One layout on one machine: set up, write as the guest, drive the job, observe."""

    def __init__(self, launch_vm: Callable[..., Machine], images: Images, *,
                 layout: Layout, on_cbw_error: str | None = None, fault: Fault = NO_FAULT,
                 on_source_error: str | None = None, on_target_error: str | None = None,
                 cbw_timeout: int | None = None, transcript: Transcript | None = None,
                 command_timeout: float | None = None, name: str = "vm",
                 release_speed: int | None = None):
        self.launch_vm = launch_vm
        self.images = images
        self.layout = layout
        self.on_cbw_error = on_cbw_error
        self.fault = fault
        self.on_source_error = on_source_error
        self.on_target_error = on_target_error
        self.cbw_timeout = cbw_timeout
        self.command_timeout = command_timeout
        self.name = name  # the machine's name: its log files in the test's folder
        ignores = "ignore" in (on_source_error, on_target_error)
        self.release_speed = (release_speed if release_speed is not None else
                              CRUISE_SPEED if ignores else 0)
        self.transcript = transcript or Transcript()
        self.transcript.add_filter(path_filter(images.folder))
        self.obs = Observation(layout, on_cbw_error, fault)
        self.vm: Machine | None = None
        self._logged_errors: list[dict[str, Any]] = []
        self._error_pauses: list[dict[str, Any]] = []  # JOB_STATUS_CHANGE paused after errors
        self.source = images.path("source.raw")
        self.original = images.path("original.raw")
        self.target = images.path("target.raw")
        self.backup = images.path("backup.raw")

    # ------------------------------------------------------------- set-up
    def _images(self) -> None:
        self.images.create(self.source.name, IMAGE_SIZE, "raw")
        self.images.write(self.source, ORIGINAL, 0, IMAGE_SIZE, "raw")
        shutil.copyfile(self.source, self.original)  # the point-in-time reference
        self.images.create(self.target.name, IMAGE_SIZE, "raw")
        if self.layout is Layout.PUSH_FROM_SNAPSHOT:
            self.images.create(self.backup.name, IMAGE_SIZE, "raw")

    def _raw_node(self, name: str, path: Path) -> dict[str, Any]:
        image = {"driver": "file", "filename": str(path)}
        if name in ("source", "target"):
            return {"driver": "raw", "node-name": name, "file": self.fault.blkdebug(name, image)}
        return {"driver": "raw", "node-name": name, "file": image}

    @staticmethod
    def _device(drive: str) -> dict[str, Any]:
        return {"driver": "scsi-hd", "drive": drive, "id": DEVICE, **GEOMETRY}

    def start(self) -> Machine:
        """Create images, launch QEMU with source and target, set up the layout."""
        self._images()
        fleecing = self.layout in (Layout.FLEECING, Layout.PUSH_FROM_SNAPSHOT)
        nodes = [self._raw_node("source", self.source), self._raw_node("target", self.target)]
        if self.layout is Layout.PUSH_FROM_SNAPSHOT:
            nodes.append(self._raw_node("backup", self.backup))
        # -S: no guest code runs (the "guest" is qemu-io on the device), so no firmware
        # reads the disk behind the scenario's back.
        args: list[str] = ["-S", "-device", "virtio-scsi,id=scsi"]
        for node in nodes:
            args += ["-blockdev", json.dumps(node)]
        if not fleecing:
            args += ["-device", json.dumps(self._device("source"))]
        kwargs = {"command_timeout": self.command_timeout} if self.command_timeout else {}
        self.vm = self.launch_vm(args, name=self.name, **kwargs)
        self.transcript.log(f"=== {self.layout.value}, on-cbw-error="
                            f"{value_id(self.on_cbw_error)}, fault {self.fault.name} ===")
        if fleecing:
            cbw: dict[str, Any] = {"driver": "copy-before-write", "node-name": "cbw",
                                   "file": "source", "target": "target"}
            if self.on_cbw_error is not None:
                cbw["on-cbw-error"] = self.on_cbw_error
            if self.cbw_timeout is not None:
                cbw["cbw-timeout"] = self.cbw_timeout
            self.cmd("blockdev-add", cbw)
            self.cmd("blockdev-add", {"driver": "snapshot-access", "node-name": "snapshot",
                                      "file": "cbw"})
            self.cmd("device_add", self._device("cbw"))
        if self.layout is not Layout.FLEECING:
            self.start_backup()
        return self.vm

    def backup_args(self) -> dict[str, Any]:
        if self.layout is Layout.PUSH_FROM_SNAPSHOT:
            args: dict[str, Any] = {"job-id": JOB, "device": "snapshot", "target": "backup",
                                    "sync": "full"}
        else:
            args = {"job-id": JOB, "device": "source", "target": "target",
                    "sync": "none" if self.layout is Layout.BACKUP_SYNC_NONE else "full"}
            if self.layout is Layout.BACKUP_SYNC_NONE:
                args["filter-node-name"] = "backup-filter"
            if self.on_cbw_error is not None:
                args["on-cbw-error"] = self.on_cbw_error
        if args["sync"] == "full":
            args.update({"speed": 1, "x-perf": {"max-chunk": CHUNK}})  # the brake
        for key, value in (("on-source-error", self.on_source_error),
                           ("on-target-error", self.on_target_error)):
            if value is not None:
                args[key] = value
        return args

    def start_backup(self) -> None:
        self.cmd("blockdev-backup", self.backup_args())

    # -------------------------------------------------------------- steps
    def cmd(self, command: str, args: Mapping[str, Any] | None = None) -> Any:
        assert self.vm is not None
        return self.transcript.execute(self.vm, command, args)

    def wait(self, name: str, data: Mapping[str, Any] | None = None) -> dict[str, Any]:
        assert self.vm is not None
        event = self.vm.wait_event(name, data)
        self.transcript.event(event)
        return event

    def guest_write(self, offset: int, length: int = CHUNK, pattern: int = NEW) -> QemuIoResult:
        assert self.vm is not None
        result = self.vm.qemu_io(DEVICE, f"write -P {pattern:#x} {offset} {length}")
        self.transcript.log(f"guest write {pattern:#x} at {offset}+{length}: {result.output}")
        self.obs.guest_writes[offset] = result
        return result

    def guest_writes(self) -> None:
        for offset in GUEST_WRITES:
            self.guest_write(offset)

    def read_snapshot(self, offset: int, pattern: int = ORIGINAL) -> QemuIoResult:
        assert self.vm is not None
        result = self.vm.qemu_io("snapshot", f"read -P {pattern:#x} {offset} {CHUNK}",
                                 device=False)
        self.transcript.log(f"snapshot read at {offset}: {result.output}")
        self.obs.snapshot_reads[offset] = result
        return result

    def release_brake(self) -> None:
        self.cmd("block-job-set-speed", {"device": JOB, "speed": self.release_speed})

    def finish_job(self, *, ignore_errors_before_cancel: int = 3) -> JobOutcome:
        """Let the job run to its end, following its error policy; bounded throughout.

        sync=none never ends by itself: it is cancelled.  After an error the job is
        driven as a user would: ``stop`` -> resume once (it must pause again while
        the fault persists) -> cancel; ``ignore`` -> a few retries -> cancel.
        """
        assert self.vm is not None
        outcome = JobOutcome(end="running")
        if self.layout is Layout.BACKUP_SYNC_NONE:
            outcome.status_before_cancel = self.job_status()
            if outcome.status_before_cancel in (None, "aborting", "concluded", "null"):
                self._await_end(outcome)  # it ended by itself: nothing to cancel
            else:
                self._cancel(outcome)
        else:
            self.release_brake()
            self._follow(outcome, ignore_errors_before_cancel)
        self.vm.wait_job_status(JOB, "null")  # auto-dismissed: the stream is complete
        outcome.statuses = self._statuses()
        outcome.errors = [e["data"] for e in self.vm.events_named("BLOCK_JOB_ERROR",
                                                                  {"device": JOB})]
        self.obs.job = outcome
        self.transcript.log(f"job: {outcome.describe()}; statuses {outcome.statuses}")
        return outcome

    _ENDS = (("BLOCK_JOB_COMPLETED", {"device": JOB}), ("BLOCK_JOB_CANCELLED", {"device": JOB}),
             ("BLOCK_JOB_ERROR", {"device": JOB}))

    def _next_job_event(self) -> dict[str, Any]:
        assert self.vm is not None
        event = self.vm.wait_any_event(self._ENDS)
        if event["event"] != "BLOCK_JOB_ERROR" or event["data"] not in self._logged_errors:
            self.transcript.event(event)  # repeats of an ignored error are left out
            if event["event"] == "BLOCK_JOB_ERROR":
                self._logged_errors.append(event["data"])
        return event

    def _follow(self, outcome: JobOutcome, ignores: int) -> None:
        assert self.vm is not None
        resumed = False
        errors_seen = 0
        while True:
            event = self._next_job_event()
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

    def job_status(self) -> str | None:
        """The job's status as ``query-jobs`` has it (None once it is gone)."""
        assert self.vm is not None
        status = next((j["status"] for j in self.vm.cmd("query-jobs") if j["id"] == JOB), None)
        self.transcript.log(f"job status: {status or 'gone'}")
        return status

    def _cancel(self, outcome: JobOutcome) -> None:
        self.cmd("block-job-cancel", {"device": JOB, "force": True})
        self._await_end(outcome)

    def _await_end(self, outcome: JobOutcome) -> None:
        assert self.vm is not None
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
        assert self.vm is not None
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
        """Read the images (QEMU stopped) and fill in the data verdicts."""
        self.stop()
        im, obs = self.images, self.obs
        probed = GUEST_WRITES + UNTOUCHED
        obs.source_holds_new.update(im.holds_each(self.source, NEW, probed, CHUNK, "raw"))
        obs.source_holds_original.update(
            im.holds_each(self.source, ORIGINAL, probed, CHUNK, "raw"))
        if self.layout is Layout.BACKUP_SYNC_FULL:
            obs.backup_is_point_in_time = im.identical(self.target, self.original, "raw", "raw")
        elif self.layout is Layout.PUSH_FROM_SNAPSHOT and self.obs.job is not None:
            obs.backup_is_point_in_time = im.identical(self.backup, self.original, "raw", "raw")
        elif self.layout is Layout.BACKUP_SYNC_NONE:
            # A sync=none target holds only what the copy-before-write saved (zeros
            # elsewhere): the point-in-time image is the target over the source, as a
            # qcow2 target with the source as its backing file shows it.  So every region
            # the guest changed must be in the target; comparing the whole target with
            # the original data would be wrong.
            obs.backup_holds_original.update(
                im.holds_each(self.target, ORIGINAL, GUEST_WRITES, CHUNK, "raw"))
            obs.backup_is_point_in_time = all(
                obs.backup_holds_original[off] or obs.source_holds_original[off]
                for off in GUEST_WRITES)
        changed = [str(o) for o, v in obs.source_holds_new.items() if v]
        self.transcript.log(f"source holds new data at: {', '.join(changed) or 'nowhere'}")
        if obs.backup_is_point_in_time is not None:
            self.transcript.log(f"backup is point-in-time: {obs.backup_is_point_in_time}")
        if obs.backup_holds_original:
            self.transcript.log(f"target holds old data: {obs.backup_holds_original}")
        return obs


def run(scenario: Scenario, *, read_snapshot: bool = True) -> Observation:
    """The standard story: start, two guest writes, snapshot reads, job to its end, data.

    If QEMU stops answering, it is killed at once and :class:`QEMUUnresponsive` raised.
    """
    try:
        scenario.start()
        scenario.guest_writes()
        if read_snapshot and scenario.layout in (Layout.FLEECING, Layout.PUSH_FROM_SNAPSHOT):
            for off in GUEST_WRITES + UNTOUCHED:
                scenario.read_snapshot(off)
        if scenario.layout is not Layout.FLEECING:
            scenario.finish_job()
    except QEMUUnresponsive as exc:
        scenario.obs.unresponsive = exc.message
        scenario.abandon()
        raise
    return scenario.check_data()
