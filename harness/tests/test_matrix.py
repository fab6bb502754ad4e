"""``python -m harness matrix`` against real builds: 7.2, 11.1 and one that cannot start."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness.qemu import builds

pytestmark = pytest.mark.selftest

SELECTION = ["iotests/test_backup_sync_none.py", "-k", "control"]
CONTROLS = [f"iotests/test_backup_sync_none.py::test_control_without_fault[{v}]"
            for v in ("break-guest-write", "break-snapshot", "omitted")]


@pytest.mark.slow  # the matrix end to end: the suite's controls on 7.2 and 11.1
def test_matrix_report_first_change_and_a_build_that_cannot_start(tmp_path):
    for name in ("7.2", "11.1"):
        builds.provision(name)
    out = tmp_path / "matrix"
    argv = [sys.executable, "-m", "harness", "matrix", "7.2", "11.1",
            "dead=/nonexistent/qemu-system-x86_64", "--out", str(out), "--first-change",
            "--", *SELECTION]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    text = result.stdout + result.stderr
    assert result.returncode == 1, text  # a change was found, as diff(1) says it
    assert "first change: 11.1 behaves differently from 7.2" in result.stdout, text
    assert "could not run: --qemu-prog: /nonexistent/qemu-system-x86_64 does not exist" in text

    report = json.loads((out / "report.json").read_text())
    names = [b["name"] for b in report["builds"]]
    assert names == ["7.2", "11.1", "dead"]
    versions = {b["name"]: b["version"] for b in report["builds"]}
    assert versions["7.2"].startswith("7.2") and versions["11.1"].startswith("11.1.")
    assert versions["dead"] is None and "does not exist" in report["builds"][2]["error"]
    assert sorted(report["tests"]) == CONTROLS
    for nodeid in CONTROLS:
        cells = report["tests"][nodeid]
        assert cells["11.1"] == {"outcome": "passed", "reason": ""}
        assert cells["7.2"]["outcome"] == "skipped"
        assert "lacks capability 'blockdev-backup.on-cbw-error'" in cells["7.2"]["reason"]
        assert cells["dead"]["outcome"] == "error"
        assert "does not exist" in cells["dead"]["reason"]

    # One JUnit per build, named after it and its QEMU version.
    suite = next(ET.parse(out / "junit-11.1.xml").getroot().iter("testsuite"))
    assert suite.get("name") == f"cbw-harness QEMU 11.1 ({versions['11.1']})"
    assert suite.get("tests") == "3"
    dead = next(ET.parse(out / "junit-dead.xml").getroot().iter("testsuite"))
    assert dead.get("errors") == "1" and "did not start" in dead.get("name", "")
    page = (out / "report.html").read_text()
    assert all(n in page for n in CONTROLS)
    # Each build's own run: its artifacts folder and the full observations.
    run = json.loads((out / "11.1" / "results.json").read_text())
    rows = run["tests"][CONTROLS[2]]["observations"]
    assert rows[0]["scenario"] == "backup-sync-none / no-fault"
    assert rows[0]["guest_write"] == "all ok"


def children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            pass
    return found


def test_a_terminated_matrix_leaves_no_run_behind(tmp_path):
    builds.provision("11.1")
    proc = subprocess.Popen([sys.executable, "-m", "harness", "matrix", "a=11.1", "b=11.1",
                             "--out", str(tmp_path / "m"), "--", *SELECTION],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while len(children(proc.pid)) < 2:  # both builds' pytest started
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.monotonic() < deadline, "the matrix never started its runs"
        time.sleep(0.1)
    runs = children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    for pid in runs:
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z", f"run {pid} left behind"
