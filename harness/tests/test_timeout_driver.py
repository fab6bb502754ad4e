"""drive_together (harness/scenarios/cbw_timeout.py), against real QEMU: what one case
raises stays in that case's record, the others run on; a Ctrl-C ends every QEMU at once."""

from __future__ import annotations

import pickle
import signal
import threading
import time
from pathlib import Path

import pytest

from harness.block.data import NEW
from harness.scenarios.cbw_timeout import (
    REGION_B,
    CaseError,
    TimeoutCase,
    TimeoutPlan,
    Timing,
    drive_together,
)

pytestmark = [pytest.mark.selftest,
              pytest.mark.requires("copy-before-write.cbw-timeout", "snapshot-access",
                                   "throttle")]


def one_second(name: str, **fields) -> TimeoutCase:
    """The shortest timeout run (~2 s): A under the timeout, B over it, no follow-up."""
    return TimeoutCase(name, TimeoutPlan(1), cbw_timeout=1, **fields)


def test_a_cases_error_stays_in_its_record(launch_vm, images):
    runs = drive_together([one_second("good"), one_second("bad", on_cbw_error="no-such")],
                          launch_vm, images)
    good, bad = pickle.loads(pickle.dumps(runs)).values()  # as other workers get them
    assert good.error is None, good.error
    assert good.written("B (over)").timing == Timing.AT
    assert good.holds_new("A") and good.holds_original("U")
    # QEMU refused the node: a CommandFailed (not picklable) kept as its type and text,
    # raised by the first step the test asks for, with where it was raised.
    assert isinstance(bad.error, CaseError)
    with pytest.raises(CaseError, match=r"^CommandFailed: QMP blockdev-add failed: "):
        bad.written("A (under)")
    assert any("in the run of case bad" in note for note in bad.error.__notes__)
    assert "no-such" in bad.transcript[-1] and '"error"' in bad.transcript[-1]
    assert bad.writes == {} and good.transcript[0].startswith("=== fleecing")
    for name in ("good", "bad"):  # each QEMU in its own folder, quit (exit status 0)
        log = (images.folder / name / f"{name}.qmp.log").read_text().splitlines()
        assert '"exit": 0' in log[-2], log[-2:]


def interrupt_once_writing(logs: list[Path], text: str, sent: list[float],
                           deadline: float) -> threading.Thread:
    """A thread that sends SIGINT to the main thread (as a Ctrl-C) once every log holds
    ``text``, noting when in ``sent``; it gives up after ``deadline`` seconds.  (Files
    have no event to await: it polls them.)"""
    def watch() -> None:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if all(log.exists() and text in log.read_text() for log in logs):
                sent.append(time.monotonic())
                signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
                return
            time.sleep(0.05)
    return threading.Thread(target=watch, daemon=True)


def test_ctrl_c_ends_every_case_at_once(launch_vm, images):
    """A Ctrl-C comes to the main thread, which waits for the cases' threads: it kills
    their QEMUs (whose waits then end), and is raised within a second or two, not after
    the rest of the cases' ~5 s of throttled copies."""
    cases = [TimeoutCase(f"control-{n}", TimeoutPlan(2), control=True) for n in (1, 2)]
    logs = [images.folder / case.name / f"{case.name}.qmp.log" for case in cases]
    sent: list[float] = []
    # Once every case waits on its write B, whose copy takes ~5 s.
    watcher = interrupt_once_writing(logs, f"write -P {NEW:#x} {REGION_B} ", sent, 30)
    watcher.start()
    with pytest.raises(KeyboardInterrupt):
        drive_together(cases, launch_vm, images)
    assert time.monotonic() - sent[0] < 2.0
    for log in logs:
        end = log.read_text().splitlines()[-2:]
        assert '"exit": -9' in end[0], end  # killed, and its end recorded by its thread
