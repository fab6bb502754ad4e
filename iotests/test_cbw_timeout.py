"""copy-before-write ``cbw-timeout``, on both sides of the boundary, for each on-cbw-error.

Fleecing layout (copy-before-write node + snapshot-access) whose target is behind a
``throttle`` node, so that a copy takes a time that follows from its size
(:mod:`harness.cbw_timeout`).  In every run the first guest write's copy needs about
30 % of the timeout (the control: it must succeed) and the second's at least three
times the timeout (the timeout must fire).  Each guest write is timed around the
HMP ``qemu-io`` call.

Documented intent (qapi/block-core.json):

* ``cbw-timeout``: "Zero means no limit. Non-zero sets the timeout in seconds for
  copy-before-write operation. When a timeout occurs, the respective copy-before-write
  operation will fail, and the @on-cbw-error parameter will decide how this failure
  is handled. Default 0."
* ``break-guest-write`` (the default): "report the error to the guest. This way, the
  guest will not be able to overwrite areas that cannot be backed up, so the backup
  process remains valid."
* ``break-snapshot``: "continue guest write. Doing so will make the provided snapshot
  state invalid and any backup or export process based on it will finally fail."

The 2 s timeout runs the whole on-cbw-error matrix, with a follow-up write after the
timeout; 5 s (the first whole second past the 4.29 s where QEMU < 9.1 wraps it), 10 s and
30 s run the boundary pair for the default value only.  10 s and 30 s are the slow tail
(``-m slow``: 13 s and 39 s of waiting for the verdict 5 s gives in 7 s; together with
the others, the 30 s case makes them all wait 40 s, not 8): ``make run`` runs them,
``make check`` does not.

The cases are almost all waiting, so they wait together: the first of these tests to
run (``shares`` marker, ``shared_run``) drives every case this session selected at once,
one QEMU each (:func:`~harness.scenarios.cbw_timeout.drive_together`); each test then
judges its own case's record, transcript and files.
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Callable
from typing import cast

import pytest

from harness.block.images import Images
from harness.errors import CommandFailed
from harness.plugin.rows import timeout_row
from harness.qemu.machine import Launcher
from harness.scenarios.cbw_timeout import (
    TimedWrite,
    TimeoutCase,
    TimeoutFleecing,
    TimeoutPlan,
    TimeoutRun,
    Timing,
    drive_together,
)
from iotests.expectations import BREAKS_GUEST_WRITE

pytestmark = [pytest.mark.requires("copy-before-write.cbw-timeout", "snapshot-access",
                                   "throttle"),
              pytest.mark.waits]

TIMED_OUT = os.strerror(errno.ETIMEDOUT)        # "Connection timed out"
SNAPSHOT_BROKEN = os.strerror(errno.EACCES)     # "Permission denied"

# Before 9.1 QEMU kept the timeout in nanoseconds in a uint32_t: anything above
# 4.29 s wraps (5 s -> 0.71 s, 10 s -> 1.41 s, 30 s -> 4.23 s).  Fixed upstream by
# "block/copy-before-write: use uint64_t for timeout in nanoseconds" (QEMU 9.1).  The
# registry's entry applies to builds before 9.1 only.
TIMEOUT_WRAPS = pytest.mark.departure("cbw-timeout-wraps")

# The tests whose cases run together (one shared run).
TOGETHER = "cbw-timeout"
WAIT_TOGETHER = pytest.mark.shares(TOGETHER)


# The 2 s timeout writes a follow-up after the timed-out write; the longer ones keep to
# the boundary pair.
FOLLOW_UP_UP_TO = 2


def timeout_case(name: str, on_cbw_error: str | None, timeout: int) -> TimeoutCase:
    """Where the guest's write fails, the guest retries it once the copy is done."""
    return TimeoutCase(name, TimeoutPlan(timeout), on_cbw_error, cbw_timeout=timeout,
                       follow_up=timeout <= FOLLOW_UP_UP_TO,
                       retry=on_cbw_error in BREAKS_GUEST_WRITE)


def control_case(name: str, cbw_timeout: int | None) -> TimeoutCase:
    return TimeoutCase(f"no-timeout-{name}", TimeoutPlan(2), cbw_timeout=cbw_timeout,
                       control=True)


