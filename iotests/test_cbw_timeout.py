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
(``-m slow``: 13 s and 39 s of waiting for the verdict 5 s gives in 7 s): ``make run``
runs them, ``make check`` does not.
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Callable

import pytest

from harness.block.data import MiB
from harness.errors import CommandFailed
from harness.plugin.rows import timeout_row
from harness.scenarios.cbw_timeout import (
    REGION_A,
    REGION_B,
    REGION_C,
    REGION_U,
    TimedWrite,
    TimeoutFleecing,
    TimeoutPlan,
    Timing,
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


@pytest.fixture
def fleecing(launch_vm, images, transcript) -> Callable[..., TimeoutFleecing]:
    """Factory for the throttled fleecing layout, logging to the test's transcript."""
    return functools.partial(TimeoutFleecing, launch_vm, images, transcript=transcript)


def report(f: TimeoutFleecing, summary_row: Callable[..., None]) -> None:
    """A summary row, and the measured durations (shown with -rP, never in the transcript)."""
    if f.run.writes:
        summary_row(**timeout_row(f.run))
    print(f"write durations (s), cbw-timeout={f.cbw_timeout}: {f.run.durations()}")


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


CASES = [  # the long ones first, so that xdist spreads them over the workers
    pytest.param(None, 30, id="omitted-30s", marks=[TIMEOUT_WRAPS, pytest.mark.slow]),
    pytest.param(None, 10, id="omitted-10s", marks=[TIMEOUT_WRAPS, pytest.mark.slow]),
    pytest.param(None, 5, id="omitted-5s", marks=TIMEOUT_WRAPS),
    pytest.param(None, 2, id="omitted-2s"),
    pytest.param("break-guest-write", 2, id="break-guest-write-2s"),
    pytest.param("break-snapshot", 2, id="break-snapshot-2s"),
]


@pytest.mark.parametrize("on_cbw_error,timeout", CASES)
def test_timeout_boundary(fleecing, check_transcript, summary_row, build_info, request,
                          on_cbw_error, timeout):
    plan = TimeoutPlan(timeout)
    plan.check_margins()
    breaks_guest_write = on_cbw_error in BREAKS_GUEST_WRITE
    follow_up = timeout <= 2          # the long timeouts keep to the boundary pair
    f = fleecing(plan=plan, on_cbw_error=on_cbw_error, cbw_timeout=timeout)
    f.start()
    try:
        # Under the timeout: the copy completes, the write succeeds, the snapshot holds.
        under = f.write("A (under)", REGION_A, plan.under_size)
        assert_under(under, plan)
        assert f.read_snapshot("A", REGION_A, plan.under_size).ok

        # Over the timeout: the timeout fires.
        over = f.write("B (over)", REGION_B, plan.over_size)
        assert_at_timeout(over, plan)
        if breaks_guest_write:
            assert over.error == TIMED_OUT, f"guest write not failed: {over.result.output!r}"
        else:
            assert over.ok, f"break-snapshot must continue the write: {over.result.output!r}"

        if follow_up:
            # A second write whose copy also needs longer than the timeout.
            after = f.write("C (follow-up)", REGION_C, plan.over_size)
            if breaks_guest_write:
                assert after.error == TIMED_OUT, after.result.output
                assert_at_timeout(after, plan)
            else:
                # The snapshot is broken: no more copy-before-write, no more waiting.
                assert after.ok, after.result.output
                assert after.timing == Timing.IMMEDIATE, (
                    f"write after the snapshot broke took {after.seconds:.2f} s"
                    f"{inside_qemu(after)}")

        f.lift_throttle()
        labels = [("A again", REGION_A, plan.under_size), ("B", REGION_B, plan.over_size)]
        if follow_up:
            labels.append(("C", REGION_C, plan.over_size))
        labels.append(("U (never written)", REGION_U, 1 * MiB))
        reads = {label: f.read_snapshot(label, off, size) for label, off, size in labels}
        if breaks_guest_write:
            # The failed writes left the old data, and the snapshot holds it.
            bad = {k: r.output for k, r in reads.items() if not r.ok}
            assert not bad, f"snapshot reads failed with break-guest-write: {bad}"
            # The guest retries once the copy is done: now it succeeds, the snapshot holds.
            retry = f.write("B (retry)", REGION_B, plan.over_size, log_timing=False)
            assert retry.ok and retry.seconds < plan.timeout, retry.result.output
            assert f.read_snapshot("B after the retry", REGION_B, plan.over_size).ok
        else:
            # Documented: the snapshot is invalid, reading it fails.
            wrong = {k: r.output for k, r in reads.items() if r.error != SNAPSHOT_BROKEN}
            assert not wrong, f"snapshot reads after break-snapshot: {wrong}"
    finally:
        report(f, summary_row)

    regions = {"A": (REGION_A, plan.under_size), "B": (REGION_B, plan.over_size),
               "U": (REGION_U, 1 * MiB)}
    if follow_up:
        regions["C"] = (REGION_C, plan.over_size)
    run = f.check_source(regions)
    # Every write that succeeded (or was retried) is in the source; U is untouched.
    assert run.source_holds_new["A"] and run.source_holds_new["B"]
    assert run.source_holds_original["U"]
    if follow_up:
        assert run.source_holds_new["C"] is (not breaks_guest_write)
        assert run.source_holds_original["C"] is breaks_guest_write
    check_transcript()


@pytest.mark.parametrize("cbw_timeout", [None, 0], ids=["unset", "zero"])
def test_no_timeout_control(fleecing, check_transcript, summary_row, cbw_timeout):
    """The 2 s runs' throttle and under write, no timeout: a write whose copy needs a second
    more than a timed-out write may take (T + slack) waits for its whole copy -- what the
    timeout cuts short in the runs above."""
    plan = TimeoutPlan(2)
    f = fleecing(plan=plan, cbw_timeout=cbw_timeout)
    f.start()
    try:
        assert_under(f.write("A (under)", REGION_A, plan.under_size), plan)
        over = f.write("B (over)", REGION_B, plan.control_size)
        assert over.ok, over.result.output
        assert over.seconds >= plan.copy_seconds(plan.control_size), (
            f"the copy of {plan.control_size} bytes should take >= "
            f"{plan.copy_seconds(plan.control_size):.1f} s, took {over.seconds:.2f} s")
        assert over.timing == Timing.AFTER
        f.lift_throttle()
        for label, off, size in (("A", REGION_A, plan.under_size),
                                 ("B", REGION_B, plan.control_size),
                                 ("U (never written)", REGION_U, 1 * MiB)):
            assert f.read_snapshot(label, off, size).ok
    finally:
        report(f, summary_row)
    run = f.check_source({"A": (REGION_A, plan.under_size), "B": (REGION_B, plan.control_size)})
    assert run.source_holds_new["A"] and run.source_holds_new["B"]
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
