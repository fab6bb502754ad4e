"""The pytest plugin: options, fixtures, artifacts; the run's state and its hooks are
a :class:`~harness.plugin.session.HarnessRun` registered at configure time.

Hooks stay thin; the work is in the library modules.  Configuration precedence:
fixture argument > command-line option > environment > default.  Nothing runs QEMU or
fetches it until a selected test needs the build.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ..block.images import Images
from ..errors import HarnessError
from ..qemu import builds, probe
from ..qemu.conversation import render
from ..qemu.machine import Launcher, Machine
from ..qemu.reproducer import write_replay
from ..qemu.transcript import Transcript, compare, reference_path
from .departures import departure_of
from .reference import regenerate
from .session import (
    ARTIFACTS_MARK,
    PLUGIN_NAME,
    HarnessRun,
    check_artifacts_dir,
    make_run_dir,
    reset_artifacts,
)
from .shared import shared

if TYPE_CHECKING:
    from ..guest.vm import GuestImage

pytest_plugins = [
    "harness.plugin.departures",  # strict xfails from the departures registry
    "harness.plugin.results",  # results.json: what the matrix and diff read
    "harness.plugin.schedule",  # the order tests run in: longest first, for xdist
]

_live_machines: weakref.WeakSet[Machine] = weakref.WeakSet()
_phase_reports = pytest.StashKey[dict[str, pytest.TestReport]]()
_workdir_key = pytest.StashKey[Path]()
_run_key = pytest.StashKey[HarnessRun]()
# The test's failure line for replay.py, and abnormal QEMU exits met at teardown.
_failure_key = pytest.StashKey[str]()
_teardown_failures = pytest.StashKey[list[str]]()


@atexit.register
def _kill_leftovers() -> int:
    """Last line of defence (the parent-death signal is the other): no QEMU outlives us.
    Returns how many were still running."""
    running = [vm for vm in list(_live_machines) if vm.is_running]
    for vm in running:
        vm.kill()
    return len(running)


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("cbw-harness", "QEMU copy-before-write harness")
    g.addoption("--qemu-build", metavar="DIR",
                help="QEMU build directory holding qemu-system-x86_64, qemu-img, qemu-io")
    g.addoption("--qemu-prog", metavar="PATH", help="qemu-system-x86_64 to test")
    g.addoption("--qemu-img-prog", metavar="PATH", help="qemu-img to use")
    g.addoption("--qemu-io-prog", metavar="PATH", help="qemu-io to use")
    g.addoption("--qemu-release", metavar="NAME",
                default=os.environ.get("CBW_QEMU_RELEASE"),
                help=f"provisioned Debian QEMU release: {', '.join(builds.RELEASES)} "
                     f"(default {builds.DEFAULT_RELEASE}; env CBW_QEMU_RELEASE)")
    g.addoption("--allow-mixed-versions", action="store_true",
                help="run even if qemu-system-x86_64, qemu-img and qemu-io report "
                     "different versions (otherwise a usage error)")
    g.addoption("--artifacts", metavar="DIR", default=os.environ.get("CBW_ARTIFACTS",
                                                                     "artifacts"),
                help="where failed tests keep their QMP log, QEMU output and reproducer")
    g.addoption("--keep-all-artifacts", action="store_true",
                help="keep the folder of passing tests too")
    g.addoption("--keep-replays", action="store_true",
                help="keep the folder (with replay.py) of expected failures (known QEMU "
                     "departures) too, as of failed tests")
    g.addoption("--regen-reference", action="store_true",
                help="rewrite the reference transcripts (.out) from this run; on a build "
                     f"other than release {builds.DEFAULT_RELEASE}, only "
                     "<test>.<major>.<minor>.out files where its text differs")
    g.addoption("--guest-kernel", metavar="PATH", default=os.environ.get("CBW_GUEST_KERNEL"),
                help="bzImage of your own guest kernel (default: Debian's cloud kernel, "
                     "provisioned; env CBW_GUEST_KERNEL)")
    g.addoption("--guest-modules", metavar="DIR", default=os.environ.get("CBW_GUEST_MODULES"),
                help="its lib/modules/<version> directory; without it the kernel's disk "
                     "drivers must be built in (env CBW_GUEST_MODULES)")
    g.addoption("--qmp-timeout", type=float, default=None, metavar="SECONDS",
                help="default time limit for QMP replies and awaited events")


# ------------------------------------------------------------- configuration
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "requires(*capabilities): skip unless the build "
                            "has these capabilities (see harness.qemu.probe.CAPABILITIES)")
    config.addinivalue_line("markers", "guest: boots a real Linux guest (deselect: -m 'not guest')")
    config.addinivalue_line("markers", "selftest: a test of the harness itself")
    config.addinivalue_line("markers", "waits: the test waits seconds of real time (a "
                            "timeout, a throttled copy): run among the first")
    config.addinivalue_line("markers", "shares(key): the test checks the run it shares "
                            "(shared_run) with the other tests of this key: only the "
                            "first of them pays for it")
    config.addinivalue_line("markers", "slow: the slow tier: long waits for no verdict a "
                            "shorter case lacks, and end-to-end runs of the tools (git "
                            "bisect, the CI template, replays of a guest or a livelock); "
                            "make check leaves them out, make check SPEED=slow and CI run them")
    config.addinivalue_line("markers", "expect_abnormal_exit(reason): the test's QEMUs may "
                            "end on a signal or a non-zero status without failing it")
    if config.option.help or config.option.version:
        return  # --help / --version: no build, no folders
    worker = getattr(config, "workerinput", None)
    try:
        choice = builds.choose(
            qemu_build=config.getoption("qemu_build"), qemu_prog=config.getoption("qemu_prog"),
            qemu_img_prog=config.getoption("qemu_img_prog"),
            qemu_io_prog=config.getoption("qemu_io_prog"),
            release=config.getoption("qemu_release"))
        if worker is None:
            artifacts = check_artifacts_dir(Path(config.getoption("artifacts")))
            if not config.option.collectonly:  # listing tests keeps the last run's
                reset_artifacts(artifacts)
            run_dir = make_run_dir()
        else:
            run_dir = Path(worker["cbw_run_dir"])
    except HarnessError as exc:
        raise pytest.UsageError(str(exc)) from None
    run = HarnessRun(config, choice, run_dir, owns_run_dir=worker is None,
                     kill_machines=_kill_leftovers)
    config.stash[_run_key] = run
    config.pluginmanager.register(run, PLUGIN_NAME)


def pytest_unconfigure(config: pytest.Config) -> None:
    _kill_leftovers()
    run = config.stash.get(_run_key, None)
    if run is not None:
        run.close()


def harness_run(config: pytest.Config) -> HarnessRun:
    return config.stash[_run_key]


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def build_info(pytestconfig: pytest.Config) -> probe.BuildInfo:
    """The probed build under test (version, schema, capabilities)."""
    try:
        return harness_run(pytestconfig).info
    except HarnessError as exc:
        pytest.fail(f"QEMU under test: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def qemu_build(build_info: probe.BuildInfo) -> builds.QemuBuild:
    return build_info.build


@pytest.fixture
def workdir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A folder of the test's own; kept as its artifacts if the test fails."""
    path = Path(tempfile.mkdtemp(prefix="t-", dir=harness_run(request.config).run_dir))
    request.node.stash[_workdir_key] = path
    yield path
    reports = request.node.stash.get(_phase_reports, {})
    failed = any(r.failed for r in reports.values()) or \
        bool(request.node.stash.get(_teardown_failures, []))
    xfailed = any(hasattr(r, "wasxfail") for r in reports.values())
    if failed or request.config.getoption("keep_all_artifacts") or \
            (xfailed and request.config.getoption("keep_replays")):
        dest = _artifacts_dir(request.node)
        _keep_artifacts(path, dest)
        write_replay(dest, request.node.nodeid,
                     request.node.stash.get(_failure_key, "(the test passed)"))
    else:
        shutil.rmtree(path, ignore_errors=True)


