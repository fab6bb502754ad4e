"""Self-tests that run pytest with the plugin, as a user would, against real QEMU."""

from __future__ import annotations

import os
import re
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


REPO = Path(__file__).resolve().parents[2]
QEMU_VARIABLES = ("QEMU_PROG", "QEMU_IMG_PROG", "QEMU_IO_PROG", "CBW_QEMU_RELEASE")


def run_pytest(tmp: Path, test_source: str, *args: str, env: dict[str, str] | None = None,
               build: builds.QemuBuild | None = None, wait: bool = True,
               cache: bool = False):
    (tmp / "test_inner.py").write_text(textwrap.dedent(test_source))
    full_env = {k: v for k, v in os.environ.items() if k not in QEMU_VARIABLES}
    full_env.update({**(build.as_env() if build else {}), **(env or {})})
    full_env.pop("PYTEST_XDIST_WORKER", None)
    full_env.pop("PYTEST_ADDOPTS", None)
    # -p no:hypothesispytest as the project's addopts say (the inner run's rootdir has none).
    argv = [sys.executable, "-m", "pytest", "-p", "harness.plugin", "-p", "no:hypothesispytest",
            *([] if cache else ["-p", "no:cacheprovider"]),
            "--rootdir", str(tmp), "--artifacts", str(tmp / "artifacts"), *args,
            str(tmp / "test_inner.py")]
    if not wait:
        return subprocess.Popen(argv, cwd=tmp, env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return subprocess.run(argv, cwd=tmp, env=full_env, capture_output=True, text=True,
                          timeout=180)


# Loaded (-p) into an inner pytest that a test interrupts: SIGUSR1 then prints the stack
# of every thread of every process of it (controller and xdist workers), so that an
# interrupted run that does not end in time shows where it is.
STACK_DUMPER = """
import faulthandler, signal
faulthandler.register(signal.SIGUSR1, all_threads=True)
"""


def run_interruptible(tmp: Path, test_source: str, *args: str, env: dict[str, str],
                      build: builds.QemuBuild) -> subprocess.Popen[str]:
    """``run_pytest(..., wait=False)``, its processes ready to show their stacks
    (:func:`ended_within`)."""
    (tmp / "cbw_stack_dumper.py").write_text(STACK_DUMPER)
    path = os.pathsep.join(p for p in (str(tmp), os.environ.get("PYTHONPATH")) if p)
    proc: subprocess.Popen[str] = run_pytest(tmp, test_source, "-p", "cbw_stack_dumper", *args,
                                             build=build, wait=False,
                                             env={**env, "PYTHONPATH": path})
    return proc


def ended_within(proc: subprocess.Popen[str], timeout: float, what: str) -> str:
    """The output of ``proc`` once it ends; if it has not ended within ``timeout`` s, the
    test fails with the stacks of all its threads (SIGUSR1) and it is killed."""
    try:
        out, _ = proc.communicate(timeout=timeout)
        return out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGUSR1)
        try:
            out, _ = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        pytest.fail(f"the inner pytest did not end within {timeout:g} s of {what}; its "
                    f"output, with the stacks of its threads at that moment:\n{out[-12000:]}")


