"""The explorer: Hypothesis' stateful testing drives a real QEMU and the model side by side.

Each example draws a layout (fleecing, or backup sync=none with its filter), an
``on-cbw-error`` value and a fault plan, builds a fresh graph
(:class:`~harness.explore.rig.CbwRig`) in the session's QEMU, then runs a drawn
sequence of guest writes, snapshot reads (fleecing) and a cancel (sync=none).  Every
step is checked against :class:`~harness.explore.model.FleecingModel` at once; after
every step the source image is compared with the model's byte for byte (a sync=none
target's copied clusters with the point-in-time data, and its job's status), and QEMU
must answer QMP.  A disagreement raises :class:`Disagreement` (documented vs
observed), which Hypothesis shrinks to the shortest sequence that shows it.

Offsets and lengths are drawn as cluster numbers and sector counts: small values that
shrink to short, readable steps (a whole cluster, now and then a sector-aligned part).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ..block.topology import Layout
from .model import (
    CLUSTER,
    CLUSTERS,
    FAULT_ERRNOS,
    FAULT_SITES,
    ON_CBW_ERROR_VALUES,
    SECTOR,
    Expected,
    FaultPlan,
    FleecingModel,
    job_may_run,
    known_departure,
    original_pattern,
)
from .rig import LAYOUTS, CbwRig, ExploreSession

SECTORS_PER_CLUSTER = CLUSTER // SECTOR


@dataclass(frozen=True)
class Step:
    """One step of a sequence, enough to run it again: ``write`` (of ``pattern``) or
    ``read`` (expecting ``pattern``; None: expecting an error)."""

    kind: str
    offset: int
    length: int
    pattern: int | None

    def describe(self) -> str:
        if self.kind == "write":
            return f"guest write {self.pattern:#x} at {self.offset}+{self.length}"
        if self.kind == "read":
            return f"snapshot read at {self.offset}+{self.length}"
        return {"job-status": "query-jobs", "cancel": "block-job-cancel"}[self.kind]


class Disagreement(AssertionError):
    """QEMU did not do what the model says it must, in this setting after these steps."""

    def __init__(self, message: str, layout: Layout, on_cbw_error: str | None,
                 fault: FaultPlan, steps: list[Step]):
        lines = [describe(layout, on_cbw_error, fault), *(s.describe() for s in steps)]
        super().__init__(f"{message}\nsequence:\n  " + "\n  ".join(lines))
        self.problem = message
        self.layout = layout
        self.on_cbw_error = on_cbw_error
        self.fault = fault
        self.steps = list(steps)


@dataclass
class KnownMet:
    """A recorded departure the explorer met (not a finding)."""

    departure: str
    step: str


@dataclass
class Tally:
    """What a run saw, across examples: for progress lines and the closing report."""

    examples: int = 0
    steps: int = 0
    known: list[KnownMet] = field(default_factory=list)


def fault_plans() -> st.SearchStrategy[FaultPlan]:
    no_fault = st.just(FaultPlan())
    faults = st.builds(FaultPlan, site=st.sampled_from(FAULT_SITES),
                       cluster=st.one_of(st.none(), st.integers(0, CLUSTERS - 1)),
                       once=st.booleans(), errno=st.sampled_from(FAULT_ERRNOS))
    return st.one_of(faults, no_fault)


@st.composite
def ranges(draw: st.DrawFn) -> tuple[int, int]:
    """A range within one cluster: mostly the whole cluster, sometimes a sector-aligned
    part of it (the copy still covers the whole cluster)."""
    cluster = draw(st.integers(0, CLUSTERS - 1))
    if not draw(st.integers(0, 3)):  # one in four
        first = draw(st.integers(0, SECTORS_PER_CLUSTER - 1))
        count = draw(st.integers(1, SECTORS_PER_CLUSTER - first))
        return cluster * CLUSTER + first * SECTOR, count * SECTOR
    return cluster * CLUSTER, CLUSTER


def describe(layout: Layout, on_cbw_error: str | None, fault: FaultPlan) -> str:
    return f"{layout.value}, on-cbw-error={on_cbw_error or 'omitted'}, {fault.describe()}"


class CbwExplorer(RuleBasedStateMachine):
    """Set :attr:`session` (and :attr:`tally`) before running it."""

    session: ClassVar[ExploreSession]
    tally: ClassVar[Tally] = Tally()

    def __init__(self) -> None:
        super().__init__()
        self.rig: CbwRig | None = None
        self.model: FleecingModel | None = None
        self.steps: list[Step] = []
        self.departed = False  # met a known departure: the model no longer applies
        self.layout = Layout.FLEECING
        self.writes = 0

    # --------------------------------------------------------------- set-up
    @initialize(layout=st.sampled_from(LAYOUTS), fault=fault_plans(), data=st.data())
    def build_graph(self, layout: Layout, fault: FaultPlan, data: st.DataObject) -> None:
        values = ON_CBW_ERROR_VALUES
        if layout.uses_backup_on_cbw_error and not self.session.backup_on_cbw_error:
            values = (None,)  # before 10.1 blockdev-backup has no on-cbw-error
        on_cbw_error = data.draw(st.sampled_from(values), label="on_cbw_error")
        self.tally.examples += 1
        self.layout = layout
        self.model = FleecingModel(on_cbw_error, fault)
        self.rig = self.session.new_rig(on_cbw_error, fault, layout=layout)

    def teardown(self) -> None:
        if self.rig is not None:
            self.rig.close()

    # ---------------------------------------------------------------- steps
    def _disagree(self, problem: str) -> Disagreement:
        assert self.model is not None
        return Disagreement(problem, self.layout, self.model.on_cbw_error, self.model.fault,
                            self.steps)

    def _departs(self, what: str, step: str, problem: str) -> None:
        """A disagreement: a known departure is counted (and the model stops there),
        anything else is raised."""
        assert self.model is not None
        known = known_departure(self.layout.value, self.model.on_cbw_error, what)
        if known is None:
            raise self._disagree(f"{step}: {problem}")
        self.departed = True
        self.tally.known.append(KnownMet(known, step))

    def _check(self, step: Step, expected: Expected, error: str | None,
               data_ok: bool | None = None) -> None:
        self.steps.append(step)
        self.tally.steps += 1
        if self.departed:
            return
        assert self.model is not None
        problem = None
        if error != expected.error:
            problem = (f"documented: {expected.error or 'success'} ({expected.why}); "
                       f"observed: {error or 'success'}")
        elif data_ok is False:
            problem = (f"documented: the point-in-time data {expected.pattern:#x} "
                       f"({expected.why}); observed: other data")
        if problem is not None:
            self._departs(step.kind, step.describe(), problem)

    @precondition(lambda self: self.rig is not None)
    @rule(where=ranges())
    def guest_write(self, where: tuple[int, int]) -> None:
        assert self.rig is not None and self.model is not None
        offset, length = where
        self.writes += 1
        pattern = 0x80 + self.writes  # a new byte per write: stale data shows
        expected = self.model.guest_write(offset, length, pattern)
        result = self.rig.guest_write(offset, length, pattern)
        self._check(Step("write", offset, length, pattern), expected, result.error)

    @precondition(lambda self: self.rig is not None and self.layout.has_snapshot)
    @rule(where=ranges())
    def snapshot_read(self, where: tuple[int, int]) -> None:
        assert self.rig is not None and self.model is not None
        offset, length = where
        expected = self.model.snapshot_read(offset, length)
        pattern = expected.pattern if expected.pattern is not None else 0
        result = self.rig.snapshot_read(offset, length, pattern)
        verdict = result.pattern_reads([offset])
        error = None if verdict is not None else result.error
        data_ok = None if verdict is None else verdict[offset]
        self._check(Step("read", offset, length, expected.pattern), expected, error, data_ok)

    @precondition(lambda self: self.rig is not None and self.rig.job_running)
    @rule()
    def cancel(self) -> None:
        """sync=none: a cancel ends the job, BLOCK_JOB_CANCELLED without error, unless its
        snapshot broke (then it should have failed already)."""
        assert self.rig is not None and self.model is not None
        event, error = self.rig.cancel_job()
        self.model.detached = True
        self.steps.append(Step("cancel", 0, 0, None))
        self.tally.steps += 1
        if self.departed:
            return
        ended = f"{event}" + (f" ({error})" if error else "")
        if job_may_run(self.model) and (event != "BLOCK_JOB_CANCELLED" or error):
            raise self._disagree(f"block-job-cancel: documented: BLOCK_JOB_CANCELLED; "
                                 f"observed: {ended}")
        if not job_may_run(self.model) and event == "BLOCK_JOB_CANCELLED" and not error:
            self._departs("job", "block-job-cancel", "documented: the job fails once the "
                          "snapshot broke; observed: a cancel ends it like a good backup")

    # ----------------------------------------------------------- invariants
    # "QEMU never dies and always answers": every step is a QMP command, which raises
    # QEMUDied / QEMUUnresponsive (Machine's bounded waits) if it does not.
    @invariant()
    def job_runs_unless_the_snapshot_broke(self) -> None:
        """sync=none: the job runs until cancelled, unless its snapshot broke."""
        if self.rig is None or self.model is None or self.departed or \
                not self.rig.job_running:
            return
        status = self.rig.job_status()
        if job_may_run(self.model) and status != "running":
            raise self._disagree(f"query-jobs: documented: running (nothing broke); "
                                 f"observed: {status or 'gone'}")
        if not job_may_run(self.model) and status == "running":
            self._departs("job", "query-jobs", "documented: the job fails once the snapshot "
                          "broke (break-snapshot); observed: still running")

    @invariant()
    def target_holds_the_copied_old_data(self) -> None:
        """What the copy-before-write saved is the point-in-time data (sync=none: the
        target is the backup; fleecing checks it through snapshot reads)."""
        if self.rig is None or self.model is None or self.departed or \
                self.layout.has_snapshot:
            return
        target = self.rig.image_bytes("target")
        for cluster in sorted(self.model.copied):
            if target[cluster * CLUSTER:(cluster + 1) * CLUSTER] != \
                    bytes([original_pattern(cluster)]) * CLUSTER:
                raise self._disagree(f"target cluster {cluster} does not hold the "
                                     f"point-in-time data {original_pattern(cluster):#x}, "
                                     f"though it was copied")

    @invariant()
    def source_holds_the_model_data(self) -> None:
        if self.rig is None or self.model is None or self.departed:
            return
        actual = self.rig.source_bytes()
        if actual != bytes(self.model.source):
            first = next(i for i, (a, b) in enumerate(zip(actual, self.model.source)) if a != b)
            raise self._disagree(
                f"source image differs from the documented data at byte {first} "
                f"(documented {self.model.source[first]:#x}, observed {actual[first]:#x})")


