"""Fixtures of the copy-before-write suite (the order tests run in: harness.plugin.schedule)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from harness.plugin.rows import CaseRow, observation_row
from harness.scenarios.cbw import CRUISE_SPEED, Scenario, ScenarioSpec

_MACHINE_OPTIONS = ("name", "command_timeout")


def _speed_label(spec: ScenarioSpec) -> str | None:
    """Tests that pick the job's speed differ by it (the livelock's two runs)."""
    if spec.release_speed is None:
        return None
    return "full speed" if spec.release_speed == 0 else (
        "speed limit" if spec.release_speed == CRUISE_SPEED else
        f"speed {spec.release_speed} B/s")


@pytest.fixture
def scenario(launch_vm, images, transcript, summary_row, check_transcript, build_info
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
                     microvm=build_info.has("machine.microvm"), **machine)
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
