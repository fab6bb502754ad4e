"""copy-before-write ``cbw-timeout``: a fleecing layout whose copies are slowed by a throttle.

Layout (:class:`~harness.block.topology.Topology`; the filters built over QMP, so the
transcript shows them)::

    scsi-hd disk0 --> copy-before-write "cbw" --file--> raw "source"
                            |  \\--target--> throttle "throttled-target" (group tg0)
                            |                    --file--> raw "target"
                      snapshot-access "snapshot" (read with qemu-io)

Unlike the other scenarios, the guest writes go through a device (``qemu-io -d``), not
HMP ``qemu-io`` on the node: on a node, qemu-io makes a BlockBackend for the one
command and releases it after, and the release drains the node, which waits for the
timed-out copy still running in the background: the write would seem to take as long
as the whole copy.  A device's BlockBackend stays.

A guest write first copies the old data of the region to the target.  The target
write is throttled (``throttle-group`` ``tg0``, ``bps-write``), so the copy takes a
time that follows from its size; ``cbw-timeout`` either fires or not.

How long a copy takes, deterministically
----------------------------------------
block-copy splits a copy into tasks of at most :data:`COPY_TASK` (1 MiB, its
``BLOCK_COPY_MAX_BUFFER``) and runs them in parallel; each task's target write is
one request to the throttle.  QEMU's throttle (no ``bps-write-max``) admits a request
at once while its bucket holds at most ``rate / 10`` bytes, then adds the request's
bytes to the bucket, which leaks at ``rate``.  So on a fresh bucket the first task
is free and every further task waits ``COPY_TASK / rate``: a copy of ``n`` tasks takes
about ``(n - 1) * COPY_TASK / rate - 0.1`` s, and never less (the throttle's timers
can only fire late).  Two consequences the plan relies on:

* a copy of a single task costs nothing on a fresh bucket, so every planned copy
  spans at least two tasks;
* the target must not limit ``max_transfer``: the copy-before-write node inherits
  it, and the block layer then splits a guest write into sequential pieces, each
  with its own copy and its own timeout (a 64 KiB limit on the target makes a
  multi-second copy of 512 KiB never time out with ``cbw-timeout=1``, because each
  64 KiB piece copies in 0.2 s).  Plain raw images on ``file`` have no limit.

:class:`TimeoutPlan` picks the rate and two write sizes for a timeout ``T``: the
*under* write's copy needs about 30 % of ``T``, the *over* write's at least 3 ``T``.

A timed-out copy is not cancelled: it goes on in the background and keeps the
throttle busy.  :meth:`TimeoutFleecing.lift_throttle` removes the limit with
``qom-set tg0 limits {"bps-write": 0}`` (0 is "unlimited"; an empty ``limits`` changes
nothing, since absent members keep their value): the throttle timer already armed
still fires at its time (at most one task interval later), then the queued copy
requests all go through.

Cases, driven together
----------------------
A case (:class:`TimeoutCase`) is almost all waiting: for throttled copies and for the
timeout.  Its steps follow from the case alone, never from what QEMU answers, so a case
can be driven to its end first and judged after, from its record (:class:`TimeoutRun`).
:func:`drive_together` drives several cases at once, each on its own QEMU, in its own
folder and thread: they cost as long as the longest, not their sum.
"""

from __future__ import annotations

import json
import math
import pickle
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..block.data import NEW, ORIGINAL, MiB
from ..block.images import Images
from ..block.topology import SCENARIO_DEVICE, Layout, Topology, guest_device
from ..errors import HarnessError
from ..qemu.machine import COMMAND_TIMEOUT, Launcher, Machine
from ..qemu.qemu_io import QemuIoResult
from ..qemu.transcript import Transcript, path_filter
from .cbw import value_id

COPY_TASK = 1 * MiB          # block-copy's largest task (BLOCK_COPY_MAX_BUFFER)
THROTTLE_BURST_S = 0.1       # a fresh throttle bucket admits rate/10 bytes at once
IMAGE_SIZE = 32 * MiB

# Guest-written regions: A takes the under-the-timeout write, B the over-the-timeout
# one, C a follow-up write; U is never written.
REGION_A = 0
REGION_B = 4 * MiB
REGION_C = 16 * MiB
REGION_U = 28 * MiB
MAX_OVER = REGION_C - REGION_B          # 12 MiB, so B and C never overlap

UNDER_SHARE = 0.3            # the under write's copy needs ~30 % of the timeout
OVER_SHARE = 3.0             # the over write's copy needs >= 3x the timeout

T = TypeVar("T")