def _artifacts_dir(item: pytest.Item) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.=-]+", "_", item.nodeid).strip("_")[:180]
    return harness_run(item.config).artifacts / name


def _keep_artifacts(src: Path, dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(src), str(dest))
    (dest / ARTIFACTS_MARK).touch()
    for log in dest.glob("*.qmp.log"):
        (dest / log.name.replace(".qmp.log", ".conversation.txt")).write_text(render(log, 10**6))


@pytest.fixture
def transcript() -> Transcript:
    """The test's iotests-style transcript (compare it with :func:`check_transcript`)."""
    return Transcript()


@pytest.fixture
def check_transcript(request: pytest.FixtureRequest, build_info: probe.BuildInfo,
                     transcript: Transcript) -> Callable[[], None]:
    """Compare the transcript with ``reference/<module>/<test>.out`` beside the test
    (not for a departure expected on this build: its transcript is QEMU's wrong story)."""
    def check() -> None:
        if departure_of(request.node) is not None:
            return
        test_file = Path(str(request.node.path))
        folder = test_file.parent / "reference" / test_file.stem
        if request.config.getoption("regen_reference"):
            regenerate(transcript.text, folder, request.node.name, build_info.version_tuple)
            return
        ref = reference_path(folder, request.node.name, build_info.version_tuple)
        compare(transcript.text, ref, regenerate=False)
    return check


@pytest.fixture
def images(qemu_build: builds.QemuBuild, workdir: Path) -> Images:
    """qemu-img / qemu-io of the build under test, working in the test's folder."""
    return Images(qemu_build, workdir)


def _launcher(config: pytest.Config, build: builds.QemuBuild, folder: Path) -> Launcher:
    """Machines in ``folder`` with the run's QMP time limit, each known to the Ctrl-C
    handler (``_live_machines``)."""
    timeout = config.getoption("qmp_timeout")
    defaults = {} if timeout is None else {"command_timeout": timeout, "event_timeout": timeout}
    return Launcher(build, folder, defaults=defaults, on_start=_live_machines.add)


