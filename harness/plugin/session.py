"""The run's state, registered as a pytest plugin object: the build chosen, its probe
(made lazily, once per run, shared by xdist workers), the run's folder, summary rows.

Nothing here runs QEMU or fetches anything until a selected test needs the build
(a ``requires`` marker, or a fixture that needs QEMU), so ``--help``,
``--collect-only`` and runs of pure unit tests need neither.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from ..errors import ConfigError, HarnessError, MissingCapability
from ..qemu import builds, probe
from ..qemu.cache import locked
from .results import now

# Fixtures whose use means a test runs the build (the others depend on these).
QEMU_FIXTURES = frozenset({"build_info", "qemu_build"})
# Below this much free space in TMPDIR a run fails midway (images, logs, QEMU output).
MIN_FREE_BYTES = 64 * 1024 * 1024
ARTIFACTS_MARK = ".cbw-artifacts"
PLUGIN_NAME = "cbw-harness-run"


def make_run_dir() -> Path:
    """A fresh folder for the run's tests under TMPDIR, or one line saying why not."""
    base = os.environ.get("TMPDIR") or tempfile.gettempdir()
    fix = "set TMPDIR to a writable folder with space"
    try:
        run_dir = Path(tempfile.mkdtemp(prefix="cbw-run-", dir=base))
        (run_dir / ".space").write_bytes(bytes(65536))
        (run_dir / ".space").unlink()
    except OSError as exc:
        raise ConfigError(f"TMPDIR {base}: cannot create the run's folder there "
                          f"({exc.strerror}); {fix}") from None
    free = shutil.disk_usage(run_dir).free
    if free < MIN_FREE_BYTES:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise ConfigError(f"TMPDIR {base}: only {free / 1e6:.0f} MB free, a run needs about "
                          f"{MIN_FREE_BYTES / 1e6:.0f} MB; free some space or {fix}")
    return run_dir


def check_artifacts_dir(folder: Path) -> Path:
    """Make sure failed tests' artifacts can be kept in ``folder`` (checked before any
    test runs, rather than failing after them)."""
    folder = folder.expanduser().resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe_file = folder / ".cbw-write-test"
        probe_file.write_text("")
        probe_file.unlink()
    except OSError as exc:
        raise ConfigError(f"--artifacts {folder}: cannot write there ({exc.strerror}); "
                          "pass --artifacts DIR (env CBW_ARTIFACTS) of a writable folder"
                          ) from None
    return folder


def reset_artifacts(folder: Path) -> None:
    """Clear the artifacts of an earlier run (only folders this harness made)."""
    for child in folder.iterdir():
        if child.is_dir() and (child / ARTIFACTS_MARK).exists():
            shutil.rmtree(child, ignore_errors=True)
    (folder / "summary.json").unlink(missing_ok=True)


def _build_to_json(build: builds.QemuBuild) -> dict[str, Any]:
    return {"qemu_system": str(build.qemu_system), "qemu_img": str(build.qemu_img),
            "qemu_io": str(build.qemu_io), "origin": dict(build.origin),
            "release": build.release}


def _build_from_json(data: dict[str, Any]) -> builds.QemuBuild:
    return builds.QemuBuild(Path(data["qemu_system"]), Path(data["qemu_img"]),
                            Path(data["qemu_io"]), data["origin"], data["release"])


def build_lines(info: probe.BuildInfo) -> list[str]:
    """What is under test: each binary with its origin and version, missing capabilities."""
    b = info.build
    origins = sorted(set(b.origin.values()))
    lines = [f"QEMU under test: {info.version} ({info.package or 'no package string'}), "
             f"binaries from {' and '.join(origins)}"]
    for tool, path in [("qemu-system-x86_64", b.qemu_system), ("qemu-img", b.qemu_img),
                       ("qemu-io", b.qemu_io)]:
        lines.append(f"  {tool}: {path} [{b.origin.get(tool, '?')}] "
                     f"{info.tool_versions.get(tool, '')}")
    mixed = info.mixed_versions()
    if mixed:
        lines.append(f"  WARNING: {mixed} (--allow-mixed-versions)")
    missing = [c for c in probe.CAPABILITIES if not info.has(c)]
    lines.append("  capabilities missing: " + (", ".join(missing) if missing else "none"))
    return lines