# ----------------------------------------------------------------- timing
class Timing:
    """How a guest write's duration compares with the timeout (the words logged)."""

    IMMEDIATE = "immediate"                 # no copy waited on
    BEFORE = "before the timeout"           # a real copy, finished in time
    AT = "at the timeout"                   # returned when the timeout fired
    AFTER = "after the timeout"             # ran past the timeout (no timeout fired)


@dataclass(frozen=True)
class TimeoutPlan:
    """Throttle rate and write sizes for one ``cbw-timeout`` value (seconds).

    The margins are wide on purpose: the under write's copy needs ``UNDER_SHARE``
    of the timeout, the over write's at least ``OVER_SHARE`` times it, and the
    accepted window for "at the timeout" is ``[T - EARLY, T + slack]``.
    """

    timeout: int

    EARLY = 0.05             # clock granularity; the timer cannot fire before T

    @property
    def task_interval(self) -> float:
        """Seconds the throttle holds each task after the first."""
        return UNDER_SHARE * self.timeout + THROTTLE_BURST_S

    @property
    def rate(self) -> int:
        """``bps-write`` of the throttle group (bytes/s)."""
        return int(COPY_TASK / self.task_interval)

    @property
    def under_size(self) -> int:
        return 2 * COPY_TASK

    @property
    def over_size(self) -> int:
        tasks = math.ceil((OVER_SHARE * self.timeout + THROTTLE_BURST_S)
                          / self.task_interval) + 1
        size = tasks * COPY_TASK
        assert size <= MAX_OVER, f"over write of {size} bytes does not fit region B"
        return size

    @property
    def control_size(self) -> int:
        """A write whose copy needs a second more than the latest a timed-out write may
        return (``T + slack``): without a timeout it must wait that long; a timeout would
        have cut it short.  (Smaller than ``over_size``: the control waits less.)"""
        tasks = math.ceil((self.timeout + self.slack + 1 + THROTTLE_BURST_S)
                          * self.rate / COPY_TASK) + 1
        return tasks * COPY_TASK

    def copy_seconds(self, size: int) -> float:
        """The least time the copy of ``size`` bytes takes on a fresh bucket."""
        tasks = math.ceil(size / COPY_TASK)
        return max(0.0, (tasks - 1) * COPY_TASK / self.rate - THROTTLE_BURST_S)

    @property
    def slack(self) -> float:
        """How late after the timeout a timed-out write may return."""
        return max(1.0, 0.25 * self.timeout)

    @property
    def immediate(self) -> float:
        """Below this a write waited on no copy."""
        return 0.2 * self.timeout

    def classify(self, seconds: float) -> str:
        if seconds < self.immediate:
            return Timing.IMMEDIATE
        if seconds < self.timeout - self.EARLY:
            return Timing.BEFORE
        if seconds <= self.timeout + self.slack:
            return Timing.AT
        return Timing.AFTER

    @property
    def command_timeout(self) -> float:
        """QMP limit for one HMP qemu-io: even a copy that never times out ends in it."""
        return max(COMMAND_TIMEOUT, self.copy_seconds(self.over_size) + self.timeout + 30)

    def check_margins(self) -> None:
        """The plan's own promise: under <= 40 % of T, over >= 200 % of T + slack."""
        under = self.copy_seconds(self.under_size)
        over = self.copy_seconds(self.over_size)
        assert self.immediate < under <= 0.4 * self.timeout, (under, self.timeout)
        assert over >= max(2 * self.timeout, self.timeout + self.slack + 1), (over, self.timeout)

    def describe(self) -> str:
        return (f"throttle {self.rate} B/s; under write {self.under_size // MiB} MiB "
                f"(copy >= {self.copy_seconds(self.under_size):.1f} s), over write "
                f"{self.over_size // MiB} MiB (copy >= {self.copy_seconds(self.over_size):.1f} s)")


@dataclass
class TimedWrite:
    """One guest write: what qemu-io said and how long it took (wall clock)."""

    offset: int
    size: int
    result: QemuIoResult
    seconds: float
    timing: str

    @property
    def ok(self) -> bool:
        return self.result.ok

    @property
    def error(self) -> str | None:
        return self.result.error


class CaseError(HarnessError):
    """What a case's run raised, where the exception itself cannot be pickled (a
    :class:`~harness.errors.CommandFailed`): its type and message."""


