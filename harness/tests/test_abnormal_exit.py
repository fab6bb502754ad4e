"""Self-tests: a QEMU that ends abnormally fails the test that ran it, with the status
and QEMU's last output, whether it dies mid-test or in answer to ``quit`` at teardown.

Each case runs an inner pytest against a real QEMU behind a wrapper script given as
``--qemu-prog``: the wrapper runs QEMU (not ``exec``) and then, once QEMU has exited
normally after ``quit``, prints an assertion-like line and aborts or exits 1, as a
QEMU whose close path fails would.  The probe's QEMU and ``--version`` runs go
straight to the real binary.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness.qemu.builds import QemuBuild
from harness.tests.test_plugin_runs import run_pytest

pytestmark = pytest.mark.selftest

LAST_WORDS = "simulated: bdrv_close: Assertion 'bs->refcnt == 0' failed."
AFTER_QUIT = {"sigabrt-on-quit": f"echo \"{LAST_WORDS}\" >&2\nkill -ABRT $$",
              "exit-1-on-quit": f"echo \"{LAST_WORDS}\" >&2\nexit 1"}
# How each way of ending reads in the report.
STATUS = {"sigabrt-on-quit": "killed by signal 6 (SIGABRT)",
          "exit-1-on-quit": "exit status 1",
          "sigsegv-mid-test": "killed by signal 11 (SIGSEGV)"}


def wrapper(folder: Path, build: QemuBuild, after_quit: str) -> Path:
    """A qemu-system-x86_64 that misbehaves once QEMU has exited, in tests only."""
    script = folder / "qemu-system-x86_64"
    real = build.qemu_system
    script.write_text(f"""#!/bin/sh
case "$*" in *id=qmp,fd=*) ;; *) exec "{real}" "$@";; esac
case "$PWD" in *cbw-probe-*) exec "{real}" "$@";; esac
"{real}" "$@"
{after_quit}
""")
    script.chmod(0o755)
    return script


def run_inner(tmp: Path, build: QemuBuild, source: str, how: str, *args: str):
    """Run ``source`` as an inner pytest; QEMU misbehaves as ``how`` says."""
    if how in AFTER_QUIT:
        qemu = wrapper(tmp, build, AFTER_QUIT[how])
        args = ("--qemu-prog", str(qemu), "--qemu-img-prog", str(build.qemu_img),
                "--qemu-io-prog", str(build.qemu_io), *args)
        build_env = None
    else:
        build_env = build
    return run_pytest(tmp, source, *args, build=build_env,
                      env={"CBW_HOW": how})


def assert_failed_with_status(result, how: str, *, qemu_said: str | None) -> None:
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert re.search(r"\b1 (failed|error)\b", out), out
    assert STATUS[how] in out, out
    if qemu_said:
        assert qemu_said in out, out  # the tail of QEMU's output is in the report


# A plain machine: QEMU answers one command; the test itself passes.
PLAIN = """
import os, signal, time
def test_plain(launch_vm):
    vm = launch_vm()
    assert vm.cmd("query-status")["running"]
    if os.environ["CBW_HOW"] == "sigsegv-mid-test":
        os.kill(vm.pid, signal.SIGSEGV)
"""

# A fleecing scenario to its data verdicts; QEMU is stopped by the scenario itself.
SCENARIO = """
import os, signal
from harness.scenarios.cbw import Layout, Scenario, ScenarioSpec, run
def test_scenario(launch_vm, images):
    s = Scenario(launch_vm, images, ScenarioSpec(Layout.FLEECING, on_cbw_error="break-snapshot"))
    if os.environ["CBW_HOW"] == "sigsegv-mid-test":
        s.start()
        os.kill(s.vm.pid, signal.SIGSEGV)
        s.guest_writes()
    else:
        obs = run(s)
        assert obs.source_holds_new
"""


@pytest.mark.parametrize("how", list(STATUS))
@pytest.mark.parametrize("kind", ["plain", "scenario"])
def test_abnormal_exit_fails_the_test(tmp_path, qemu_build, kind, how):
    result = run_inner(tmp_path, qemu_build, {"plain": PLAIN, "scenario": SCENARIO}[kind], how)
    assert_failed_with_status(result, how,
                              qemu_said=LAST_WORDS if how in AFTER_QUIT else None)


def test_declared_abnormal_exit_passes(tmp_path, qemu_build):
    source = """
import os, signal, pytest
@pytest.mark.expect_abnormal_exit("this test kills QEMU on purpose")
def test_plain(launch_vm):
    os.kill(launch_vm().pid, signal.SIGSEGV)
"""
    result = run_inner(tmp_path, qemu_build, source, "sigsegv-mid-test")
    assert result.returncode == 0, result.stdout


def test_one_error_when_the_test_already_met_the_death(tmp_path, qemu_build):
    """QEMUDied already failed the test: teardown adds no second error for it."""
    source = """
import os, signal
def test_dies(launch_vm):
    vm = launch_vm()
    os.kill(vm.pid, signal.SIGSEGV)
    vm.wait_event("NEVER", timeout=20)
"""
    result = run_inner(tmp_path, qemu_build, source, "sigsegv-mid-test")
    assert result.returncode == 1
    assert "1 failed" in result.stdout and " error" not in result.stdout.splitlines()[-1]
    assert "QEMU exited (killed by signal 11 (SIGSEGV))" in result.stdout


# A real guest: it boots, reads its disk, powers off.  A SIGSEGV mid-test comes
# from a wrapper that signals QEMU while the guest boots.
GUEST = """
from harness.guest.console import Read
from harness.guest.vm import GuestDisk, guest_devices, run_guest
def test_guest(launch_vm, images, guest_image):
    disk = GuestDisk("d0")
    run = run_guest(launch_vm, images, guest_image, [disk],
                    [Read(guest_devices([disk])["d0"], 0, 65536)])
    assert run.report.ops[0].ok
"""
SEGV_WHILE_BOOTING = "&\nq=$!\nsleep 1\nkill -SEGV $q\nwait $q\nkill -SEGV $$"


@pytest.mark.guest
# A guest's QEMU meets the same teardown as any other: one death after quit and one
# mid-test (test_abnormal_exit_fails_the_test covers each status without a guest).
# The death after quit waits for a whole boot and the plan: the slow tier.
@pytest.mark.parametrize("how", [pytest.param("exit-1-on-quit", marks=pytest.mark.slow),
                                 "sigsegv-mid-test"])
def test_abnormal_exit_of_a_guest_fails_the_test(tmp_path, qemu_build, guest_image, how):
    if how == "sigsegv-mid-test":
        qemu = wrapper(tmp_path, qemu_build, "")
        text = qemu.read_text().replace('"$@"\n\n', '"$@" ' + SEGV_WHILE_BOOTING + "\n")
        qemu.write_text(text)
        result = run_pytest(tmp_path, GUEST, "--qemu-prog", str(qemu), "--qemu-img-prog",
                            str(qemu_build.qemu_img), "--qemu-io-prog", str(qemu_build.qemu_io))
    else:
        result = run_inner(tmp_path, qemu_build, GUEST, how)
    assert_failed_with_status(result, how,
                              qemu_said=LAST_WORDS if how in AFTER_QUIT else None)
