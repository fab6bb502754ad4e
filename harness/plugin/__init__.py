"""The pytest plugin: build selection, capability skips, machines, artifacts, summary.

Hooks stay thin; the work is in the library modules.  Configuration precedence:
fixture argument > command-line option > environment > default.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import tempfile
import weakref
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ..block.images import Images
from ..errors import HarnessError, MissingCapability
from ..qemu import builds, probe
from ..qemu.conversation import render
from ..qemu.machine import Machine
from ..qemu.transcript import Transcript, compare, reference_path

if TYPE_CHECKING:
    from ..guest.vm import GuestImage

pytest_plugins = ["harness.plugin.results"]  # results.json: what the matrix and diff read

_live_machines: weakref.WeakSet[Machine] = weakref.WeakSet()
_ARTIFACTS_MARK = ".cbw-artifacts"
_phase_reports = pytest.StashKey[dict[str, pytest.TestReport]]()
_workdir_key = pytest.StashKey[Path]()


@atexit.register
def _kill_leftovers() -> None:
    """Last line of defence (the parent-death signal is the other): no QEMU outlives us."""
    for vm in list(_live_machines):
        vm.kill()


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
    g.addoption("--artifacts", metavar="DIR", default=os.environ.get("CBW_ARTIFACTS",
                                                                     "artifacts"),
                help="where failed tests keep their QMP log, QEMU output and reproducer")
    g.addoption("--keep-all-artifacts", action="store_true",
                help="keep the folder of passing tests too")
    g.addoption("--regen-reference", action="store_true",
                help="rewrite the reference transcripts (.out) from this run")
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
                            "has these capabilities (see harness.probe.CAPABILITIES)")
    config.addinivalue_line("markers", "guest: boots a real Linux guest (deselect: -m 'not guest')")
    config.addinivalue_line("markers", "selftest: a test of the harness itself")
    worker = getattr(config, "workerinput", None)
    try:
        build = builds.select(
            qemu_build=config.getoption("qemu_build"), qemu_prog=config.getoption("qemu_prog"),
            qemu_img_prog=config.getoption("qemu_img_prog"),
            qemu_io_prog=config.getoption("qemu_io_prog"),
            release=config.getoption("qemu_release"))
        if worker and "cbw_probe" in worker:
            info = probe.load(build, Path(worker["cbw_probe"]))
        else:
            info = probe.probe(build)
    except HarnessError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[_build_info_key] = info
    run_dir = Path(tempfile.mkdtemp(prefix="cbw-run-"))
    config.stash[_run_dir_key] = run_dir
    if worker is None:
        probe.save(info, run_dir / "probe.json")
        _reset_artifacts(Path(config.getoption("artifacts")))
    config.stash[_summary_key] = []
    config.stash[_outcomes_key] = {}


_build_info_key = pytest.StashKey[probe.BuildInfo]()
_run_dir_key = pytest.StashKey[Path]()
_summary_key = pytest.StashKey[list[dict[str, Any]]]()


def pytest_configure_node(node: Any) -> None:
    """xdist: workers reuse the controller's probe instead of probing again."""
    node.workerinput["cbw_probe"] = str(node.config.stash[_run_dir_key] / "probe.json")


def pytest_unconfigure(config: pytest.Config) -> None:
    _kill_leftovers()
    run_dir = config.stash.get(_run_dir_key, None)
    if run_dir is not None:
        shutil.rmtree(run_dir, ignore_errors=True)


def _reset_artifacts(folder: Path) -> None:
    """Clear the artifacts of an earlier run (only folders this harness made)."""
    if folder.is_dir():
        for child in folder.iterdir():
            if child.is_dir() and (child / _ARTIFACTS_MARK).exists():
                shutil.rmtree(child, ignore_errors=True)
        for name in ("summary.json",):
            (folder / name).unlink(missing_ok=True)


