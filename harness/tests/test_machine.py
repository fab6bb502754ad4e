"""Self-tests of the machine lifecycle, each against a real QEMU."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.errors import (
    AbnormalShutdown,
    CommandFailed,
    LaunchFailure,
    QEMUDied,
    QEMUError,
    QEMUUnresponsive,
    WaitTimeout,
)
from harness.qemu.machine import Machine

pytestmark = pytest.mark.selftest


def process_gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def test_sigkill_while_waiting_on_event_raises_died_at_once(launch_vm):
    vm = launch_vm()
    pid = vm.pid
    # Deliver the signal from outside the harness while it waits.
    killer = subprocess.Popen(["sh", "-c", f"sleep 0.3; kill -KILL {pid}"])
    start = time.monotonic()
    with pytest.raises(QEMUDied) as info:
        vm.wait_event("BLOCK_JOB_COMPLETED", timeout=30)
    elapsed = time.monotonic() - start
    killer.wait()
    assert elapsed < 3, f"waited {elapsed:.1f}s for a dead QEMU"
    assert "killed by signal 9 (SIGKILL)" in str(info.value)
    assert info.value.cmdline[0] == str(vm.build.qemu_system)
    vm.shutdown()
    assert process_gone(pid)


def test_sigstopped_qemu_is_reported_unresponsive_and_torn_down(launch_vm):
    vm = launch_vm()
    pid = vm.pid
    vm.kill(signal.SIGSTOP)
    start = time.monotonic()
    with pytest.raises(QEMUUnresponsive) as info:
        vm.cmd("query-status", timeout=0.5)
    assert time.monotonic() - start < 4
    assert "stopped answering" in str(info.value) and "stopped (SIGSTOP?)" in str(info.value)
    start = time.monotonic()
    vm.shutdown(quit_timeout=0.5)
    assert time.monotonic() - start < 5
    assert vm.killed_by_harness
    assert process_gone(pid)


def test_event_wait_times_out_clearly_while_qemu_answers(launch_vm):
    vm = launch_vm()
    with pytest.raises(WaitTimeout) as info:
        vm.wait_event("BLOCK_JOB_COMPLETED", {"device": "nothing"}, timeout=0.5)
    assert "QEMU still answers QMP" in str(info.value)
    assert vm.cmd("query-status")["status"] == "running"


def test_missing_binary_fails_launch_with_one_line(qemu_build, workdir):
    from dataclasses import replace
    broken = replace(qemu_build, qemu_system=workdir / "no-such-qemu")
    with pytest.raises(LaunchFailure) as info:
        Machine(broken, workdir).launch()
    assert "no-such-qemu" in str(info.value) and "\n" not in str(info.value)


def test_bad_command_line_reports_qemu_output(launch_vm):
    with pytest.raises(LaunchFailure) as info:
        launch_vm(["-blockdev", "driver=no-such-driver,node-name=x"])
    assert "no-such-driver" in str(info.value)  # QEMU's own complaint is carried along
    assert "exit status 1" in str(info.value)


def test_harness_command_line_draws_no_warning_from_qemu(launch_vm):
    vm = launch_vm()
    vm.cmd("query-status")
    vm.shutdown()
    assert vm.stderr_path.read_text() == "", "QEMU warned about the harness's command line"


def test_deep_workdir_beyond_socket_path_limit(qemu_build, workdir):
    deep = workdir
    while len(str(deep)) < 300:  # sun_path holds 108 bytes
        deep = deep / ("d" * 50)
    with Machine(qemu_build, deep) as vm:
        assert vm.cmd("query-status")["running"]


def test_events_are_kept_in_order_and_matched_partially(launch_vm):
    vm = launch_vm()
    vm.cmd("stop")
    vm.cmd("cont")
    resume = vm.wait_event("RESUME")
    stop = vm.wait_event("STOP")  # arrived first, still found: waits consume, not discard
    assert [e["event"] for e in vm.events] == ["STOP", "RESUME"]
    assert stop is vm.events[0] and resume is vm.events[1]
    with pytest.raises(WaitTimeout):  # each event is returned by one wait only
        vm.wait_event("STOP", timeout=0.3)


def test_qemu_io_returns_what_qemu_printed(launch_vm, images):
    src = images.create("src.qcow2", "1M")
    vm = launch_vm(["-blockdev", json.dumps({"driver": "qcow2", "node-name": "src", "file": {
        "driver": "file", "filename": str(src)}}),
        "-device", "virtio-scsi,id=scsi", "-device", "scsi-hd,drive=src,id=disk0"])
    wrote = vm.qemu_io("disk0", "write -P 0x5a 0 64k")
    assert wrote.ok and "wrote 65536/65536 bytes at offset 0" in wrote.output
    mismatch = vm.qemu_io("disk0", "read -P 0x11 0 64k")
    assert not mismatch.ok and "Pattern verification failed" in mismatch.error


def test_reproducer_script_starts_the_same_qemu(launch_vm, workdir):
    vm = launch_vm()
    script = vm.reproducer_path
    proc = subprocess.Popen(["sh", str(script)], cwd="/", start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        sock_path = workdir / "qmp.sock"
        deadline = time.monotonic() + 10
        sock = socket.socket(socket.AF_UNIX)
        while True:
            try:
                sock.connect(str(sock_path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                assert proc.poll() is None, proc.communicate()[1].decode()
                assert time.monotonic() < deadline, "reproducer's QEMU never listened"
                time.sleep(0.05)
        greeting = json.loads(sock.makefile().readline())
        assert "QMP" in greeting
        sock.close()
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_images_pattern_checks_with_the_builds_tools(images):
    img = images.create("a.raw", "1M", "raw")
    images.write(img, 0x5A, 0, "64k", "raw")
    assert images.holds(img, 0x5A, 0, "64k", "raw")
    assert not images.holds(img, 0x5A, "64k", "64k", "raw")
    assert images.holds_each(img, 0x5A, [0, 65536, 131072], 65536, "raw") == {
        0: True, 65536: False, 131072: False}
    other = images.create("b.raw", "1M", "raw")
    assert not images.identical(img, other, "raw", "raw")
    images.write(other, 0x5A, 0, "64k", "raw")
    assert images.identical(img, other, "raw", "raw")


def test_refused_command_is_not_a_qemu_error(launch_vm):
    """A refused command leaves QEMU fine: the process-error branches must not catch it."""
    vm = launch_vm()
    with pytest.raises(CommandFailed) as info:
        vm.cmd("no-such-command")
    assert not isinstance(info.value, QEMUError)
    assert info.value.error_class == "CommandNotFound"
    assert vm.qmp("no-such-command")["error"]["class"] == "CommandNotFound"


def test_quit_timeout_zero_kills_at_once_without_quit(launch_vm):
    vm = launch_vm()
    start = time.monotonic()
    assert vm.shutdown(quit_timeout=0) == -signal.SIGKILL  # on purpose: no AbnormalShutdown
    assert time.monotonic() - start < 2
    assert '"quit"' not in vm.qmp_log_path.read_text()


def test_ignored_quit_is_an_abnormal_shutdown(launch_vm):
    vm = launch_vm()
    vm.kill(signal.SIGSTOP)  # it cannot answer quit
    with pytest.raises(AbnormalShutdown) as info:
        vm.shutdown(quit_timeout=0.5)
    assert "did not exit within 0.5s of quit" in str(info.value)
    assert vm.killed_by_harness
    vm.shutdown()  # once raised, never again (the fixture's teardown calls it too)


def test_qmp_library_queues_no_events(launch_vm):
    """Events are kept once, in the machine's capped list, not also in qemu.qmp's
    default listener, which is unbounded."""
    vm = launch_vm()
    for _ in range(3):
        vm.cmd("stop")
        vm.cmd("cont")
    vm.wait_event("RESUME")
    assert len(vm.events) == 6
    assert vm._client is not None and vm._client.events.empty()


def test_build_directory_of_symlinks_runs(qemu_build, tmp_path):
    """A build directory made of links to the binaries (as bisect and CI scripts make)
    runs the same QEMU: the provisioned wrappers find their prefix through the link."""
    link = tmp_path / "qemu-system-x86_64"
    link.symlink_to(qemu_build.qemu_system)
    out = subprocess.run([str(link), "--version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "QEMU emulator version" in out.stdout, out.stderr


def test_probe_is_cached_per_set_of_binaries_and_redone_when_one_changes(
        qemu_build, tmp_path, monkeypatch):
    """The probe cache serves the same binaries again without starting QEMU, and a
    binary that changed on disk (rebuilt, re-provisioned) is probed again."""
    from harness.qemu import builds, probe

    monkeypatch.setenv("CBW_CACHE_DIR", str(tmp_path / "cache"))
    wrappers = {}
    for tool, real in (("qemu-system-x86_64", qemu_build.qemu_system),
                       ("qemu-img", qemu_build.qemu_img), ("qemu-io", qemu_build.qemu_io)):
        w = tmp_path / tool
        w.write_text(f"#!/bin/sh\nexec '{real}' \"$@\"\n")
        w.chmod(0o755)
        wrappers[tool] = w
    build = builds.QemuBuild(wrappers["qemu-system-x86_64"], wrappers["qemu-img"],
                             wrappers["qemu-io"])
    asked = []
    real_probe = probe._probe

    def counted(b):
        asked.append(b)
        return real_probe(b)
    monkeypatch.setattr(probe, "_probe", counted)

    first = probe.probe(build)
    again = probe.probe(build)
    assert len(asked) == 1, "the same binaries were probed twice"
    assert again.version == first.version and again.build is build
    assert again.schema.entries == first.schema.entries
    assert again.has("copy-before-write.cbw-timeout") == first.has("copy-before-write.cbw-timeout")

    wrappers["qemu-io"].write_text(wrappers["qemu-io"].read_text() + "# rebuilt\n")
    probe.probe(build)
    assert len(asked) == 2, "a changed binary must be probed again"


def test_forgotten_events_are_neither_awaited_nor_listed(launch_vm):
    vm = launch_vm()
    vm.cmd("stop")
    vm.wait_event("STOP")
    vm.cmd("cont")  # RESUME, not awaited
    vm.wait_event("RESUME")  # received; consumed here only to know it came
    vm.cmd("stop")
    assert vm.events_named("STOP")
    vm.forget_events()
    assert vm.events == [] and vm.events_named("STOP") == []
    with pytest.raises(WaitTimeout):
        vm.wait_event("STOP", timeout=0.2)
    vm.cmd("cont")
    assert vm.wait_event("RESUME")["event"] == "RESUME"  # later events as before


def test_launcher_shuts_down_what_it_started_even_on_error(qemu_build, tmp_path):
    from harness.qemu.machine import launcher

    pids = []
    with pytest.raises(RuntimeError), launcher(qemu_build, tmp_path) as launch:
        for name in ("a", "b"):
            vm = launch(name=name, machine_type="none")
            assert vm.cmd("query-status")["status"]
            pids.append(vm.pid)
        raise RuntimeError("the script failed midway")
    assert len(pids) == 2 and all(pid is not None and process_gone(pid) for pid in pids)



QEMU_OF_A_KILLED_HARNESS = """
import os, signal, sys
from pathlib import Path
from harness.qemu import machine
from harness.qemu.builds import QemuBuild
if sys.argv[3] == "preexec_fn":
    machine._pdeathsig_prefix = lambda: ()  # as on a host without setpriv