def case_of(item: pytest.Item) -> TimeoutCase | None:
    """The case a test of this module judges (None: not one of the shared run's)."""
    mark = item.get_closest_marker("shares")
    if mark is None or mark.args[0] != TOGETHER or not isinstance(item, pytest.Function):
        return None
    params, name = item.callspec.params, item.callspec.id
    if item.originalname == "test_timeout_boundary":
        return timeout_case(name, cast("str | None", params["on_cbw_error"]),
                            cast(int, params["timeout"]))
    return control_case(name, cast("int | None", params["cbw_timeout"]))


@pytest.fixture
def timeout_run(request, shared_run, transcript, summary_row) -> TimeoutRun:
    """This test's case as run together with every other case this session selected
    (one run, whichever test asks first; only these cases, so that ``-k omitted-5s``
    runs that one), with its transcript, summary row and files (its QEMU's QMP log and
    output, its images) in the test's."""
    mine = case_of(request.node)
    assert mine is not None, f"{request.node.name} is not marked shares({TOGETHER!r})"
    cases = [case for case in map(case_of, request.session.items) if case is not None]

    def run_together(launch: Launcher, images: Images) -> dict[str, TimeoutRun]:
        return drive_together(cases, launch, images)

    runs: dict[str, TimeoutRun] = shared_run(TOGETHER, run_together, part=mine.name)
    run = runs[mine.name]
    transcript.lines[:] = run.transcript
    report(run, summary_row)
    return run


@pytest.fixture
def fleecing(launch_vm, images, transcript) -> Callable[..., TimeoutFleecing]:
    """Factory for the throttled fleecing layout, logging to the test's transcript."""
    return functools.partial(TimeoutFleecing, launch_vm, images, transcript=transcript)


def report(run: TimeoutRun, summary_row: Callable[..., None]) -> None:
    """A summary row, and the measured durations (shown with -rP, never in the transcript)."""
    if run.writes:
        summary_row(**timeout_row(run))
    print(f"write durations (s), cbw-timeout={run.cbw_timeout}: {run.durations()}")


def inside_qemu(w: TimedWrite) -> str:
    """qemu-io's own time for a completed write: when it is far below the monitor's round
    trip, QEMU answered late, not the write (seen under heavy CPU load: an HMP reply
    ~5 s after a write that took 0.01 s, while an earlier timed-out copy ran on)."""
    return "" if w.result.elapsed is None else f"; qemu-io's own clock: {w.result.elapsed:.2f} s"


def assert_under(w: TimedWrite, plan: TimeoutPlan) -> None:
    """The control: a copy well within the timeout lets the write succeed, in time."""
    assert w.ok, (f"write whose copy needs {plan.copy_seconds(w.size):.1f} s (timeout "
                  f"{plan.timeout} s) failed after {w.seconds:.2f} s: {w.result.output!r}")
    assert w.timing == Timing.BEFORE, (
        f"write whose copy needs {plan.copy_seconds(w.size):.1f} s took {w.seconds:.2f} s "
        f"({w.timing}{inside_qemu(w)}); the throttle did not slow it as planned, or the "
        "timeout misfired")


def assert_at_timeout(w: TimedWrite, plan: TimeoutPlan) -> None:
    """Returned when the timeout fired: not before it, not much after, long before the copy
    could have finished."""
    assert w.seconds >= plan.timeout - plan.EARLY, (
        f"write returned after {w.seconds:.2f} s, before the {plan.timeout} s timeout: "
        f"{w.result.output!r}")
    assert w.seconds <= plan.timeout + plan.slack, (
        f"write returned after {w.seconds:.2f} s, more than {plan.slack:g} s after the "
        f"{plan.timeout} s timeout (its copy needs {plan.copy_seconds(w.size):.1f} s"
        f"{inside_qemu(w)}): {w.result.output!r}")
    assert w.timing == Timing.AT


CASES = [  # the long ones first: the first test to run drives every case
    pytest.param(None, 30, id="omitted-30s", marks=[TIMEOUT_WRAPS, pytest.mark.slow]),
    pytest.param(None, 10, id="omitted-10s", marks=[TIMEOUT_WRAPS, pytest.mark.slow]),
    pytest.param(None, 5, id="omitted-5s", marks=TIMEOUT_WRAPS),
    pytest.param(None, 2, id="omitted-2s"),
    pytest.param("break-guest-write", 2, id="break-guest-write-2s"),
    pytest.param("break-snapshot", 2, id="break-snapshot-2s"),
]


