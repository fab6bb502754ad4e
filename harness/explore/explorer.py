"""The explorer: Hypothesis' stateful testing drives a real QEMU and the model side by side.

Each example draws a layout (fleecing, push backup from the snapshot, backup sync=none
or sync=full with its filter), an ``on-cbw-error`` value, a fault plan and the job's
error policies, builds a fresh graph (:class:`~harness.explore.rig.CbwRig`) in the
session's QEMU and starts the job (braked), then runs a drawn sequence of steps:
guest writes, write-zeroes and discards, snapshot reads, the job's speed, pause,
resume and cancel.  :class:`Example` runs each step on QEMU and on
:class:`~harness.explore.model.CbwModel` and compares at once; after every step the
source image is compared with the model's byte for byte, the job's status with the
model's, a backup's copied clusters with the point-in-time data, and QEMU must answer
QMP.  A disagreement raises :class:`Disagreement` (documented vs observed), which
Hypothesis shrinks to the shortest sequence that shows it; a known departure is
counted (:class:`Tally`) and ends the checks of that example.

Offsets and lengths are drawn as cluster numbers and sector counts: small values that
shrink to short, readable steps (a whole cluster; now and then a part of one, two
clusters, or a few bytes across a cluster boundary).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ..block.data import first_difference
from ..block.topology import Layout
from ..errors import CommandFailed, QEMUUnresponsive
from .model import (
    ANY_ERROR,
    ARMING_DELAYS,
    CLUSTER,
    CLUSTERS,
    CRUISE_SPEED,
    FAULT_ERRNOS,
    FAULT_SITES,
    JOB_POLICIES,
    ON_CBW_ERROR_VALUES,
    RELEASE_SPEEDS,
    SECTOR,
    CbwModel,
    Expected,
    FaultPlan,
    JobEvent,
    JobPlan,
    clusters_of,
    job_may_run,
    known_departure,
    original_image,
)
from .rig import LAYOUTS, CbwRig, ExploreSession

SECTORS_PER_CLUSTER = CLUSTER // SECTOR
BRAKED_LAYOUTS = (Layout.BACKUP_SYNC_FULL, Layout.PUSH_FROM_SNAPSHOT)


@dataclass(frozen=True)
class Step:
    """One step of a sequence, enough to run it again: ``write`` (of ``pattern``),
    ``write-zeroes``, ``discard``, ``read`` (of the snapshot), ``source-read`` (a
    qemu-io read of the source node: a drain), ``set-speed``
    (``value``), ``pause``, ``resume``, ``cancel``."""

    kind: str
    offset: int = 0
    length: int = 0
    pattern: int | None = None
    value: int = 0

    def describe(self) -> str:
        where = f"{self.offset}+{self.length}"
        return {
            "write": f"guest write {self.pattern or 0:#x} at {where}",
            "write-zeroes": f"guest write-zeroes at {where}",
            "discard": f"guest discard at {where}",
            "read": f"snapshot read at {where}",
            "source-read": f"qemu-io read of the source node at {where} (its end drains "
                           f"the filter and the job above)",
            "set-speed": f"block-job-set-speed {self.value}"
                         + (" (full speed)" if self.value == 0 else ""),
            "pause": "block-job-pause", "resume": "block-job-resume",
            "cancel": "block-job-cancel"}[self.kind]


@dataclass(frozen=True)
class Setting:
    """What an example draws before its steps."""

    layout: Layout
    on_cbw_error: str | None
    fault: FaultPlan
    job: JobPlan = field(default_factory=JobPlan)

    def describe(self) -> str:
        text = f"{self.layout.value}, on-cbw-error={self.on_cbw_error or 'omitted'}, " \
               f"{self.fault.describe()}"
        if self.layout in BRAKED_LAYOUTS:
            text += f", {self.job.describe()}, job started braked (speed 1, 64 KiB chunks)"
        return text


class GoalMet(Exception):
    """A run that hunts one known departure (:attr:`Focus.until`) met it: it stops."""


class Disagreement(AssertionError):
    """QEMU did not do what the model says it must, in this setting after these steps."""

    def __init__(self, message: str, setting: Setting, steps: list[Step]):
        lines = [setting.describe(), *(s.describe() for s in steps)]
        super().__init__(f"{message}\nsequence:\n  " + "\n  ".join(lines))
        self.problem = message
        self.setting = setting
        self.steps = list(steps)

    @property
    def layout(self) -> Layout:
        return self.setting.layout

    @property
    def on_cbw_error(self) -> str | None:
        return self.setting.on_cbw_error

    @property
    def fault(self) -> FaultPlan:
        return self.setting.fault


@dataclass
class KnownMet:
    """A recorded departure the explorer met (not a finding)."""

    departure: str
    step: str
    problem: str
    setting: Setting
    steps: list[Step] = field(default_factory=list)


@dataclass
class Tally:
    """What a run saw, across examples: for progress lines and the closing report."""

    examples: int = 0
    steps: int = 0
    known: list[KnownMet] = field(default_factory=list)
    unknown: int = 0  # examples the model stopped checking (CbwModel.unknown)
    layouts: Counter[Layout] = field(default_factory=Counter)  # examples per layout drawn


def _events_agree(expected: list[JobEvent], observed: list[JobEvent]) -> bool:
    if len(observed) < len([e for e in expected if e.kind != "spinning"]):
        return False
    for want, got in zip(expected, observed, strict=False):
        if want.kind == "spinning":
            return True
        if want.kind != got.kind or want.operation != got.operation or \
                want.action != got.action:
            return False
        if want.kind == "completed" and \
                (got.error is None if want.error == ANY_ERROR else want.error != got.error):
            return False
    return True


def _describe_events(events: list[JobEvent]) -> str:
    return ", then ".join(e.describe() for e in events) or "no event"


class Example:
    """One example: a rig and the model, step by step; raises :class:`Disagreement`
    for anything the model does not expect, records known departures in ``tally``."""

    def __init__(self, rig: CbwRig, setting: Setting, version: tuple[int, ...],
                 tally: Tally):
        self.rig = rig
        self.setting = setting
        self.version = version
        self.tally = tally
        self.model = CbwModel(setting.on_cbw_error, setting.fault, setting.layout.value,
                              setting.job)
        self.steps: list[Step] = []
        self.departed = False  # met a known departure: the model no longer applies
        self.unresponsive = False
        self.met: list[KnownMet] = []

    @property
    def layout(self) -> Layout:
        return self.setting.layout

    # -------------------------------------------------------------- verdicts
    def _disagree(self, problem: str) -> Disagreement:
        return Disagreement(problem, self.setting, self.steps)

    @property
    def settled(self) -> bool:
        """Nothing more to check: a known departure was met, or the model cannot
        say what comes next (counted once)."""
        if self.model.unknown is not None and not self.departed:
            self.departed = True
            self.tally.unknown += 1
        return self.departed

    def _departs(self, what: str, step: str, problem: str) -> None:
        """A disagreement: a known departure is counted (and the model stops there),
        anything else is raised."""
        if self.settled:
            return
        known = known_departure(self.layout.value, self.setting.on_cbw_error, what,
                                self.version, job=self.setting.job, speed=self.model.speed)
        if known is None:
            raise self._disagree(f"{step}: {problem}")
        self.departed = True
        met = KnownMet(known, step, problem, self.setting, list(self.steps))
        self.tally.known.append(met)
        self.met.append(met)

    def _check(self, step: Step, expected: Expected, error: str | None,
               data_ok: bool | None = None, *, what: str | None = None) -> None:
        if self.settled:
            return
        problem = None
        if error != expected.error:
            problem = (f"documented: {expected.error or 'success'} ({expected.why}); "
                       f"observed: {error or 'success'}")
        elif data_ok is False:
            problem = (f"documented: the point-in-time data ({expected.why}); "
                       f"observed: other data")
        if problem is not None:
            self._departs(what or step.kind, step.describe(), problem)

    def _check_job(self, step: str, expected: list[JobEvent]) -> None:
        if self.settled:
            return
        observed = self.rig.job_events(expected) if expected else []
        if self.settled or _events_agree(expected, observed):
            return
        why = next((e.why for e in expected if e.why), "")
        self._departs("job", step, f"documented: {_describe_events(expected)} ({why}); "
                                   f"observed: {_describe_events(observed)}")

    # ------------------------------------------------------------------ run
    def start(self) -> None:
        """Start the layout's job: sync=none runs; sync=full and push copy their first
        chunk, then wait for a release."""
        if not self.layout.has_job:
            return
        try:
            self.rig.start_job()
            if self.layout is Layout.BACKUP_SYNC_NONE:
                self.model.job_state = "running"
                return
            if self.model.job_start() and not self.rig.first_chunk_copied():
                self._departs("job", "blockdev-backup", "documented: the braked job copies "
                              "its first chunk without error; observed: it did not")
        except QEMUUnresponsive as exc:
            self._unresponsive("blockdev-backup", exc)

    def run(self, step: Step) -> None:
        if self.rig.dead or self.settled:
            return  # QEMU stopped answering, or nothing more to check: nothing to ask
        self.steps.append(step)
        self.tally.steps += 1
        try:
            self._run(step)
        except QEMUUnresponsive as exc:
            self._unresponsive(step.describe(), exc)
        except CommandFailed as exc:  # a job command refused: the job is not as modelled
            self.rig.job_present = self.rig.queried_job_status() is not None
            if not self.departed:
                self._departs("job", step.describe(), f"documented: the command is "
                              f"accepted (job {self.model.job_state}); observed: {exc}")

    def _unresponsive(self, step: str, exc: QEMUUnresponsive) -> None:
        """QEMU stopped answering: a finding (or the known livelock); it is killed and
        nothing more is asked of it."""
        self.unresponsive = True
        self.rig.abandon()
        problem = (f"documented: QEMU answers every QMP command; observed: "
                   f"{exc.message.splitlines()[0]}")
        if self.departed:
            return
        self._departs("unresponsive", step, problem)

    def _run(self, step: Step) -> None:
        drains = step.kind == "source-read" or \
            (step.kind in ("write", "write-zeroes", "discard", "read") and
             self.rig.device is None)
        self._run_step(step)
        if drains:  # once the request is done, as QEMU drains when the qemu-io ends
            self._check_job(f"the drain at the end of {step.describe()}",
                            self.model.drained())

    def _run_step(self, step: Step) -> None:
        rig, model = self.rig, self.model
        offset, length = step.offset, step.length
        if step.kind == "write":
            assert step.pattern is not None
            expected = model.guest_write(offset, length, step.pattern)
            self._check(step, expected, rig.guest_write(offset, length, step.pattern).error)
        elif step.kind == "write-zeroes":
            expected = model.guest_write(offset, length, 0, kind="write-zeroes")
            self._check(step, expected, rig.guest_write_zeroes(offset, length).error)
        elif step.kind == "discard":
            before = bytes(model.source[offset:offset + length])
            expected = model.guest_discard(offset, length)
            result = rig.guest_discard(offset, length)
            self._check(step, expected, result.error)
            if result.ok:  # each byte may hold its old data or read as zero
                actual = rig.source_bytes()[offset:offset + length]
                if actual == before or actual.count(0) == len(actual) or \
                        all(a in (b, 0) for a, b in zip(actual, before, strict=True)):
                    model.source[offset:offset + length] = actual
        elif step.kind == "read":
            self._read(step)
        elif step.kind == "source-read":
            expected = model.source_read(offset, length)
            data = expected.data or b""
            uniform = data[:1] * len(data) == data
            result = rig.source_read(offset, length, data[0] if uniform and data else None)
            verdict = result.pattern_reads([offset]) if uniform else None
            self._check(step, expected, result.error,
                        None if verdict is None else verdict[offset])
        elif step.kind == "set-speed":
            expected_events = model.job_set_speed(step.value)
            rig.set_speed(step.value)
            self._check_job(step.describe(), expected_events)
        elif step.kind == "pause":
            model.job_pause()
            status = rig.pause_job()
            if status != "paused" and not self.departed:
                self._departs("job", "block-job-pause", f"documented: the job pauses; "
                              f"observed: {status or 'gone'}")
        elif step.kind == "resume":
            expected_events = model.job_resume()
            rig.resume_job()
            self._check_job("block-job-resume", expected_events)
        elif step.kind == "cancel":
            self._cancel()

    def _read(self, step: Step) -> None:
        """A snapshot read, checked cluster by cluster (one read per cluster it spans:
        qemu-io checks one pattern per read)."""
        offset, length = step.offset, step.length
        image = original_image()
        spanned = list(clusters_of(offset, length))
        # Starts in a copied cluster and goes on into one not copied (a departure on
        # builds before 10.0: QEMU reads it all from the source).
        leaves_copied = spanned[0] in self.model.copied and \
            any(c not in self.model.copied for c in spanned[1:])
        for cluster in spanned:
            start = max(offset, cluster * CLUSTER)
            end = min(offset + length, (cluster + 1) * CLUSTER)
            expected = self.model.snapshot_read(offset, length)
            part = None if start == offset and end == offset + length else \
                (start - offset, end - start)
            result = self.rig.snapshot_read(offset, length, image[start], check=part)
            verdict = result.pattern_reads([offset])
            error = None if verdict is not None else result.error
            data_ok = None if verdict is None else verdict[offset]
            if leaves_copied and expected.error is None and (
                    (error is None and data_ok is False) or
                    (error is not None and self._source_fails_within(offset, length))):
                self._check(step, expected, error, data_ok, what="read-leaving-copied")
            else:
                self._check(step, expected, error, data_ok)
            if error is not None:
                break

    def _source_fails_within(self, offset: int, length: int) -> bool:
        """Does the fault strike source reads inside [offset, offset + length)?  Where a
        build reads a request that leaves a copied cluster all from the source, such a
        fault fails it: the same departure as the new data it returns otherwise."""
        fault = self.model.fault
        return fault.site == "source-read" and fault.strikes("source-read", offset, length)

    def _cancel(self) -> None:
        """A cancel ends the job, BLOCK_JOB_CANCELLED without error; a sync=none job
        whose snapshot broke should have failed already."""
        broken_sync_none = self.layout is Layout.BACKUP_SYNC_NONE and \
            not job_may_run(self.model)
        expected = self.model.job_cancel()
        event, error = self.rig.cancel_job()
        if self.departed:
            return
        ended = f"{event}" + (f" ({error})" if error else "")
        if broken_sync_none:
            if event == "BLOCK_JOB_CANCELLED" and not error:
                self._departs("job", "block-job-cancel", "documented: the job fails once "
                              "the snapshot broke; observed: a cancel ends it like a good "
                              "backup")
            return
        if event != "BLOCK_JOB_CANCELLED" or error:
            raise self._disagree(f"block-job-cancel: documented: {expected[0].describe()}; "
                                 f"observed: {ended}")

    # ----------------------------------------------------------- invariants
    # "QEMU never dies and always answers": every step is a QMP command, which raises
    # QEMUDied / QEMUUnresponsive (Machine's bounded waits) if it does not.
    def check_invariants(self) -> None:
        if self.settled or self.rig.dead:
            return
        try:
            self._job_status()
        except QEMUUnresponsive as exc:
            self._unresponsive("query-jobs", exc)
            return
        if not self.departed:
            self._backup_data()
        if not self.departed:
            self._source_data()

    def _job_status(self) -> None:
        if not self.layout.has_job:
            return
        model = self.model
        status = self.rig.job_status() if self.rig.job_present else None
        if self.rig.job_present and status != model_status(model):
            status = self.rig.queried_job_status()  # the events' word, checked by a query
        if self.layout is Layout.BACKUP_SYNC_NONE:
            if not self.rig.job_present:
                return
            if job_may_run(model) and status != model_status(model):
                raise self._disagree(f"query-jobs: documented: {model_status(model)} "
                                     f"(nothing broke); observed: {status or 'gone'}")
            if not job_may_run(model) and status == "running":
                self._departs("job", "query-jobs", "documented: the job fails once the "
                              "snapshot broke (break-snapshot); observed: still running")
            return
        if status != model_status(model):
            self._departs("job", "query-jobs", f"documented: job {model_status(model) or 'gone'}"
                          f" ({model.job_state}); observed: {status or 'gone'}")

    def _backup_data(self) -> None:
        """What the copy-before-write saved, and what a job copied, is the point-in-time
        data; a job that completed without error holds all of it.  (Fleecing checks its
        target through snapshot reads; a sync=full job's copies after its snapshot
        broke are not promised: the job must fail, which its events say.)"""
        if self.layout is Layout.FLEECING:
            return
        image = original_image()
        if self.layout is Layout.PUSH_FROM_SNAPSHOT:
            role, clusters = "backup", self.model.job_done
        else:
            role, clusters = "target", self.model.copied - self.model.after_break
        data = self.rig.image_bytes(role)
        for cluster in sorted(clusters):
            span = slice(cluster * CLUSTER, (cluster + 1) * CLUSTER)
            if data[span] != image[span]:
                self._departs("data", f"{role} image", f"documented: cluster {cluster} holds "
                              f"the point-in-time data, it was copied; observed: other data")
                return

    def _source_data(self) -> None:
        actual = self.rig.source_bytes()
        first = first_difference(actual, self.model.source)
        if first is not None:
            raise self._disagree(
                f"source image differs from the documented data at byte {first} "
                f"(documented {self.model.source[first]:#x}, observed {actual[first]:#x})")


def model_status(model: CbwModel) -> str | None:
    """The status ``query-jobs`` must show for the model's job (None: gone)."""
    return {"braked": "running", "running": "running", "spinning": "running",
            "paused": "paused"}.get(model.job_state)


