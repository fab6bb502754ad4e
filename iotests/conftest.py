"""Fixtures of the copy-before-write suite."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from harness.scenarios.cbw import Scenario


@pytest.fixture
def scenario(launch_vm, images, transcript, summary_row, check_transcript
             ) -> Iterator[Callable[..., Scenario]]:
    """Factory: ``scenario(layout=..., on_cbw_error=..., fault=...)``.

    The scenario's observation becomes a row of the run's summary table;
    ``summary_note`` (e.g. who read the snapshot) is added to its scenario column.
    """
    made: list[tuple[Scenario, str | None]] = []

    def make(*, summary_note: str | None = None, **kwargs: Any) -> Scenario:
        s = Scenario(launch_vm, images, transcript=transcript, **kwargs)
        made.append((s, summary_note))
        return s

    yield make
    for s, note in made:
        if s.obs.guest_writes or s.obs.job:
            row = s.obs.summary()
            policies = {s.on_source_error, s.on_target_error} - {None}
            if policies:
                row["scenario"] += f" / job policy {'+'.join(sorted(policies))}"
            if note:
                row["scenario"] += f" / {note}"
            summary_row(**row)
