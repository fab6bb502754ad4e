"""The explorer: Hypothesis' stateful testing drives a real QEMU and the model side by side.

Each example draws an ``on-cbw-error`` value and a fault plan, builds a fresh fleecing
graph (:class:`~harness.explore.rig.FleecingRig`) in the session's QEMU, then runs a
drawn sequence of guest writes and snapshot reads.  Every step is checked against
:class:`~harness.explore.model.FleecingModel` at once; after every step the source
image is compared with the model's byte for byte and QEMU must answer QMP.  A
disagreement raises :class:`Disagreement` (documented vs observed), which Hypothesis
shrinks to the shortest sequence that shows it.

Offsets and lengths are drawn as cluster numbers and sector counts: small values that
shrink to short, readable steps (a whole cluster, now and then a sector-aligned part).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

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
    known_departure,
)
from .rig import ExploreSession, FleecingRig

SECTORS_PER_CLUSTER = CLUSTER // SECTOR
LAYOUT = "fleecing"


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
        return f"snapshot read at {self.offset}+{self.length}"


class Disagreement(AssertionError):
    """QEMU did not do what the model says it must, in this setting after these steps."""

    def __init__(self, message: str, on_cbw_error: str | None, fault: FaultPlan,
                 steps: list[Step]):
        lines = [describe(on_cbw_error, fault), *(s.describe() for s in steps)]
        super().__init__(f"{message}\nsequence:\n  " + "\n  ".join(lines))
        self.problem = message
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


def describe(on_cbw_error: str | None, fault: FaultPlan) -> str:
    return f"{LAYOUT}, on-cbw-error={on_cbw_error or 'omitted'}, {fault.describe()}"


class FleecingExplorer(RuleBasedStateMachine):
    """Set :attr:`session` (and :attr:`tally`) before running it."""

    session: ClassVar[ExploreSession]
    tally: ClassVar[Tally] = Tally()

    def __init__(self) -> None:
        super().__init__()
        self.rig: FleecingRig | None = None
        self.model: FleecingModel | None = None
        self.steps: list[Step] = []
        self.departed = False  # met a known departure: the model no longer applies
        self.writes = 0

    # --------------------------------------------------------------- set-up
    @initialize(on_cbw_error=st.sampled_from(ON_CBW_ERROR_VALUES), fault=fault_plans())
    def build_graph(self, on_cbw_error: str | None, fault: FaultPlan) -> None:
        self.tally.examples += 1
        self.model = FleecingModel(on_cbw_error, fault)
        self.rig = self.session.new_rig(on_cbw_error, fault)

    def teardown(self) -> None:
        if self.rig is not None:
            self.rig.close()

    # ---------------------------------------------------------------- steps
    def _disagree(self, problem: str) -> Disagreement:
        assert self.model is not None
        return Disagreement(problem, self.model.on_cbw_error, self.model.fault, self.steps)

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
        if problem is None:
            return
        known = known_departure(LAYOUT, self.model.on_cbw_error, self.model.fault)
        if known is not None:
            self.departed = True
            self.tally.known.append(KnownMet(known, step.describe()))
            return
        raise self._disagree(f"{step.describe()}: {problem}")

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

    @precondition(lambda self: self.rig is not None)
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

    # ----------------------------------------------------------- invariants
    # "QEMU never dies and always answers": every step is a QMP command, which raises
    # QEMUDied / QEMUUnresponsive (Machine's bounded waits) if it does not.
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


