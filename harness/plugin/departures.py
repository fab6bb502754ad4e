"""Departures as strict expected failures, generated from the registry.

A test declares ``@pytest.mark.departure("<name>")`` (a name of
:mod:`harness.scenarios.departures`).  On a build the departure applies to, the mark
becomes ``xfail(strict=True)`` with a reason naming the version under test; a test
that then passes fails as ``[XPASS(strict)] departure fixed: <name>: ...``.  On a
build it does not apply to, the test is a plain test.  ``--runxfail`` runs every
departure as a plain test (bisecting on one: see the README's exit codes).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Generator
from typing import Any

import pytest

from ..errors import HarnessError
from ..scenarios import departures
from ..scenarios.departures import Departure

_XPASS_STRICT = "[XPASS(strict)]"
_PROPERTY = "cbw-departure"
_applied = pytest.StashKey[Departure]()


def _version(config: pytest.Config) -> tuple[str, tuple[int, ...]]:
    """The version under test; probes the build if no process of this run has yet."""
    from . import harness_run  # the main plugin's run state (imported late: it imports us)
    info = harness_run(config).info
    return info.version, info.version_tuple


def _probed_version(config: pytest.Config) -> str:
    from . import harness_run
    info = harness_run(config).probed
    return info.version if info is not None else "(not probed)"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "departure(name): a recorded QEMU departure from its documentation "
        "(harness/scenarios/departures.py): a strict xfail on the builds it applies to")


def departure_of(item: pytest.Item) -> Departure | None:
    """The departure this test declares, if it applies to the build under test."""
    return item.stash.get(_applied, None)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    declaring = [item for item in items if item.get_closest_marker("departure")]
    if not declaring or config.option.collectonly:
        return  # listing tests neither fetches nor probes a build
    try:
        version, version_tuple = _version(config)
    except HarnessError as exc:
        if hasattr(config, "workerinput"):
            return  # the controller reports it
        raise pytest.UsageError(str(exc)) from None
    for item in declaring:
        marks = list(item.iter_markers("departure"))
        if len(marks) > 1 or len(marks[0].args) != 1:
            raise pytest.UsageError(f"{item.nodeid}: declare exactly one departure, "
                                    "as @pytest.mark.departure('<name>')")
        try:
            dep = departures.get(marks[0].args[0])
        except KeyError as exc:
            raise pytest.UsageError(f"{item.nodeid}: {exc.args[0]}") from None
        item.user_properties.append((_PROPERTY, dep.name))
        if not dep.applies_to(version_tuple):
            continue
        item.stash[_applied] = dep
        item.add_marker(pytest.mark.xfail(strict=True, raises=dep.raises,
                                          reason=dep.xfail_reason(version)))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Outermost, so it sees the strict XPASS pytest made, and says which departure is gone."""
    report: pytest.TestReport = yield
    dep = departure_of(item)
    if dep is not None and report.failed and isinstance(report.longrepr, str) \
            and report.longrepr.startswith(_XPASS_STRICT):
        report.longrepr = f"{_XPASS_STRICT} " + dep.fixed_message(_probed_version(item.config))
    return report


def _departure(report: Any) -> str | None:
    return next((v for k, v in getattr(report, "user_properties", ()) if k == _PROPERTY), None)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """One line per recorded departure this run met: still there, or fixed."""
    if hasattr(config, "workerinput"):
        return
    tr = terminalreporter
    seen: Counter[tuple[str, str]] = Counter()
    for outcome in ("xfailed", "failed", "passed"):
        for rep in tr.stats.get(outcome, []):
            name = _departure(rep)
            if name is None or getattr(rep, "when", "call") != "call":
                continue
            fixed = outcome == "failed" and str(rep.longrepr).startswith(
                f"{_XPASS_STRICT} departure fixed")
            kind = {"xfailed": "still departs",
                    "passed": "passes (does not apply to this build)"}.get(
                outcome, "FIXED (strict XPASS)" if fixed else "fails")
            seen[(name, kind)] += 1
    if not seen:
        return
    tr.section("recorded QEMU departures (harness/scenarios/departures.py)")
    version = _probed_version(config)
    for dep in departures.DEPARTURES:
        kinds = [f"{n} {kind}" for (name, kind), n in sorted(seen.items()) if name == dep.name]
        if kinds:
            tr.write_line(f"{dep.name} on QEMU {version}: {', '.join(kinds)}")