build = QemuBuild(**{k: Path(v) for k, v in eval(sys.argv[1]).items()})
vm = machine.Machine(build, Path(sys.argv[2]), machine_type="none").launch()
print(vm.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no teardown: only the parent-death signal is left
"""


@pytest.mark.parametrize("spawn", ["setpriv", "preexec_fn"])
def test_qemu_dies_with_the_harness_process(qemu_build, tmp_path, spawn):
    """Both ways QEMU gets its parent-death signal: setpriv's, or a preexec_fn's."""
    from harness.qemu import machine
    if spawn == "setpriv" and not machine._pdeathsig_prefix():
        pytest.skip("no setpriv with --pdeathsig on this host")
    paths = {"qemu_system": str(qemu_build.qemu_system), "qemu_img": str(qemu_build.qemu_img),
             "qemu_io": str(qemu_build.qemu_io)}
    proc = subprocess.run([sys.executable, "-c", QEMU_OF_A_KILLED_HARNESS, repr(paths),
                           str(tmp_path), spawn], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    pid = int(proc.stdout.split()[0])
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # gone and reaped already
    try:  # readable once QEMU has exited
        assert select.select([pidfd], [], [], 10)[0], f"QEMU {pid} outlived its harness process"
    finally:
        os.close(pidfd)
