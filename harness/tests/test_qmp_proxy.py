"""Self-tests of the QMP proxy: it keeps every guarantee of the harness (real QEMU)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from harness.errors import AbnormalShutdown, LaunchFailure
from harness.qemu import builds
from harness.qemu.machine import Machine
from harness.qemu.qmp_proxy import Fault, hmp_guest_write, qmp_chardev, swap_on_cbw_error
from harness.simulate import make_build
from harness.tests.test_machine import process_gone

pytestmark = pytest.mark.selftest


@pytest.fixture
def proxied(tmp_path, qemu_build) -> builds.QemuBuild:
    """The build under test behind the proxy, with no rule."""
    out = make_build(tmp_path / "proxied", qemu_build, [])
    return builds.QemuBuild(out / "qemu-system-x86_64", out / "qemu-img", out / "qemu-io")


def qemu_of(proxy_pid: int | None) -> int:
    """The pid of the real QEMU, the proxy's only child."""
    assert proxy_pid is not None
    children = Path(f"/proc/{proxy_pid}/task/{proxy_pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def wait_gone(pid: int | None, timeout: float = 5) -> bool:
    assert pid is not None
    deadline = time.monotonic() + timeout
    while not process_gone(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return process_gone(pid)


def test_runs_without_qmp_exec_the_real_binary(proxied, qemu_build):
    def version(binary: Path) -> str:
        return subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                              timeout=30).stdout
    assert version(proxied.qemu_system) == version(qemu_build.qemu_system) != ""


def test_quit_exits_zero_and_leaves_no_process(proxied, tmp_path):
    vm = Machine(proxied, tmp_path).launch()
    qemu = qemu_of(vm.pid)
    assert vm.cmd("query-status")["status"] == "running"
    assert vm.shutdown() == 0
    assert not vm.killed_by_harness and process_gone(qemu)


def test_qemu_abort_is_the_proxy_abort(proxied, tmp_path):
    vm = Machine(proxied, tmp_path).launch()
    qemu = qemu_of(vm.pid)
    subprocess.run(["kill", "-ABRT", str(qemu)], check=True)
    assert wait_gone(vm.pid), "the proxy outlived QEMU"
    with pytest.raises(AbnormalShutdown, match="SIGABRT"):
        vm.shutdown()
    assert vm.exitcode == -signal.SIGABRT


def test_qemu_exit_status_is_mirrored(proxied, tmp_path):
    with pytest.raises(LaunchFailure) as info:
        Machine(proxied, tmp_path, args=["-blockdev", "{}"]).launch()
    assert info.value.exitcode == 1
    assert "driver" in info.value.log_tail  # QEMU's own complaint, through the proxy


def test_sigterm_is_forwarded(proxied, tmp_path):
    vm = Machine(proxied, tmp_path).launch()
    qemu = qemu_of(vm.pid)
    subprocess.run(["kill", "-TERM", str(vm.pid)], check=True)
    assert wait_gone(qemu) and wait_gone(vm.pid)
    assert vm.shutdown() == 0  # QEMU exits 0 on SIGTERM ("terminating on signal 15")


def test_qemu_dies_with_the_proxy(proxied, tmp_path):
    vm = Machine(proxied, tmp_path).launch()
    qemu = qemu_of(vm.pid)
    subprocess.run(["kill", "-KILL", str(vm.pid)], check=True)
    assert wait_gone(qemu), "QEMU outlived its proxy"
    vm.expect_abnormal_exit("the test SIGKILLs the proxy")
    assert vm.shutdown() == -signal.SIGKILL


# ------------------------------------------------------------------ units
def test_finds_the_qmp_chardev_of_either_monitor_syntax():
    args = ["-chardev", "socket,id=qmp,fd=7", "-object", "monitor-qmp,id=m,chardev=qmp",
            "-chardev", "socket,id=console,fd=9"]
    assert qmp_chardev(args) == (1, 7)
    assert qmp_chardev(["-chardev", "socket,id=q,fd=3", "-mon", "chardev=q,mode=control"]) \
        == (1, 3)
    assert qmp_chardev(["--version"]) is None
    assert qmp_chardev(["-chardev", "socket,id=console,fd=9", "-serial", "chardev:console"]) \
        is None


def test_guest_write_and_fault_matching():
    line = 'qemu-io -d disk0 "write -P 0x55 1048576 65536"'
    assert hmp_guest_write({"execute": "human-monitor-command",
                            "arguments": {"command-line": line}}) == (1048576, 65536)
    read = 'qemu-io snapshot "read -P 0xaa 0 65536"'
    assert hmp_guest_write({"execute": "human-monitor-command",
                            "arguments": {"command-line": read}}) is None
    fault = Fault(sector=2048, once=True, errno=5)
    assert fault.meets(1048576, 65536) and not fault.meets(2 * 1048576, 65536)


def test_regression_swaps_only_explicit_values():
    args = {"job-id": "j", "on-cbw-error": "break-snapshot",
            "target": {"driver": "copy-before-write", "on-cbw-error": "break-guest-write"}}
    assert swap_on_cbw_error(args) == {
        "job-id": "j", "on-cbw-error": "break-guest-write",
        "target": {"driver": "copy-before-write", "on-cbw-error": "break-snapshot"}}
