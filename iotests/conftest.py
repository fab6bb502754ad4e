"""Fixtures of the copy-before-write suite."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from harness.plugin.rows import observation_row
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