class HarnessRun:
    """One pytest process's view of the run (controller, worker, or a run without xdist)."""

    def __init__(self, config: pytest.Config, choice: builds.BuildChoice, run_dir: Path,
                 *, owns_run_dir: bool, kill_machines: Callable[[], int]):
        self.config = config
        self.choice = choice
        self.run_dir = run_dir
        self.owns_run_dir = owns_run_dir
        self.artifacts = Path(config.getoption("artifacts")).expanduser().resolve()
        self.allow_mixed = bool(config.getoption("allow_mixed_versions"))
        self.rows: list[dict[str, Any]] = []
        self.outcomes: dict[str, str] = {}
        self._info: probe.BuildInfo | None = None
        self._kill_machines = kill_machines
        self._build_shown = False
        self.interrupted = False
        self.started = now()

    # ------------------------------------------------------------- the build
    @property
    def probe_path(self) -> Path:
        return self.run_dir / "probe.json"

    @property
    def probed(self) -> probe.BuildInfo | None:
        """The probe, if some process of this run made it (never probes)."""
        if self._info is None and self.probe_path.exists():
            self._info = self._load()
        return self._info

    def _load(self) -> probe.BuildInfo:
        data = json.loads(self.probe_path.read_text())
        return probe.BuildInfo.from_json(_build_from_json(data["build"]), data["info"])

    @property
    def info(self) -> probe.BuildInfo:
        """The probed build: provisioned and probed at first use, once per run (xdist
        workers share the run's folder: the first probes, the others read its result)."""
        if self._info is None:
            self._info = self._probe_once()
        return self._info

    def _probe_once(self) -> probe.BuildInfo:
        failed = self.run_dir / "probe.error"
        with locked(self.run_dir / "probe", "the build's probe"):
            if self.probe_path.exists():
                return self._load()
            if failed.exists():
                raise ConfigError(failed.read_text())
            try:
                info = probe.probe(self.choice.realize())
                mixed = info.mixed_versions()
                if mixed and not self.allow_mixed:
                    raise ConfigError(f"{mixed}: pass binaries of one build (--qemu-build "
                                      "DIR, or --qemu-img-prog / --qemu-io-prog too), or "
                                      "--allow-mixed-versions")
            except HarnessError as exc:
                failed.write_text(str(exc))
                raise
            tmp = self.probe_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"build": _build_to_json(info.build),
                                       "info": info.to_json()}))
            tmp.rename(self.probe_path)
            return info

    # ------------------------------------------------------------ collection
    @pytest.hookimpl(trylast=True)  # after -k / -m deselected what they deselect
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        """Probe only if a selected test needs the build; skip, at collection, those
        whose capabilities it lacks (the skip names the capability)."""
        needing = [item for item in items if needs_build(item)]
        if not needing or self.config.option.collectonly:
            return  # --collect-only lists tests; it neither fetches nor runs QEMU
        try:
            info = self.info
        except HarnessError as exc:
            if is_worker(self.config):
                return  # the controller reports it (see node_collection_finished)
            raise pytest.UsageError(str(exc)) from None
        for item in needing:
            for mark in item.iter_markers("requires"):
                for cap in mark.args:
                    try:
                        info.require(cap)
                    except MissingCapability as exc:
                        item.add_marker(pytest.mark.skip(reason=str(exc)))
                    except ConfigError as exc:  # an unknown capability name: the test's bug
                        raise pytest.UsageError(f"{item.nodeid}: {exc}") from None

    def pytest_report_collectionfinish(self) -> list[str]:
        info = self.probed
        if info is None:
            return []
        self._build_shown = True
        return build_lines(info)

    @pytest.hookimpl(optionalhook=True)  # xdist's hooks: absent under -p no:xdist
    def pytest_xdist_node_collection_finished(self, node: Any, ids: list[str]) -> None:
        """xdist: the controller shows the build once the first worker probed it, or
        ends the run with the one line saying why the build cannot be used."""
        failed = self.run_dir / "probe.error"
        if failed.exists():
            pytest.exit(failed.read_text(), returncode=pytest.ExitCode.USAGE_ERROR)
        info = self.probed
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if info is not None and not self._build_shown and reporter is not None:
            self._build_shown = True
            reporter.write_line("")
            for line in build_lines(info):
                reporter.write_line(line)

    # ---------------------------------------------------------------- xdist
    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        """xdist: workers share the controller's run folder (and so its probe)."""
        node.workerinput["cbw_run_dir"] = str(self.run_dir)

    # ------------------------------------------------------ reports and rows
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Collect summary rows that tests attached (works across xdist workers).

        Rows may be added by fixtures at teardown: read them from the teardown report,
        with the outcome of the call.
        """
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            wasxfail = hasattr(report, "wasxfail")
            self.outcomes[report.nodeid] = ("xfailed" if wasxfail and report.skipped else
                                            "xpassed" if wasxfail else report.outcome)
        if report.when != "teardown":
            return
        for key, value in report.user_properties:
            if key == "cbw-summary" and isinstance(value, dict):
                self.rows.append({**value, "outcome": self.outcomes.get(report.nodeid, "?"),
                                  "test": report.nodeid})

    # ----------------------------------------------------------- interruption
    def pytest_keyboard_interrupt(self, excinfo: pytest.ExceptionInfo[BaseException]) -> None:
        """Ctrl-C: kill this process's QEMUs now (not a graceful quit each), and say so."""
        if not isinstance(excinfo.value, KeyboardInterrupt):
            return  # pytest.exit() comes here too
        self.interrupted = True
        killed = self._kill_machines()
        plural = "es" if killed != 1 else ""
        if is_worker(self.config):
            worker = self.config.workerinput.get("workerid", "worker")  # type: ignore[attr-defined]
            message = f"[{worker}] cbw-harness: killed {killed} running QEMU process{plural}"
        elif self.config.pluginmanager.has_plugin("dsession"):
            message = (f"cbw-harness: interrupted: the workers kill their QEMUs; "
                       f"removing {self.run_dir}")
        else:
            message = (f"cbw-harness: interrupted: killed {killed} running QEMU process"
                       f"{plural}; removing {self.run_dir}")
        sys.stderr.write(f"\n{message}\n")
        sys.stderr.flush()

    def close(self) -> None:
        """Remove the run's folder (the controller's, after its workers are gone)."""
        if self.owns_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    # ---------------------------------------------------------------- summary
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if is_worker(self.config):
            return
        from .results import harness_version
        from .summary import render_grid, write_json
        tr = terminalreporter
        info = self.probed
        stats = {k: len(v) for k, v in tr.stats.items() if k in
                 ("passed", "failed", "error", "skipped", "xfailed", "xpassed")}
        tr.section("cbw-harness summary")
        if info is not None:
            tr.write_line(f"QEMU {info.version} ({info.package}) at {info.build.qemu_system}")
        elif (self.run_dir / "probe.error").exists():
            tr.write_line(f"QEMU: unusable: {(self.run_dir / 'probe.error').read_text()}")
        else:
            tr.write_line("QEMU: not started (no selected test needed it)")
        tr.write_line("results: " + (", ".join(f"{n} {k}" for k, n in stats.items() if n)
                                     or "none"))
        for reason, n in _counted(rep.longrepr[2].removeprefix("Skipped: ")
                                  for rep in tr.stats.get("skipped", [])
                                  if isinstance(rep.longrepr, tuple)):
            tr.write_line(f"  skipped {n}: {reason}")
        if self.rows and info is not None:
            tr.write_line("")
            for line in render_grid(self.rows, info).splitlines():
                tr.write_line(line)
            run = {"harness_version": harness_version(), "started": self.started,
                   "finished": now(), "counts": stats}
            path = write_json(self.rows, info, self.artifacts / "summary.json", run)
            tr.write_line(f"summary JSON: {path}")
        if stats.get("failed") or stats.get("error"):
            tr.write_line(f"artifacts of failed tests: {self.artifacts}")


def _counted(values: Iterable[str]) -> list[tuple[str, int]]:
    return Counter(values).most_common()


def needs_build(item: pytest.Item) -> bool:
    return item.get_closest_marker("requires") is not None or \
        bool(QEMU_FIXTURES & set(getattr(item, "fixturenames", ())))


def is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")