# --------------------------------------------------------------- drawing
def fault_plans() -> st.SearchStrategy[FaultPlan]:
    """A fault four times in five, on a cluster a braked job has not copied first most
    often (1, 2, 3; then 0; then any offset); armed at once half the time, else after
    1-3 requests of its site.  Hypothesis draws the first of a list most often, so each
    list starts with what makes a copy-before-write fail while the job waits."""
    return st.builds(FaultPlan,
                     site=st.sampled_from((*FAULT_SITES, *FAULT_SITES, None)),
                     cluster=st.sampled_from((*range(1, CLUSTERS), 0, None)),
                     once=st.booleans(), errno=st.sampled_from(FAULT_ERRNOS),
                     after=st.sampled_from((0, *ARMING_DELAYS)))


@st.composite
def ranges(draw: st.DrawFn) -> tuple[int, int]:
    """Mostly a whole cluster; one time in four a sector-aligned part of one; one in
    eight two whole clusters; one in eight a few bytes across a cluster boundary,
    unaligned."""
    # Cluster 0 last: a braked job copies it first (drawn first, it would be drawn most).
    cluster = draw(st.sampled_from((*range(1, CLUSTERS), 0)))
    shape = draw(st.integers(0, 7))
    if shape in (1, 2):
        first = draw(st.integers(0, SECTORS_PER_CLUSTER - 1))
        count = draw(st.integers(1, SECTORS_PER_CLUSTER - first))
        return cluster * CLUSTER + first * SECTOR, count * SECTOR
    if shape == 3 and cluster < CLUSTERS - 1:
        return cluster * CLUSTER, 2 * CLUSTER
    if shape == 4 and cluster < CLUSTERS - 1:
        before = draw(st.integers(1, 2 * SECTOR))
        after = draw(st.integers(1, 2 * SECTOR))
        return (cluster + 1) * CLUSTER - before, before + after
    return cluster * CLUSTER, CLUSTER