@WAIT_TOGETHER
@pytest.mark.parametrize("on_cbw_error,timeout", CASES)
def test_timeout_boundary(timeout_run, check_transcript, on_cbw_error, timeout):
    run = timeout_run
    plan = run.plan
    plan.check_margins()
    breaks_guest_write = on_cbw_error in BREAKS_GUEST_WRITE
    follow_up = timeout <= FOLLOW_UP_UP_TO

    # Under the timeout: the copy completes, the write succeeds, the snapshot holds.
    assert_under(run.written("A (under)"), plan)
    assert run.snapshot_read("A").ok

    # Over the timeout: the timeout fires.
    over = run.written("B (over)")
    assert_at_timeout(over, plan)
    if breaks_guest_write:
        assert over.error == TIMED_OUT, f"guest write not failed: {over.result.output!r}"
    else:
        assert over.ok, f"break-snapshot must continue the write: {over.result.output!r}"

    if follow_up:
        # A second write whose copy also needs longer than the timeout.
        after = run.written("C (follow-up)")
        if breaks_guest_write:
            assert after.error == TIMED_OUT, after.result.output
            assert_at_timeout(after, plan)
        else:
            # The snapshot is broken: no more copy-before-write, no more waiting.
            assert after.ok, after.result.output
            assert after.timing == Timing.IMMEDIATE, (
                f"write after the snapshot broke took {after.seconds:.2f} s"
                f"{inside_qemu(after)}")

    # With the throttle lifted:
    labels = ["A again", "B"] + (["C"] if follow_up else []) + ["U (never written)"]
    reads = {label: run.snapshot_read(label) for label in labels}
    if breaks_guest_write:
        # The failed writes left the old data, and the snapshot holds it.
        bad = {k: r.output for k, r in reads.items() if not r.ok}
        assert not bad, f"snapshot reads failed with break-guest-write: {bad}"
        # The guest retries once the copy is done: now it succeeds, the snapshot holds.
        retry = run.written("B (retry)")
        assert retry.ok and retry.seconds < plan.timeout, retry.result.output
        assert run.snapshot_read("B after the retry").ok
    else:
        # Documented: the snapshot is invalid, reading it fails.
        wrong = {k: r.output for k, r in reads.items() if r.error != SNAPSHOT_BROKEN}
        assert not wrong, f"snapshot reads after break-snapshot: {wrong}"

    # With QEMU stopped: every write that succeeded (or was retried) is in the source;
    # U is untouched.
    assert run.holds_new("A") and run.holds_new("B")
    assert run.holds_original("U")
    if follow_up:
        assert run.holds_new("C") is (not breaks_guest_write)
        assert run.holds_original("C") is breaks_guest_write
    run.raise_error()
    check_transcript()


@WAIT_TOGETHER
@pytest.mark.parametrize("cbw_timeout", [None, 0], ids=["unset", "zero"])
def test_no_timeout_control(timeout_run, check_transcript, cbw_timeout):
    """The 2 s runs' throttle and under write, no timeout: a write whose copy needs a second
    more than a timed-out write may take (T + slack) waits for its whole copy -- what the
    timeout cuts short in the runs above."""
    run = timeout_run
    plan = run.plan
    assert_under(run.written("A (under)"), plan)
    over = run.written("B (over)")
    assert over.ok, over.result.output
    assert over.seconds >= plan.copy_seconds(plan.control_size), (
        f"the copy of {plan.control_size} bytes should take >= "
        f"{plan.copy_seconds(plan.control_size):.1f} s, took {over.seconds:.2f} s")
    assert over.timing == Timing.AFTER
    for label in ("A", "B", "U (never written)"):
        assert run.snapshot_read(label).ok
    assert run.holds_new("A") and run.holds_new("B")
    run.raise_error()
    check_transcript()


def test_timeout_is_whole_seconds(fleecing, check_transcript):
    """``cbw-timeout`` is a uint32 of seconds: fractions, negatives and values past
    2^32 - 1 are refused when the node is created; 0, 1 and 2^32 - 1 are accepted."""
    f = fleecing(plan=TimeoutPlan(2))
    f.launch()
    f.transcript.log("=== copy-before-write cbw-timeout values ===")
    base = {"driver": "copy-before-write", "node-name": "cbw", "file": "source",
            "target": "target"}
    for value in (1.5, -1, 2**32, "2"):
        with pytest.raises(CommandFailed) as exc:
            f.cmd("blockdev-add", {**base, "cbw-timeout": value})
        assert exc.value.error_class == "GenericError"
        assert "'cbw-timeout'" in exc.value.desc, exc.value.desc
    for value in (0, 1, 2**32 - 1):
        f.cmd("blockdev-add", {**base, "cbw-timeout": value})
        f.cmd("blockdev-del", {"node-name": "cbw"})
    check_transcript()
