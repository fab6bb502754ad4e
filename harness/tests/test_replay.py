"""Self-tests: a failed test (or a departure kept on request) leaves a replay.py that
reproduces its verdict by hand, from files that exist after the run."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.qemu import replay
from harness.qemu.builds import QemuBuild
from harness.tests.test_abnormal_exit import AFTER_QUIT, wrapper
from harness.tests.test_plugin_runs import run_pytest

pytestmark = pytest.mark.selftest
ROOT = Path(__file__).resolve().parents[2]

# The guest write meets the one-shot fault and fails (break-guest-write), as QEMU
# documents; this test wrongly expects it to succeed.
WRONG_EXPECTATION = """
from harness.scenarios.cbw import Fault, Layout, Scenario, ScenarioSpec, run
def test_wrong_expectation(launch_vm, images):
    s = Scenario(launch_vm, images, ScenarioSpec(Layout.FLEECING, on_cbw_error="break-guest-write",
                                                 fault=Fault("target-write", once=True)))
    obs = run(s)
    assert not obs.failed_writes, "expected every guest write to succeed"
"""


def run_replay(folder: Path, qemu: Path | str, *args: str) -> subprocess.CompletedProcess[str]:
    """replay.py as a user runs it: plain python3, no harness on the path, from /."""
    return subprocess.run([sys.executable, "-I", str(folder / "replay.py"), str(qemu), *args],
                          cwd="/", capture_output=True, text=True, timeout=120)


def kept_folder(artifacts: Path) -> Path:
    folders = [p for p in artifacts.iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    return folders[0]


def test_failed_scenario_replays_to_the_same_verdict(tmp_path, qemu_build):
    result = run_pytest(tmp_path, WRONG_EXPECTATION, build=qemu_build)
    assert result.returncode == 1, result.stdout
    # The report points at files that exist after the run (not the run's temp folder).
    shown = re.search(r"^replay by hand: python3 (\S+) ", result.stdout, re.M)
    assert shown, result.stdout
    script = Path(shown.group(1))
    assert script.is_file() and "cbw-run-" not in str(script)
    for path in re.findall(r"\((/\S+\.conversation\.txt)\)", result.stdout):
        assert Path(path).is_file(), path
    replayed = run_replay(script.parent, qemu_build.qemu_system)
    assert replayed.returncode == 1, replayed.stdout + replayed.stderr
    assert "REPRODUCED" in replayed.stdout
    assert 'qemu-io cbw "write -P 0x55 1048576 65536" -> Input/output error' \
        in replayed.stdout
    assert "expected every guest write to succeed" in replayed.stdout  # the test's line


def test_replay_reports_a_different_outcome(tmp_path, qemu_build):
    """Against a recording where the write succeeded (a QEMU that behaves otherwise),
    the replay says it did not reproduce, and where it differs."""
    run_pytest(tmp_path, WRONG_EXPECTATION, build=qemu_build)
    folder = kept_folder(tmp_path / "artifacts")
    case_path = folder / "vm.replay.json"
    case = json.loads(case_path.read_text())
    case["observed"] = [line.replace("-> Input/output error", "-> ok")
                        for line in case["observed"]]
    case_path.write_text(json.dumps(case))
    replayed = run_replay(folder, qemu_build.qemu_system)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert "NOT REPRODUCED" in replayed.stdout
    assert re.search(r'recorded hmp qemu-io cbw "write -P 0x55 1048576 65536" -> ok\n'
                     r'\s+now hmp .* -> Input/output error', replayed.stdout), replayed.stdout


def run_suite_test(tmp: Path, build: QemuBuild, test: str) -> Path:
    """Run one suite test with --keep-replays; returns its kept folder."""
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("PYTEST_XDIST_WORKER", "PYTEST_ADDOPTS")}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--keep-replays",
         "--artifacts", str(tmp / "artifacts"), test],
        cwd=ROOT, env={**env, **build.as_env()}, capture_output=True, text=True, timeout=180)
    assert "1 xfailed" in result.stdout, result.stdout + result.stderr
    return kept_folder(tmp / "artifacts")


def test_departure_kept_on_request_replays_to_the_same_verdict(tmp_path, qemu_build):
    folder = run_suite_test(tmp_path, qemu_build, "iotests/test_backup_sync_full.py::"
                            "test_one_shot_fault[break-snapshot-target-write]")
    replayed = run_replay(folder, qemu_build.qemu_system)
    assert replayed.returncode == 1, replayed.stdout + replayed.stderr
    assert 'BLOCK_JOB_COMPLETED {"device": "job0", "type": "backup"}' in replayed.stdout
    assert "the job ended completed" in replayed.stdout


@pytest.mark.slow  # waits out the livelock's bound twice (the suite's run, the replay)
def test_livelock_replays_without_hanging(tmp_path, qemu_build):
    folder = run_suite_test(tmp_path, qemu_build, "iotests/test_livelock.py::"
                            "test_ignored_read_error_on_broken_snapshot[full-speed]")
    replayed = run_replay(folder, qemu_build.qemu_system)
    assert replayed.returncode == 1, replayed.stdout + replayed.stderr
    assert "block-job-set-speed -> no reply" in replayed.stdout
    assert "QEMU exit: killed" in replayed.stdout


def test_abort_on_quit_replays(tmp_path, qemu_build):
    qemu = wrapper(tmp_path, qemu_build, AFTER_QUIT["sigabrt-on-quit"])
    result = run_pytest(tmp_path, "def test_x(launch_vm): launch_vm().cmd('query-status')",
                        "--qemu-prog", str(qemu), "--qemu-img-prog", str(qemu_build.qemu_img),
                        "--qemu-io-prog", str(qemu_build.qemu_io))
    assert result.returncode == 1, result.stdout
    folder = kept_folder(tmp_path / "artifacts")
    replayed = run_replay(folder, qemu)
    assert replayed.returncode == 1, replayed.stdout + replayed.stderr
    assert "QEMU exit: killed by signal 6 (SIGABRT)" in replayed.stdout
    fine = run_replay(folder, qemu_build.qemu_system)  # the real QEMU quits cleanly
    assert fine.returncode == 0 and "now QEMU exit: exit status 0" in fine.stdout


def test_images_recreated_from_a_recipe(tmp_path):
    """The images.jsonl recipe (create / fill / copy), raw images in plain Python."""
    case = {"recipe": [
        {"op": "create", "path": "a.raw", "size": 8192, "format": "raw"},
        {"op": "fill", "path": "a.raw", "offset": 4096, "length": 512, "pattern": 0x5A,
         "format": "raw"},
        {"op": "copy", "from": "a.raw", "to": "sub/b.raw"}]}
    replay.make_images(case, tmp_path, tmp_path, None)
    data = (tmp_path / "sub" / "b.raw").read_bytes()
    assert len(data) == 8192 and data[4096:4608] == b"\x5a" * 512
    assert data[:4096] == bytes(4096) and data[4608:] == bytes(8192 - 4608)


def test_replay_script_uses_the_standard_library_only():
    imported = set(re.findall(r"^(?:from|import) (\w+)", Path(replay.__file__).read_text(),
                              re.M))
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported
    assert shutil.which("python3")


GUEST_WRONG_EXPECTATION = """
from harness.guest.console import Write
from harness.guest.vm import GuestDisk, guest_devices, run_guest
from harness.scenarios.cbw import CHUNK, GUEST_WRITES, NEW, Fault
def test_guest_wrong(launch_vm, images, guest_image):
    disk = GuestDisk("d0", werror="report", fault=Fault("target-write"))
    dev = guest_devices([disk])["d0"]
    run = run_guest(launch_vm, images, guest_image, [disk],
                    [Write(dev, GUEST_WRITES[0], CHUNK, NEW)])
    assert run.ops_on("d0")[0].ok, "expected the guest write to succeed"
"""


@pytest.mark.guest
@pytest.mark.slow  # two guest boots (the suite's run, the replay)
def test_failed_guest_test_replays_with_the_guests_results(tmp_path, qemu_build, guest_image):
    result = run_pytest(tmp_path, GUEST_WRONG_EXPECTATION, build=qemu_build)
    assert result.returncode == 1, result.stdout
    replayed = run_replay(kept_folder(tmp_path / "artifacts"), qemu_build.qemu_system)
    assert replayed.returncode == 1, replayed.stdout + replayed.stderr
    assert re.search(r'guest i=0 op=write dev=/dev/vda .* rc=1 .*err="Input/output error"',
                     replayed.stdout), replayed.stdout
