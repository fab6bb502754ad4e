"""Fixtures of the copy-before-write suite, and the order its tests run in."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from harness.plugin.rows import CaseRow, observation_row
from harness.scenarios.cbw import CRUISE_SPEED, Scenario, ScenarioSpec

_MACHINE_OPTIONS = ("name", "command_timeout")
# Tests that run for seconds, not milliseconds: a guest boots (~3-5 s under TCG), a
# cbw-timeout case waits for its timeout several times over, a self-test runs pytest.
_LONG_TIMEOUT_S = 10


def _cost_rank(item: pytest.Item) -> int:
    """0 for the longest tests, 1 for long ones, 2 for the rest (milliseconds each)."""
    params = getattr(item, "callspec", None)
    timeout = params.params.get("timeout") if params is not None else None
    if isinstance(timeout, int) and timeout >= _LONG_TIMEOUT_S:
        return 0
    if any(item.get_closest_marker(m) for m in ("waits", "guest", "selftest")):
        return 1
    return 2


@pytest.hookimpl(trylast=True)  # after -m / -k deselect: ranks among the tests that run
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest first, the rest in their order: with tests handed to xdist workers a few
    at a time (see pytest_configure), no worker is left with the long ones at the end.
    Of tests that share a run (marker ``shares``), the first selected pays for it and
    the others take milliseconds: they go last, so that no worker waits for the run
    another is making."""
    sharing: set[str] = set()
    rank: dict[str, int] = {}
    for item in items:
        shares = item.get_closest_marker("shares")
        if shares is not None and shares.args[0] in sharing:
            rank[item.nodeid] = 3
        else:
            rank[item.nodeid] = _cost_rank(item)
            if shares is not None:
                sharing.add(shares.args[0])
    items.sort(key=lambda item: rank[item.nodeid])


def pytest_configure(config: pytest.Config) -> None:
    """xdist's ``load`` scheduling hands each worker a quarter of its share at once: in
    collection order, so one worker would get every long test.  Two at a time instead
    (unless given), which with the longest first is as good as the order allows."""
    if config.pluginmanager.hasplugin("xdist") and \
            config.getoption("maxschedchunk", None) is None:
        config.option.maxschedchunk = 2


def _speed_label(spec: ScenarioSpec) -> str | None:
    """Tests that pick the job's speed differ by it (the livelock's two runs)."""
    if spec.release_speed is None:
        return None
    return "full speed" if spec.release_speed == 0 else (
        "speed limit" if spec.release_speed == CRUISE_SPEED else
        f"speed {spec.release_speed} B/s")


@pytest.fixture
def scenario(launch_vm, images, transcript, summary_row, check_transcript
             ) -> Iterator[Callable[..., Scenario]]:
    """Factory: ``scenario(layout=..., on_cbw_error=..., fault=...)`` (the fields of
    :class:`ScenarioSpec`, and ``name=`` / ``command_timeout=`` for the machine).

    The scenario's observation becomes a row of the run's summary table;
    ``summary_note`` (e.g. who read the snapshot) labels its scenario family.
    """
    made: list[tuple[Scenario, str | None]] = []

    def make(*, summary_note: str | None = None, **kwargs: Any) -> Scenario:
        machine = {k: kwargs.pop(k) for k in _MACHINE_OPTIONS if k in kwargs}
        s = Scenario(launch_vm, images, ScenarioSpec(**kwargs), transcript=transcript,
                     **machine)
        made.append((s, summary_note or _speed_label(s.spec)))
        return s

    yield make
    for s, note in made:
        if s.obs.guest_writes or s.obs.job:
            summary_row(**observation_row(s.obs, policy=s.spec.policy, note=note))


@pytest.fixture
def case_row(summary_row) -> Iterator[Callable[..., CaseRow]]:
    """Factory: ``case_row(family, case, ...)`` (:class:`~harness.plugin.rows.CaseRow`)
    for a test that drives QEMU itself; each becomes a row of the run's summary table."""
    made: list[CaseRow] = []

    def make(family: str, case: str, **kwargs: Any) -> CaseRow:
        made.append(CaseRow(family, case, **kwargs))
        return made[-1]

    yield make
    for row in made:
        summary_row(**row.as_row())
