"""The scenario explorer (harness/explore) against real QEMU: it agrees with the default
build on a fixed derandomised budget, its examples do not leak into each other, and it
catches a planted regression and shrinks it to a step or two."""

from __future__ import annotations

import errno
import subprocess
import sys

import pytest

from harness.explore.explorer import Disagreement, Tally
from harness.explore.model import CLUSTER, FaultPlan, FleecingModel, original_pattern
from harness.explore.rig import ExploreSession
from harness.explore.run import explorer_settings, run_examples, write_reproducer
from harness.qemu import builds
from harness.simulate import make_build

pytestmark = pytest.mark.selftest

CHECK_EXAMPLES = 200  # ~10 s alone on 2 cores


@pytest.fixture
def session(qemu_build, workdir):
    s = ExploreSession(qemu_build, workdir)
    yield s
    s.close()


def test_explorer_finds_nothing_new_on_the_build(session):
    """make check's explorer run: any disagreement with the model fails it (known
    departures are counted, not failed)."""
    tally = Tally()
    run_examples(session, explorer_settings(CHECK_EXAMPLES, derandomize=True, database=None),
                 tally)
    assert tally.examples >= CHECK_EXAMPLES
    assert tally.steps > tally.examples  # sequences, not just set-ups
    # The budget reaches the recorded departure of its layouts, and names it.
    if session.backup_on_cbw_error:
        assert {k.departure for k in tally.known} == {"sync-none-broken-snapshot-runs-on"}
    assert session.node_names() == []  # every example removed its nodes


def test_examples_share_a_qemu_but_nothing_else(session, workdir):
    """A persistent fault and a broken snapshot in one example leave no trace in the
    next one on the same QEMU: its nodes, images and rules are its own."""
    fault = FaultPlan("target-write", cluster=None, once=False, errno=errno.ENOSPC)
    first = session.new_rig("break-snapshot", fault)
    assert first.guest_write(0, CLUSTER, 0x81).ok  # break-snapshot: the write goes on
    assert first.snapshot_read(CLUSTER, CLUSTER, original_pattern(1)).error == \
        "Permission denied"
    first.close()
    assert session.node_names() == []
    assert not any(workdir.glob("x1-*.raw"))

    second = session.new_rig(None, FaultPlan())
    assert second.topology.node("cbw") != first.topology.node("cbw")
    model = FleecingModel(None, FaultPlan())
    for cluster in (0, 1):
        assert second.guest_write(cluster * CLUSTER, CLUSTER, 0x90).ok
        model.guest_write(cluster * CLUSTER, CLUSTER, 0x90)
        read = second.snapshot_read(cluster * CLUSTER, CLUSTER, original_pattern(cluster))
        assert read.pattern_reads([cluster * CLUSTER]) == {cluster * CLUSTER: True}, read.output
    assert second.source_bytes() == bytes(model.source)
    second.close()
    assert session.node_names() == []


def test_explorer_catches_the_planted_swap_and_shrinks_it(qemu_build, workdir):
    """A build whose QMP proxy swaps the on-cbw-error values: the explorer must find
    it and shrink it to one or two steps.  Sequences of at most 2 steps: shrinking
    reruns a few hundred examples, each slower through the proxy."""
    swapped = make_build(workdir / "swapped", qemu_build, ["regression-swap-on-cbw-error"])
    build = builds.select(qemu_build=str(swapped))
    session = ExploreSession(build, workdir / "session")
    try:
        with pytest.raises(Disagreement) as found:
            run_examples(session, explorer_settings(100, derandomize=True, database=None,
                                                    steps=2), Tally())
    finally:
        session.close()
    shrunk = found.value
    assert shrunk.on_cbw_error in ("break-guest-write", "break-snapshot"), str(shrunk)
    assert shrunk.fault.site is not None, str(shrunk)
    assert 1 <= len(shrunk.steps) <= 2, str(shrunk)
    assert "documented:" in str(shrunk) and "observed:" in str(shrunk)

    # Its reproducer, standalone: exit 1 where it shows (the swapped build), 0 where not.
    case = write_reproducer(build, workdir / "finding", shrunk)
    assert shrunk.problem in (case.parent / "SUMMARY.txt").read_text()
    for qemu, status in ((build.qemu_system, 1), (qemu_build.qemu_system, 0)):
        replayed = subprocess.run([sys.executable, str(case.parent / "replay.py"), str(qemu),
                                   "--case", case.name], capture_output=True, text=True,
                                  timeout=120, cwd=case.parent)
        assert replayed.returncode == status, replayed.stdout + replayed.stderr


def test_command_line_rejects_a_bad_budget():
    out = subprocess.run([sys.executable, "-m", "harness.explore", "--budget", "soon"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "budget 'soon': use seconds (600, 600s) or minutes (10m)" in out.stderr