def pytest_report_header(config: pytest.Config) -> list[str]:
    info = config.stash[_build_info_key]
    b = info.build
    lines = [f"QEMU under test: {info.version} ({info.package or 'no package string'})"
             + (f", provisioned release {b.release}" if b.release else "")]
    for tool, path in [("qemu-system-x86_64", b.qemu_system), ("qemu-img", b.qemu_img),
                       ("qemu-io", b.qemu_io)]:
        lines.append(f"  {tool}: {path} [{b.origin.get(tool, '?')}] "
                     f"{info.tool_versions.get(tool, '')}")
    missing = [c for c in probe.CAPABILITIES if not info.has(c)]
    lines.append("  capabilities missing: " + (", ".join(missing) if missing else "none"))
    return lines


# ------------------------------------------------------------ capabilities
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip, at collection, tests whose capabilities the build lacks (the skip then
    points at the test, and names the capability)."""
    info = config.stash[_build_info_key]
    for item in items:
        for mark in item.iter_markers("requires"):
            for cap in mark.args:
                try:
                    info.require(cap)
                except MissingCapability as exc:
                    item.add_marker(pytest.mark.skip(reason=str(exc)))


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def build_info(pytestconfig: pytest.Config) -> probe.BuildInfo:
    """The probed build under test (version, schema, capabilities)."""
    return pytestconfig.stash[_build_info_key]


@pytest.fixture(scope="session")
def qemu_build(build_info: probe.BuildInfo) -> builds.QemuBuild:
    return build_info.build


@pytest.fixture
def workdir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A folder of the test's own; kept as its artifacts if the test fails."""
    run_dir = request.config.stash[_run_dir_key]
    path = Path(tempfile.mkdtemp(prefix="t-", dir=run_dir))
    request.node.stash[_workdir_key] = path
    yield path
    reports = request.node.stash.get(_phase_reports, {})
    failed = any(r.failed for r in reports.values())
    if failed or request.config.getoption("keep_all_artifacts"):
        _keep_artifacts(path, _artifacts_dir(request.node))
    else:
        shutil.rmtree(path, ignore_errors=True)


def _artifacts_dir(item: pytest.Item) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.=-]+", "_", item.nodeid).strip("_")[:180]
    return Path(item.config.getoption("artifacts")).resolve() / name


def _keep_artifacts(src: Path, dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(src), str(dest))
    (dest / _ARTIFACTS_MARK).touch()
    for log in dest.glob("*.qmp.log"):
        (dest / log.name.replace(".qmp.log", ".conversation.txt")).write_text(render(log, 10**6))


@pytest.fixture
def transcript() -> Transcript:
    """The test's iotests-style transcript (compare it with :func:`check_transcript`)."""
    return Transcript()


@pytest.fixture
def check_transcript(request: pytest.FixtureRequest, build_info: probe.BuildInfo,
                     transcript: Transcript) -> Callable[[], None]:
    """Compare the transcript with ``reference/<module>/<test>.out`` beside the test."""
    def check() -> None:
        test_file = Path(str(request.node.path))
        folder = test_file.parent / "reference" / test_file.stem
        ref = reference_path(folder, request.node.name, build_info.version_tuple)
        compare(transcript.text, ref, request.config.getoption("regen_reference"))
    return check


@pytest.fixture
def images(qemu_build: builds.QemuBuild, workdir: Path) -> Images:
    """qemu-img / qemu-io of the build under test, working in the test's folder."""
    return Images(qemu_build, workdir)


@pytest.fixture
def launch_vm(request: pytest.FixtureRequest, qemu_build: builds.QemuBuild,
              workdir: Path) -> Iterator[Callable[..., Machine]]:
    """Factory: ``vm = launch_vm(args=[...])`` starts a machine, torn down with the test."""
    started: list[Machine] = []
    timeout = request.config.getoption("qmp_timeout")

    def launch(args: list[str] | tuple[str, ...] = (), *, name: str | None = None,
               **kwargs: Any) -> Machine:
        if timeout is not None:
            kwargs.setdefault("command_timeout", timeout)
            kwargs.setdefault("event_timeout", timeout)
        vm = Machine(qemu_build, workdir, name=name or f"vm{len(started)}", args=args,
                     **kwargs)
        started.append(vm)
        _live_machines.add(vm)
        return vm.launch()

    yield launch
    for vm in started:
        vm.shutdown()