@pytest.fixture
def launch_vm(request: pytest.FixtureRequest, qemu_build: builds.QemuBuild,
              workdir: Path) -> Iterator[Callable[..., Machine]]:
    """Factory: ``vm = launch_vm(args=[...])`` starts a machine, torn down with the test."""
    launch = _launcher(request.config, qemu_build, workdir)
    yield launch
    # QEMU's exit is part of the verdict: an abort or a non-zero status (also in answer
    # to quit) fails the test, unless it declared it expects one.
    mark = request.node.get_closest_marker("expect_abnormal_exit")
    problems = launch.shut_down(None if mark is None else
                                str(mark.args[0]) if mark.args else "marked")
    if problems:
        request.node.stash[_teardown_failures] = [str(p) for p in problems]
        request.node.stash.setdefault(_failure_key, problems[0].message)
        raise problems[0]


@pytest.fixture
def shared_run(request: pytest.FixtureRequest, qemu_build: builds.QemuBuild,
               workdir: Path) -> Callable[..., Any]:
    """``shared_run(key, make)``: ``make(launch_vm, images)`` run once for ``key`` in this
    run, whichever xdist worker asks first; its outcome is returned to every test that
    asks, with the run's files (QMP log, QEMU's output, images) linked into the test's
    folder (:mod:`harness.plugin.shared`; ``part=``: the files of that subfolder only).
    Every machine ``make`` starts with ``launch_vm`` is gone when it returns; an abnormal
    exit among them is raised, to every test that asks."""
    base = harness_run(request.config).run_dir / "shared"

    def run(key: str, make: Callable[[Launcher, Images], Any], part: str | None = None
            ) -> Any:
        def in_folder(folder: Path) -> Any:
            launch = _launcher(request.config, qemu_build, folder)
            try:
                result = make(launch, Images(qemu_build, folder))
            finally:
                problems = launch.shut_down()
            if problems:
                raise problems[0]
            return result
        return shared(base, key, workdir, in_folder, part)
    return run


# ------------------------------------------------------ reports and summary
@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    item.stash.setdefault(_phase_reports, {})[report.when] = report
    if call.excinfo is not None and _failure_key not in item.stash:
        item.stash[_failure_key] = call.excinfo.exconly().splitlines()[0][:300]
    workdir = item.stash.get(_workdir_key, None)
    if report.failed and workdir is not None:
        report.sections.append(("cbw-harness", _failure_context(item, workdir)))
    return report


def _failure_context(item: pytest.Item, workdir: Path) -> str:
    """Where the test's files will be kept, and the last QMP messages of each QEMU.

    Read from the test's folder, or from its artifacts once moved there (a failure at
    teardown is reported after the move); the paths shown are those that stay.
    """
    dest = _artifacts_dir(item)
    folder = workdir if workdir.is_dir() else dest
    lines = [f"artifacts: {dest}"]
    logs = sorted(folder.glob("*.qmp.log"))
    if logs:
        lines.append(f"replay by hand: python3 {dest / 'replay.py'} <qemu-system-x86_64>"
                     + (" --case <vm>.replay.json" if len(logs) > 1 else ""))
    for log in logs:
        name = log.name[: -len(".qmp.log")]
        lines.append(f"last QMP messages of {name} ({dest / (name + '.conversation.txt')}):")
        lines.append(render(log, 25))
        err = folder / f"{name}.stderr"
        if err.exists() and err.stat().st_size:
            tail = err.read_text(errors="replace").strip().splitlines()[-10:]
            lines.append(f"{name} stderr (tail):\n  " + "\n  ".join(tail))
    return "\n".join(lines)


@pytest.fixture
def summary_row(request: pytest.FixtureRequest) -> Callable[..., None]:
    """Attach a row to the run's summary table: ``summary_row(scenario=..., ...)``."""
    def add(**row: Any) -> None:
        request.node.user_properties.append(("cbw-summary", row))
    return add


# ========================================================== guest kernel (real guests)
# Options and the session fixture for tests that boot a Linux guest (marker ``guest``).
# Precedence: --guest-kernel/--guest-modules > CBW_GUEST_KERNEL/CBW_GUEST_MODULES >
# Debian's kernel, provisioned and cached.

@pytest.fixture(scope="session")
def guest_image(pytestconfig: pytest.Config) -> GuestImage:
    """The guest's kernel, busybox and initramfs (:class:`harness.guest.GuestImage`), made
    once per session; built files are cached on disk, so xdist workers share them."""
    from ..errors import ConfigError
    from ..guest.vm import GuestImage
    kernel = pytestconfig.getoption("guest_kernel")
    modules = pytestconfig.getoption("guest_modules")
    try:
        if kernel:
            return GuestImage.from_user(kernel, modules)
        if modules:
            raise ConfigError("--guest-modules needs --guest-kernel: the modules of which "
                              "kernel?")
        return GuestImage.provision()
    except HarnessError as exc:
        fix = ("" if kernel else "; bring your own with --guest-kernel bzImage "
               "[--guest-modules DIR], or leave guest tests out with -m 'not guest'")
        pytest.fail(f"guest kernel: {exc}{fix}", pytrace=False)