@dataclass
class TimeoutRun:
    """What one run of the layout saw (picklable: a shared run's outcome).

    The ``written`` / ``snapshot_read`` / ``holds_*`` accessors return a step's record,
    or raise what ended the run before that step (:attr:`error`): a verdict read in the
    order of the steps meets the failure where the run met it.
    """

    on_cbw_error: str | None
    cbw_timeout: int | None
    plan: TimeoutPlan
    writes: dict[str, TimedWrite] = field(default_factory=dict)        # by label
    reads: dict[str, QemuIoResult] = field(default_factory=dict)       # by label
    read_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)  # (offset, size)
    source_holds_new: dict[str, bool] = field(default_factory=dict)
    source_holds_original: dict[str, bool] = field(default_factory=dict)
    transcript: list[str] = field(default_factory=list)  # the lines, filtered
    error: BaseException | None = None                   # what ended the run early

    def durations(self) -> dict[str, float]:
        return {label: round(w.seconds, 3) for label, w in self.writes.items()}

    def fail(self, exc: BaseException, case: str) -> None:
        """Record what ended the run (the first only), with where it was raised."""
        if self.error is not None:
            return
        try:
            kept = pickle.loads(pickle.dumps(exc))
        except Exception:
            kept = CaseError(f"{type(exc).__name__}: {exc}")
        trace = "".join(traceback.format_exception(exc)).rstrip()
        kept.add_note(f"raised in the run of case {case}:\n{trace}")
        self.error = kept

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def _step(self, records: Mapping[str, T], label: str, what: str) -> T:
        if label not in records:
            self.raise_error()
            raise KeyError(f"the run has no {what} {label!r}: not a step of this case")
        return records[label]

    def written(self, label: str) -> TimedWrite:
        return self._step(self.writes, label, "guest write")

    def snapshot_read(self, label: str) -> QemuIoResult:
        return self._step(self.reads, label, "snapshot read")

    def holds_new(self, label: str) -> bool:
        """After the run, with QEMU stopped: the source holds the guest's data there."""
        return self._step(self.source_holds_new, label, "source region")

    def holds_original(self, label: str) -> bool:
        return self._step(self.source_holds_original, label, "source region")


