"""A run's machine-readable results: ``<artifacts>/results.json``.

What the matrix, the behaviour diff and ``bisect-step`` read: the build's identity, the
harness version, timestamps, counts, each test's outcome with a one-line reason, and the
observation rows scenarios attach as ``("cbw-summary", row)`` user properties.  Written
by the controller only (xdist replays the workers' reports to it).
"""

from __future__ import annotations

import datetime
import json
import os
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

RESULTS_FILE = "results.json"
RESULTS_FORMAT = 1
OUTCOMES = ("passed", "failed", "skipped", "xfailed", "xpassed", "error")
_tests_key = pytest.StashKey[dict[str, dict[str, Any]]]()
_started_key = pytest.StashKey[str]()


def harness_version() -> str:
    """The version stamped on every saved run; runs of another version are not compared."""
    try:
        return metadata.version("cbw-harness")
    except metadata.PackageNotFoundError:
        return "unknown"


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("cbw-harness").addoption(
        "--build-name", metavar="NAME", default=os.environ.get("CBW_BUILD_NAME"),
        help="name of the build under test in results.json (default: its QEMU version; "
             "env CBW_BUILD_NAME)")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_tests_key] = {}
    config.stash[_started_key] = now()


def one_line(text: str, limit: int = 200) -> str:
    """The first meaningful line of a message, shortened to ``limit`` characters."""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("E "):
            line = line[2:].strip()
        if line:
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return ""


def _reason(report: pytest.TestReport) -> str:
    if hasattr(report, "wasxfail"):
        return one_line(str(report.wasxfail))
    longrepr = report.longrepr
    if longrepr is None:
        return ""
    if isinstance(longrepr, tuple):  # a skip: (path, line, "Skipped: reason")
        return one_line(str(longrepr[2]).removeprefix("Skipped: "))
    crash = getattr(longrepr, "reprcrash", None)
    message = getattr(crash, "message", None)
    if message:
        return one_line(str(message))
    return one_line(str(longrepr))


def classify(report: pytest.TestReport) -> tuple[str, str] | None:
    """(outcome, reason) this phase's report settles, or None if it settles nothing."""
    reason = _reason(report)
    if report.when == "call":
        if hasattr(report, "wasxfail"):
            return ("xfailed" if report.skipped else "xpassed"), reason
        if report.failed and reason.startswith("[XPASS(strict)]"):
            return "xpassed", reason.removeprefix("[XPASS(strict)]").strip()
        return report.outcome, reason
    if report.when == "setup" and report.outcome != "passed":
        if hasattr(report, "wasxfail"):
            return "xfailed", reason
        return ("skipped" if report.skipped else "error"), (
            reason if report.skipped else f"error in setup: {reason}")
    if report.when == "teardown" and report.failed:
        return "error", f"error in teardown: {reason}"
    return None


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    config = _CONFIG.get("config")
    if config is None or hasattr(config, "workerinput"):
        return
    entry = config.stash[_tests_key].setdefault(report.nodeid, {"outcome": "?", "reason": ""})
    settled = classify(report)
    # A teardown error does not hide the call's failure.
    if settled is not None and not (report.when == "teardown" and entry["outcome"] in
                                    ("failed", "error")):
        entry["outcome"], entry["reason"] = settled
    entry["duration"] = round(entry.get("duration", 0.0) + report.duration, 3)
    rows = [dict(v) for k, v in report.user_properties if k == "cbw-summary"]  # type: ignore[call-overload]
    if rows and report.when == "teardown":
        entry["observations"] = rows


_CONFIG: dict[str, pytest.Config] = {}


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    _CONFIG["config"] = session.config


def build_identity(config: pytest.Config) -> dict[str, Any]:
    """name, version, package and origin of the build under test (from the probe)."""
    from . import harness_run  # the run's state (imported late: it imports us)
    info = harness_run(config).probed
    if info is None:  # no selected test needed QEMU: nothing was probed
        return {"name": config.getoption("build_name") or "not probed", "version": None,
                "package": None, "origin": None, "qemu_system": None}
    b = info.build
    if b.release:
        origin = f"provisioned release {b.release}"
    else:
        origin = f"{b.origin.get('qemu-system-x86_64', '?')} {b.qemu_system}"
    return {"name": config.getoption("build_name") or info.version, "version": info.version,
            "package": info.package, "origin": origin, "qemu_system": str(b.qemu_system)}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    if hasattr(config, "workerinput") or _tests_key not in config.stash:
        return
    tests = config.stash[_tests_key]
    counts = Counter(t["outcome"] for t in tests.values())
    results = {
        "format": RESULTS_FORMAT, "harness_version": harness_version(),
        "build": build_identity(config), "started": config.stash[_started_key],
        "finished": now(), "exitstatus": int(exitstatus),
        "args": list(config.invocation_params.args),
        "counts": {k: counts.get(k, 0) for k in OUTCOMES},
        "tests": tests,
    }
    folder = Path(config.getoption("artifacts")).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (RESULTS_FILE + ".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(folder / RESULTS_FILE)
    _CONFIG.pop("config", None)