# ------------------------------------------------------ reports and summary
@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    item.stash.setdefault(_phase_reports, {})[report.when] = report
    workdir = item.stash.get(_workdir_key, None)
    if report.failed and workdir is not None:
        report.sections.append(("cbw-harness", _failure_context(item, workdir)))
    return report


def _failure_context(item: pytest.Item, workdir: Path) -> str:
    dest = _artifacts_dir(item)
    lines = [f"artifacts: {dest}"]
    for log in sorted(workdir.glob("*.qmp.log")):
        name = log.name[: -len(".qmp.log")]
        lines.append(f"reproduce {name} by hand: sh {dest / (name + '.reproduce.sh')}")
        lines.append(f"last QMP messages of {name}:")
        lines.append(render(log, 25))
        err = workdir / f"{name}.stderr"
        if err.exists() and err.stat().st_size:
            tail = err.read_text(errors="replace").strip().splitlines()[-10:]
            lines.append(f"{name} stderr (tail):\n  " + "\n  ".join(tail))
    return "\n".join(lines)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Collect summary rows that tests attached (works across xdist workers).

    Rows may be added by fixtures at teardown: read them from the teardown report,
    with the outcome of the call.
    """
    if _config is None:
        return
    outcomes = _config.stash[_outcomes_key]
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        wasxfail = hasattr(report, "wasxfail")
        outcomes[report.nodeid] = ("xfailed" if wasxfail and report.skipped else
                                   "xpassed" if wasxfail else report.outcome)
    if report.when != "teardown":
        return
    for key, value in report.user_properties:
        if key == "cbw-summary":
            _config.stash[_summary_key].append(
                {**dict(value), "outcome": outcomes.get(report.nodeid, "?"),  # type: ignore[call-overload]
                 "test": report.nodeid})


_outcomes_key = pytest.StashKey[dict[str, str]]()
_config: pytest.Config | None = None


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    global _config
    _config = session.config


@pytest.fixture
def summary_row(request: pytest.FixtureRequest) -> Callable[..., None]:
    """Attach a row to the run's summary table: ``summary_row(scenario=..., ...)``."""
    def add(**row: Any) -> None:
        request.node.user_properties.append(("cbw-summary", row))
    return add


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int,
                            config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        return
    info = config.stash[_build_info_key]
    tr = terminalreporter
    stats = {k: len(v) for k, v in tr.stats.items() if k in
             ("passed", "failed", "error", "skipped", "xfailed", "xpassed")}
    tr.section("cbw-harness summary")
    tr.write_line(f"QEMU {info.version} ({info.package}) at {info.build.qemu_system}")
    tr.write_line("results: " + (", ".join(f"{n} {k}" for k, n in stats.items() if n) or "none"))
    reasons: Counter[str] = Counter()
    for rep in tr.stats.get("skipped", []):
        if isinstance(rep.longrepr, tuple):
            reasons[rep.longrepr[2].removeprefix("Skipped: ")] += 1
    for reason, n in reasons.most_common():
        tr.write_line(f"  skipped {n}: {reason}")
    deviations: Counter[str] = Counter(getattr(rep, "wasxfail", "")
                                       for rep in tr.stats.get("xfailed", []))
    for reason, n in deviations.most_common():
        tr.write_line(f"  known QEMU departure from its documentation ({n} tests): {reason}")
    rows = config.stash[_summary_key]
    artifacts = Path(config.getoption("artifacts")).resolve()
    if rows:
        from .summary import render_table, write_json
        tr.write_line("")
        for line in render_table(rows, info).splitlines():
            tr.write_line(line)
        path = write_json(rows, info, artifacts / "summary.json")
        tr.write_line(f"summary JSON: {path}")
    if stats.get("failed") or stats.get("error"):
        tr.write_line(f"artifacts of failed tests: {artifacts}")


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
        pytest.fail(f"guest kernel: {exc}", pytrace=False)