# ----------------------------------------------------------------- layout
class TimeoutFleecing:
    """The throttled-target fleecing layout on one machine, with timed guest writes."""

    def __init__(self, launch_vm: Callable[..., Machine], images: Images, *,
                 plan: TimeoutPlan, on_cbw_error: str | None = None,
                 cbw_timeout: int | None = None, transcript: Transcript | None = None,
                 name: str = "vm"):
        self.launch_vm = launch_vm
        self.name = name  # the machine's name, and its files'
        self.images = images
        self.plan = plan
        self.on_cbw_error = on_cbw_error
        self.cbw_timeout = cbw_timeout
        self.transcript = transcript or Transcript()
        self.transcript.add_filter(path_filter(images.folder))
        self.run = TimeoutRun(on_cbw_error, cbw_timeout, plan)
        self.vm: Machine | None = None
        # No blkdebug and no max-transfer: see the module docstring.
        self.topology = Topology(Layout.FLEECING, images.folder, on_cbw_error=on_cbw_error,
                                 cbw_timeout=cbw_timeout, fault=None, throttle_bps=plan.rate)
        self.source = self.topology.image("source")
        self.target = self.topology.image("target")

    # ---------------------------------------------------------- set-up
    def launch(self) -> Machine:
        """Images and QEMU with the raw ``source`` and ``target`` nodes, nothing more."""
        self.images.create(self.source.name, IMAGE_SIZE, "raw")
        self.images.write(self.source, ORIGINAL, 0, IMAGE_SIZE, "raw")
        self.images.create(self.target.name, IMAGE_SIZE, "raw")
        controller, _ = self._device()
        # -S: no firmware runs.  A running SeaBIOS probes and resets the SCSI disk, and
        # that reset drains the disk, waiting (vCPU holding the BQL: QMP too) for a
        # timed-out copy still running behind the throttle: under CPU load the reset
        # came late enough to stall a write or query-status ~5 s (bench/monitor_stall.py).
        args = ["-S", "-device", json.dumps(controller)]
        for node in self.topology.image_nodes():
            args += ["-blockdev", json.dumps(node)]
        self.vm = self.launch_vm(args, name=self.name,
                                 command_timeout=self.plan.command_timeout)
        return self.vm

    def _device(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The SCSI controller and the disk on the copy-before-write node."""
        controller, device = guest_device("virtio-scsi", SCENARIO_DEVICE,
                                          self.topology.device_node)
        assert controller is not None
        return controller, device

    def start(self) -> Machine:
        """Launch, then build the layout."""
        self.launch()
        return self.build()

    def build(self) -> Machine:
        """On the launched QEMU: throttle group and node, CBW, snapshot, disk."""
        timeout = (f"cbw-timeout={self.cbw_timeout}" if self.cbw_timeout is not None
                   else "cbw-timeout unset")
        self.transcript.log(f"=== fleecing, throttled target, on-cbw-error="
                            f"{value_id(self.on_cbw_error)}, {timeout}; sizes planned for "
                            f"{self.plan.timeout} s: {self.plan.describe()} ===")
        self.cmd("object-add", self.topology.throttle_group())
        for node in self.topology.filter_nodes():
            self.cmd("blockdev-add", node)
        self.cmd("device_add", self._device()[1])
        assert self.vm is not None
        return self.vm

    # ------------------------------------------------------------ steps
    def cmd(self, command: str, args: Mapping[str, Any] | None = None) -> Any:
        assert self.vm is not None
        return self.transcript.execute(self.vm, command, args)

    def write(self, label: str, offset: int, size: int, *, log_timing: bool = True
              ) -> TimedWrite:
        """A guest write through the device, timed from the HMP request to its reply."""
        assert self.vm is not None
        start = time.monotonic()
        result = self.vm.qemu_io(SCENARIO_DEVICE, f"write -P {NEW:#x} {offset} {size}")
        seconds = time.monotonic() - start
        timed = TimedWrite(offset, size, result, seconds, self.plan.classify(seconds))
        line = f"guest write {label} ({NEW:#x} at {offset}+{size}): {result.output}"
        if log_timing:  # the class only: the transcript carries no timings
            line += f"\n  returned: {timed.timing}"
        self.transcript.log(line)
        self.run.writes[label] = timed
        return timed

    def read_snapshot(self, label: str, offset: int, size: int) -> QemuIoResult:
        """Read the point-in-time view; it must still hold the original data."""
        assert self.vm is not None
        result = self.vm.qemu_io(self.topology.snapshot_node,
                                 f"read -P {ORIGINAL:#x} {offset} {size}", device=False)
        self.transcript.log(f"snapshot read {label} ({offset}+{size}): {result.output}")
        self.run.reads[label] = result
        self.run.read_ranges[label] = (offset, size)
        return result

    def lift_throttle(self) -> None:
        """Remove the limit: background copies that outlived their timeout can finish."""
        self.cmd("qom-set", {"path": self.topology.group, "property": "limits",
                             "value": {"bps-write": 0}})

    def stop(self) -> None:
        if self.vm is not None:
            self.vm.shutdown()

    def kill(self) -> None:
        """SIGKILL QEMU, from any thread: a wait on it, in whichever thread, ends at once."""
        if self.vm is not None:
            self.vm.kill()

    def check_source(self, regions: Mapping[str, tuple[int, int]]) -> TimeoutRun:
        """With QEMU stopped: which regions of the source hold the guest's data."""
        self.stop()
        for label, (offset, size) in regions.items():
            self.run.source_holds_new[label] = self.images.holds(self.source, NEW, offset,
                                                                 size, "raw")
            self.run.source_holds_original[label] = self.images.holds(
                self.source, ORIGINAL, offset, size, "raw")
        changed = [label for label, v in self.run.source_holds_new.items() if v]
        self.transcript.log(f"source holds the guest's data in: {', '.join(changed) or 'none'}")
        return self.run


# ------------------------------------------------------------------ cases
@dataclass(frozen=True)
class TimeoutCase:
    """One run of the layout, named (its machine and folder take the name).

    The timeout run: write A under the timeout and read it from the snapshot; write B
    over it; ``follow_up``: write C over it too; lift the throttle and read A, B, (C)
    and the never-written U from the snapshot; ``retry``: write B again and read it (a
    guest retrying its failed write).  The control (``control``): write A under the
    timeout, then B of :attr:`TimeoutPlan.control_size`, lift the throttle, read A, B,
    U.  Both end with QEMU stopped and the source's regions checked.
    """

    name: str
    plan: TimeoutPlan
    on_cbw_error: str | None = None
    cbw_timeout: int | None = None
    follow_up: bool = False
    retry: bool = False
    control: bool = False

    def regions(self) -> dict[str, tuple[int, int]]:
        """The source regions checked after the run: (offset, size) by label."""
        plan = self.plan
        if self.control:
            return {"A": (REGION_A, plan.under_size), "B": (REGION_B, plan.control_size)}
        regions = {"A": (REGION_A, plan.under_size), "B": (REGION_B, plan.over_size),
                   "U": (REGION_U, 1 * MiB)}
        if self.follow_up:
            regions["C"] = (REGION_C, plan.over_size)
        return regions


def _timeout_steps(f: TimeoutFleecing, case: TimeoutCase) -> None:
    plan = f.plan
    f.build()
    f.write("A (under)", REGION_A, plan.under_size)
    f.read_snapshot("A", REGION_A, plan.under_size)
    f.write("B (over)", REGION_B, plan.over_size)
    if case.follow_up:
        f.write("C (follow-up)", REGION_C, plan.over_size)
    f.lift_throttle()
    reads = [("A again", REGION_A, plan.under_size), ("B", REGION_B, plan.over_size)]
    if case.follow_up:
        reads.append(("C", REGION_C, plan.over_size))
    reads.append(("U (never written)", REGION_U, 1 * MiB))
    for label, offset, size in reads:
        f.read_snapshot(label, offset, size)
    if case.retry:
        f.write("B (retry)", REGION_B, plan.over_size, log_timing=False)
        f.read_snapshot("B after the retry", REGION_B, plan.over_size)
    f.check_source(case.regions())


def _control_steps(f: TimeoutFleecing, case: TimeoutCase) -> None:
    plan = f.plan
    f.build()
    f.write("A (under)", REGION_A, plan.under_size)
    f.write("B (over)", REGION_B, plan.control_size)
    f.lift_throttle()
    for label, offset, size in (("A", REGION_A, plan.under_size),
                                ("B", REGION_B, plan.control_size),
                                ("U (never written)", REGION_U, 1 * MiB)):
        f.read_snapshot(label, offset, size)
    f.check_source(case.regions())


def _drive(f: TimeoutFleecing, case: TimeoutCase, done: threading.Event) -> None:
    """A case's steps (QEMU already launched), in its own thread: what raises ends them
    and is recorded; QEMU is stopped in every case, by this thread (its event loop's)."""
    try:
        (_control_steps if case.control else _timeout_steps)(f, case)
    except BaseException as exc:
        f.run.fail(exc, case.name)
    finally:
        try:
            f.stop()
        except BaseException as exc:
            f.run.fail(exc, case.name)
        done.set()


# A killed QEMU ends its case's wait at once (its pidfd): the thread is done in well
# under this, disconnecting included.
_KILLED_CASE_GRACE = 15.0


def drive_together(cases: Sequence[TimeoutCase], launch: Launcher, images: Images
                   ) -> dict[str, TimeoutRun]:
    """Every case to its end, all at once: each in a folder ``<case.name>`` of
    ``images.folder``, with its own QEMU (``launch``'s options, in that folder), its own
    transcript and its own thread.  Returns each case's record by name; what a case
    raised is in its record, not raised.  Every QEMU is gone on return, or on any
    exception (a Ctrl-C comes to this thread only: it kills them, so that the threads
    waiting on them end too).

    The machines are launched here, one after another, not in the threads: where the
    host's setpriv lacks ``--pdeathsig``, QEMU gets its parent-death signal from a
    ``preexec_fn``, which Python documents as unsafe where other threads run.  A case's
    end is an Event, not ``Thread.join()``: a join that a Ctrl-C interrupts may mark a
    running thread as stopped (CPython 3.11).
    """
    fleecings: list[tuple[TimeoutCase, TimeoutFleecing]] = []
    for case in cases:
        folder = images.folder / case.name
        folder.mkdir(parents=True, exist_ok=True)
        fleecings.append((case, TimeoutFleecing(
            Launcher(launch.build, folder, defaults=launch.defaults, on_start=launch.on_start),
            Images(images.build, folder), plan=case.plan, on_cbw_error=case.on_cbw_error,
            cbw_timeout=case.cbw_timeout, name=case.name)))
    running: dict[str, threading.Event] = {}  # set when the case's thread is done
    try:
        for case, f in fleecings:
            try:
                f.launch()
            except Exception as exc:
                f.run.fail(exc, case.name)
        for case, f in fleecings:
            if f.run.error is None:
                running[case.name] = threading.Event()
                threading.Thread(target=_drive, args=(f, case, running[case.name]),
                                 name=f"cbw-timeout {case.name}", daemon=True).start()
        for done in running.values():
            done.wait()
    except BaseException:
        for _, f in fleecings:
            f.kill()
        for done in running.values():
            done.wait(_KILLED_CASE_GRACE)
        raise
    finally:
        for case, f in fleecings:
            if case.name not in running or running[case.name].is_set():
                try:
                    f.stop()  # done already, unless the case never got its thread
                except Exception as exc:
                    f.run.fail(exc, case.name)
            f.run.transcript = list(f.transcript.lines)
    return {case.name: f.run for case, f in fleecings}
