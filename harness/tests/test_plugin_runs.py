"""Self-tests that run pytest with the plugin, as a user would, against real QEMU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harness.qemu import builds
from harness.tests.test_machine import process_gone

pytestmark = pytest.mark.selftest

# An inner test that records QEMU's pid, then waits on an event that never comes.
HANGING_TEST = """
import os
def test_waits(launch_vm):
    vm = launch_vm()
    open(os.environ["PIDFILE"], "w").write(str(vm.pid))
    vm.wait_event("NEVER_HAPPENS", timeout=120)
"""


def run_pytest(tmp: Path, test_source: str, *args: str, env: dict[str, str] | None = None,
               build: builds.QemuBuild | None = None, wait: bool = True):
    (tmp / "test_inner.py").write_text(textwrap.dedent(test_source))
    full_env = {**os.environ, **(build.as_env() if build else {}), **(env or {})}
    full_env.pop("PYTEST_XDIST_WORKER", None)
    full_env.pop("PYTEST_ADDOPTS", None)
    argv = [sys.executable, "-m", "pytest", "-p", "harness.plugin", "-p", "no:cacheprovider",
            "--rootdir", str(tmp), "--artifacts", str(tmp / "artifacts"), *args,
            str(tmp / "test_inner.py")]
    if not wait:
        return subprocess.Popen(argv, cwd=tmp, env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return subprocess.run(argv, cwd=tmp, env=full_env, capture_output=True, text=True,
                          timeout=180)


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text()):
        assert proc.poll() is None, f"inner pytest ended early:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, "inner test never started QEMU"
        time.sleep(0.05)
    return path.read_text()


def test_missing_binary_is_a_one_line_usage_error(tmp_path):
    result = run_pytest(tmp_path, "def test_x(): pass", "--qemu-prog", "/nonexistent/qemu")
    assert result.returncode == 4  # pytest's usage error
    assert "--qemu-prog: /nonexistent/qemu does not exist" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_not_a_build_directory_is_a_one_line_usage_error(tmp_path):
    result = run_pytest(tmp_path, "def test_x(): pass", "--qemu-build", str(tmp_path))
    assert result.returncode == 4
    assert "no qemu-system-x86_64 in it" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_build_without_capability_skips_naming_it(tmp_path):
    old = builds.provision("10.0")  # trixie's 10.0 lacks blockdev-backup on-cbw-error
    source = """
import pytest
@pytest.mark.requires("blockdev-backup.on-cbw-error")
def test_needs_it(): pass
@pytest.mark.requires("copy-before-write.cbw-timeout")
def test_has_it(build_info): assert build_info.version.startswith("10.0")
"""
    result = run_pytest(tmp_path, source, "-rs", "--qemu-build", str(old))
    assert result.returncode == 0, result.stdout
    assert "1 passed, 1 skipped" in result.stdout
    assert "build lacks capability 'blockdev-backup.on-cbw-error'" in result.stdout


def test_failed_test_keeps_artifacts_passing_test_leaves_nothing(tmp_path, qemu_build):
    source = """
def test_fails(launch_vm):
    vm = launch_vm()
    vm.cmd("stop")
    assert vm.cmd("query-status")["status"] == "running"
def test_passes(launch_vm):
    launch_vm().cmd("query-status")
"""
    result = run_pytest(tmp_path, source, build=qemu_build)
    assert result.returncode == 1
    kept = sorted(p.name for p in (tmp_path / "artifacts").iterdir() if p.is_dir())
    assert kept == ["test_inner.py_test_fails"]  # beside the run's results.json
    folder = tmp_path / "artifacts" / kept[0]
    names = {p.name for p in folder.iterdir()}
    assert {"vm0.qmp.log", "vm0.conversation.txt", "vm0.stdout", "vm0.stderr",
            "vm0.reproduce.sh"} <= names
    conversation = (folder / "vm0.conversation.txt").read_text()
    assert '"execute": "stop"' in conversation and '"event": "STOP"' in conversation
    assert "reproduce vm0 by hand: sh " in result.stdout  # shown in the failure report


def test_deep_tmpdir_run(tmp_path, qemu_build):
    deep = tmp_path
    while len(str(deep)) < 200:
        deep = deep / ("x" * 40)
    deep.mkdir(parents=True)
    result = run_pytest(tmp_path, "def test_ok(launch_vm): assert launch_vm().cmd('query-status')",
                        build=qemu_build, env={"TMPDIR": str(deep)})
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_interrupted_run_leaves_no_qemu(tmp_path, qemu_build, sig):
    pidfile = tmp_path / "qemu.pid"
    proc = run_pytest(tmp_path, HANGING_TEST, build=qemu_build,
                      env={"PIDFILE": str(pidfile)}, wait=False)
    try:
        qemu_pid = int(wait_for_file(pidfile, proc))
        os.kill(proc.pid, sig)
        proc.wait(timeout=15)
        deadline = time.monotonic() + 5
        while not process_gone(qemu_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process_gone(qemu_pid), f"QEMU {qemu_pid} outlived pytest ({sig.name})"
        if sig == signal.SIGINT:
            assert "KeyboardInterrupt" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


WORKER_SUICIDE_TEST = """
import os, signal
def test_worker_dies(launch_vm):
    vm = launch_vm()
    open(os.environ["PIDFILE"], "w").write(str(vm.pid))
    os.kill(os.getpid(), signal.SIGKILL)  # an xdist worker crash, as abrupt as it gets
"""


def test_killed_xdist_worker_leaves_no_qemu(tmp_path, qemu_build):
    pidfile = tmp_path / "qemu.pid"
    result = run_pytest(tmp_path, WORKER_SUICIDE_TEST, "-n", "1", build=qemu_build,
                        env={"PIDFILE": str(pidfile)})
    assert "worker 'gw0' crashed" in result.stdout or "node down" in result.stdout, \
        result.stdout
    qemu_pid = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while not process_gone(qemu_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process_gone(qemu_pid), f"QEMU {qemu_pid} outlived its crashed xdist worker"