@dataclass(frozen=True)
class Focus:
    """What the explorer draws its settings from: by default everything; a run may
    narrow it to the setting a recorded departure names (its layout, ``on-cbw-error``
    value, job policy) and leave the fault plan and the steps to the drawing."""

    layouts: tuple[Layout, ...] = LAYOUTS
    values: tuple[str | None, ...] = ON_CBW_ERROR_VALUES
    source_policies: tuple[str | None, ...] = JOB_POLICIES
    until: str | None = None  # stop (GoalMet) once this known departure is met


class CbwExplorer(RuleBasedStateMachine):
    """Set :attr:`session` (and :attr:`tally`) before running it."""

    session: ClassVar[ExploreSession]
    tally: ClassVar[Tally] = Tally()
    focus: ClassVar[Focus] = Focus()
    goal_met: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.example: Example | None = None
        self.writes = 0
        self.requests = 0  # guest requests so far in this example

    # --------------------------------------------------------------- set-up
    @initialize(fault=fault_plans(), data=st.data())
    def build_graph(self, fault: FaultPlan, data: st.DataObject) -> None:
        self._goal()
        layout = data.draw(st.sampled_from(self.focus.layouts), label="layout")
        values = self.focus.values
        if layout.uses_backup_on_cbw_error and not self.session.backup_on_cbw_error:
            values = (None,)  # before 10.1 blockdev-backup has no on-cbw-error
        on_cbw_error = data.draw(st.sampled_from(values), label="on_cbw_error")
        job = JobPlan()
        if layout in BRAKED_LAYOUTS:
            job = JobPlan(data.draw(st.sampled_from(self.focus.source_policies),
                                    label="on_source_error"),
                          data.draw(st.sampled_from(JOB_POLICIES), label="on_target_error"))
        self.tally.examples += 1
        self.tally.layouts[layout] += 1
        setting = Setting(layout, on_cbw_error, fault, job)
        rig = self.session.new_rig(on_cbw_error, fault, layout=layout, job=job)
        self.example = Example(rig, setting, self.session.version, self.tally)
        self.example.start()
        self._goal()

    def teardown(self) -> None:
        if self.example is not None:
            self.example.rig.close()

    def _live(self) -> Example | None:
        """The example, while its QEMU answers."""
        if self.example is None or self.example.rig.dead:
            return None
        return self.example

    def _step(self, step: Step) -> None:
        example = self._live()
        if example is None:
            return
        example.run(step)
        self._goal()

    def _goal(self) -> None:
        """Stop a hunt that met its departure.  Hypothesis runs a failing example once
        more before it reports it: that run stops here at once (and at the same place:
        the same failure), without meeting it again at its cost (a livelock's 2 s)."""
        if self.focus.until is None:
            return
        if self.example is not None and \
                any(k.departure == self.focus.until for k in self.example.met):
            type(self).goal_met = True
        if self.goal_met:
            raise GoalMet(self.focus.until)

    # ---------------------------------------------------------------- steps
    # Three rules, each drawing its kind: with one rule per kind, Hypothesis (which
    # picks rules evenly) would spend most steps on guest I/O and end most jobs early.
    @rule(data=st.data(), where=ranges())
    def guest_request(self, data: st.DataObject, where: tuple[int, int]) -> None:
        """A write (two times in five), a write-zeroes, (fleecing layouts, which pass
        discards down) a discard, or a graph change that drains: a qemu-io read of the
        source node, whose temporary BlockBackend drains the source's parents (the
        copy-before-write filter, the job) when it goes."""
        example = self._live()
        if example is None:
            return
        kinds = ["write", "write", "write-zeroes",
                 "discard" if example.layout.has_snapshot else "write", "source-read"]
        kind = data.draw(st.sampled_from(kinds), label="request")
        self.requests += 1
        if kind == "write":
            self.writes += 1
            # A new byte per write: stale data shows.
            self._step(Step("write", *where, pattern=0x80 + self.writes))
        else:
            self._step(Step(kind, *where))

    @precondition(lambda self: self.example is not None and self.example.layout.has_snapshot)
    @rule(where=ranges())
    def snapshot_read(self, where: tuple[int, int]) -> None:
        self._step(Step("read", *where))

    # The model's word, not QEMU's: a precondition that followed QEMU's timing would
    # make Hypothesis draw differently when it runs an example again (Flaky).
    @precondition(lambda self: self.example is not None and self.example.model.job_present
                  and self.requests > 0)
    @rule(data=st.data())
    def job_control(self, data: st.DataObject) -> None:
        """Release the job (a speed change; most often), pause or resume it, cancel it
        (least often: it ends the story).  Not before the first guest request: a job
        released or cancelled before any copy-before-write tests none (and such
        sequences, drawn most often otherwise, crowd out the ones that do), and a
        pause and resume before it only cost time."""
        example = self._live()
        if example is None:
            return
        model = example.model
        kinds = []
        if example.layout in BRAKED_LAYOUTS and model.job_state in ("braked", "paused",
                                                                      "spinning"):
            kinds += ["set-speed", "set-speed", "set-speed"]
        if model.job_state in ("braked", "running", "spinning"):
            kinds.append("pause")
        if model.job_state == "paused" and not model.floods(model.speed, resume=True):
            kinds.append("resume")
        kinds.append("cancel")
        kind = data.draw(st.sampled_from(kinds), label="job")
        if kind != "set-speed":
            self._step(Step(kind))
            return
        speed = data.draw(st.sampled_from(RELEASE_SPEEDS), label="speed")
        if model.floods(speed):
            speed = CRUISE_SPEED  # see CbwModel.floods
        self._step(Step("set-speed", value=speed))

    # ----------------------------------------------------------- invariants
    @invariant()
    def qemu_agrees_with_the_model(self) -> None:
        example = self._live()
        if example is None:
            return
        example.check_invariants()
        self._goal()