def wait_for_file(path: Path, proc: subprocess.Popen[str], timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text()):
        assert proc.poll() is None, f"inner pytest ended early:\n{proc.communicate()[0]}"
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
            "vm0.reproduce.sh", "vm0.replay.json", "replay.py"} <= names
    conversation = (folder / "vm0.conversation.txt").read_text()
    assert '"execute": "stop"' in conversation and '"event": "STOP"' in conversation
    assert f"replay by hand: python3 {folder / 'replay.py'} " in result.stdout


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
    proc = run_interruptible(tmp_path, HANGING_TEST, build=qemu_build,
                             env={"PIDFILE": str(pidfile)})
    try:
        qemu_pid = int(wait_for_file(pidfile, proc))
        os.kill(proc.pid, sig)
        out = ended_within(proc, 15, sig.name)
        deadline = time.monotonic() + 5
        while not process_gone(qemu_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process_gone(qemu_pid), f"QEMU {qemu_pid} outlived pytest ({sig.name})"
        if sig == signal.SIGINT:
            assert "KeyboardInterrupt" in out
            assert "cbw-harness: interrupted: killed 1 running QEMU process; removing " in out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_interrupted_xdist_run_is_quick_says_so_and_cleans_up(tmp_path, qemu_build):
    """Ctrl-C on ``-n 2``: every QEMU killed at once (no graceful quit each), a message
    saying so, and no ``cbw-run-*`` folder left in TMPDIR."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    source = HANGING_TEST.replace('os.environ["PIDFILE"]',
                                  'os.environ["PIDFILE"] + os.environ["PYTEST_XDIST_WORKER"]')
    source += "\ndef test_waits_too(launch_vm):\n    test_waits(launch_vm)\n"
    proc = run_interruptible(tmp_path, source, "-n", "2", build=qemu_build,
                             env={"PIDFILE": str(tmp_path / "qemu.pid."), "TMPDIR": str(tmpdir)})
    try:
        pids = [int(wait_for_file(tmp_path / f"qemu.pid.gw{n}", proc)) for n in (0, 1)]
        assert list(tmpdir.glob("cbw-run-*")), "the run keeps its folder in TMPDIR"
        start = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        out = ended_within(proc, 30, "SIGINT")
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "cbw-harness: interrupted: the workers kill their QEMUs; removing " in out, out
    assert "cbw-harness: killed 1 running QEMU process" in out, out
    assert all(process_gone(pid) for pid in pids)
    assert not list(tmpdir.glob("cbw-run-*")), "the interrupted run left its folder"
    assert took < 15, f"interrupting took {took:.1f} s"


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


# ------------------------------------------------------------ no QEMU where none is needed

PURE_AND_QEMU_TESTS = """
import pytest
def test_pure():
    assert 1 + 1 == 2
@pytest.mark.requires("blockdev-backup.on-cbw-error")
def test_vm(launch_vm):
    launch_vm()
"""


def test_help_needs_no_build(tmp_path):
    result = run_pytest(tmp_path, "def test_x(): pass", "--qemu-prog", "/nonexistent", "--help")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--allow-mixed-versions" in result.stdout and "--qemu-build=DIR" in result.stdout


@pytest.mark.parametrize("args", [["--collect-only"], ["-k", "pure"], ["-n", "2", "-k", "pure"],
                                  ["-p", "no:xdist", "-k", "pure"]],
                         ids=["collect-only", "pure-unit", "pure-unit-xdist", "without-xdist"])
def test_no_download_and_no_probe_unless_a_test_needs_the_build(tmp_path, args):
    """With an empty cache: listing tests, or running only pure ones, fetches nothing
    and starts no QEMU."""
    cache = tmp_path / "cache"
    cache.mkdir()
    result = run_pytest(tmp_path, PURE_AND_QEMU_TESTS, *args, env={"CBW_CACHE_DIR": str(cache)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert list(cache.iterdir()) == [], "something was fetched"
    if "-k" in args:
        assert "1 passed" in result.stdout and "failed" not in result.stdout
        assert "QEMU: not started (no selected test needed it)" in result.stdout
    else:
        assert "2 tests collected" in result.stdout


COUNTED_PROBES = """
import os
import harness.qemu.probe as probe
_probe = probe.probe
def counted(build):
    with open(os.environ["PROBES"], "a") as f:
        f.write("probe\\n")
    return _probe(build)
probe.probe = counted
def test_one(build_info):
    assert build_info.version
def test_two(launch_vm):
    launch_vm()
"""


def test_xdist_workers_share_one_probe(tmp_path, qemu_build):
    probes = tmp_path / "probes"
    result = run_pytest(tmp_path, COUNTED_PROBES, "-n", "2", build=qemu_build,
                        env={"PROBES": str(probes)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert probes.read_text() == "probe\n", "the build was probed more than once"
    assert "QEMU under test: " in result.stdout  # the controller shows what was probed


@pytest.mark.parametrize("jobs", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_not_a_qemu_binary_is_a_usage_error(tmp_path, qemu_build, jobs):
    result = run_pytest(tmp_path, PURE_AND_QEMU_TESTS, "--qemu-img-prog", "/bin/true", *jobs,
                        build=qemu_build)
    assert result.returncode == 4, result.stdout + result.stderr
    assert "/bin/true (--qemu-img-prog) is not a QEMU binary (its --version said 'true" \
        in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_qemu_prog_not_a_qemu_is_named_so(tmp_path):
    result = run_pytest(tmp_path, PURE_AND_QEMU_TESTS, env={"QEMU_PROG": "/bin/true"})
    assert result.returncode == 4, result.stdout + result.stderr
    assert "/bin/true (QEMU_PROG) is not a QEMU binary" in result.stderr
    assert "TCG" not in result.stderr


def test_mixed_versions_refused_unless_allowed(tmp_path, qemu_build):
    old = builds.provision("10.0")
    args = ["--qemu-img-prog", str(old / "qemu-img"), "-k", "vm"]
    refused = run_pytest(tmp_path, PURE_AND_QEMU_TESTS, *args, build=qemu_build)
    assert refused.returncode == 4, refused.stdout + refused.stderr
    line = refused.stderr.strip().splitlines()[-1]
    assert "binaries of different QEMU versions: qemu-system-x86_64 11.1" in line
    assert "qemu-img 10.0." in line and "(--qemu-img-prog)" in line
    assert "--allow-mixed-versions" in line
    allowed = run_pytest(tmp_path, PURE_AND_QEMU_TESTS, *args, "--allow-mixed-versions",
                         build=qemu_build)
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert "WARNING: binaries of different QEMU versions" in allowed.stdout
    assert "[--qemu-img-prog] qemu-img version 10.0." in allowed.stdout


def test_unwritable_artifacts_and_tmpdir_fail_up_front(tmp_path, qemu_build):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for args, env, message in [
            (["--artifacts", str(blocker / "artifacts")], {},
             f"--artifacts {blocker / 'artifacts'}: cannot write there"),
            ([], {"TMPDIR": str(blocker)}, f"TMPDIR {blocker}: cannot create the run's folder")]:
        result = run_pytest(tmp_path, PURE_AND_QEMU_TESTS, *args, build=qemu_build, env=env)
        assert result.returncode == 4, result.stdout + result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr
        assert "passed" not in result.stdout, "tests ran before the check"


def test_guest_kernel_unavailable_names_the_ways_out(tmp_path):
    """A host without apt: the guest kernel's failure names --guest-kernel and
    -m 'not guest' (the QEMU's names --qemu-build, see test_units)."""
    source = """
import harness.qemu.debian as debian
debian.shutil.which = lambda name: None  # a host without apt
def test_guest(guest_image):
    pass
"""
    result = run_pytest(tmp_path, source, env={"CBW_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "not a Debian-family host" in result.stdout
    assert "--guest-kernel bzImage" in result.stdout and "-m 'not guest'" in result.stdout
    assert "QEMU_PROG" not in result.stdout


def test_last_failed_reruns_only_the_failure(tmp_path):
    """The project's pytest settings keep the cache provider: --lf / --sw work."""
    source = "def test_fails():\n    assert False\ndef test_passes():\n    pass\n"
    config = ["-c", str(REPO / "pyproject.toml")]
    first = run_pytest(tmp_path, source, *config, cache=True)
    assert "1 failed, 1 passed" in first.stdout, first.stdout
    again = run_pytest(tmp_path, source, *config, "--lf", cache=True)
    assert "run-last-failure: rerun previous 1 failure" in again.stdout, again.stdout
    assert "1 failed, 1 deselected" in again.stdout, again.stdout


def test_provisioned_qemu_carries_its_name(launch_vm, qemu_build):
    """pgrep/pidof find the provisioned QEMU by its name, and the PID is QEMU's own."""
    if not qemu_build.release:
        pytest.skip("a provisioned release runs through a wrapper; this build does not")
    vm = launch_vm()
    assert Path(f"/proc/{vm.pid}/comm").read_text().strip() == "qemu-system-x86"
    pgrep = subprocess.run(["pgrep", "-x", "qemu-system-x86"], capture_output=True, text=True)
    assert str(vm.pid) in pgrep.stdout.split()
    pidof = subprocess.run(["pidof", "qemu-system-x86_64"], capture_output=True, text=True)
    assert str(vm.pid) in pidof.stdout.split()
    assert vm.cmd("query-status")["status"] == "running"  # the PID we hold is QEMU's


def make(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "-C", str(REPO), *args], capture_output=True, text=True,
                          timeout=timeout)


def test_make_run_with_a_user_build_downloads_no_qemu():
    for given in ("--qemu-build=~/qemu/build", "--qemu-prog /x/qemu-system-x86_64",
                  "--qemu-release 10.0"):
        plan = make("-n", "run", f"PYTEST_ARGS={given}").stdout
        assert "-m harness.provision --no-qemu" in plan, plan
    plan = make("-n", "run", "PYTEST_ARGS=").stdout
    assert "-m harness.provision 11.1" in plan and "--kernel" in plan
    assert "--kernel" not in make("-n", "run", "PYTEST_ARGS=-m 'not guest'").stdout


def test_make_check_selecting_nothing_fails_saying_so(tmp_path):
    # -o lint: the outer make check ran the static checks; this is about pytest's exit 5.
    result = make("-o", "lint", "check", "JOBS=0",
                  f"PYTEST_ARGS=-k no_test_has_this_name --artifacts {tmp_path}")
    assert result.returncode != 0
    assert "no test was selected (pytest exit 5): check PYTEST_ARGS" in result.stderr


def test_shared_run_serves_tests_on_both_workers_and_keeps_a_failures_files(tmp_path,
                                                                           qemu_build):
    """Three tests share one QEMU run under -n 2: QEMU starts once, each test gets its
    outcome, and the failing one keeps the shared run's QMP conversation."""
    launches = tmp_path / "launches"
    source = f"""
import pytest

def boot(launch_vm, images):
    with open({str(launches)!r}, "a") as fh:
        fh.write("launch\\n")
    vm = launch_vm(name="shared-vm")
    vm.cmd("stop")
    return vm.cmd("query-status")["status"]

@pytest.mark.parametrize("want", ["paused", "paused", "running"])
def test_checks(shared_run, want):
    assert shared_run("one-boot", boot) == want
"""
    result = run_pytest(tmp_path, source, "-n", "2", "-v", build=qemu_build)
    assert result.returncode == 1, result.stdout
    assert "2 passed" in result.stdout and "1 failed" in result.stdout, result.stdout
    kept = [p for p in (tmp_path / "artifacts").iterdir() if p.is_dir()]
    assert [p.name for p in kept] == ["test_inner.py_test_checks_running"], kept
    conversation = (kept[0] / "shared-vm.conversation.txt").read_text()
    assert '"execute": "stop"' in conversation, conversation
    assert "replay by hand" in result.stdout
    workers = set(re.findall(r"\[(gw\d)\] .*test_checks", result.stdout))
    assert workers == {"gw0", "gw1"}, result.stdout
    assert launches.read_text() == "launch\n", "one QEMU run for the three tests"
