"""The behaviour diff: what changed between two runs, in a block maintainer's words.

Scenarios are compared by their observation rows (guest writes, job events and end,
data verdicts, snapshot reads), field by field; tests by outcome.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .runs import Run

# Keys that name a row rather than describe what was observed.
IDENTITY_KEYS = ("scenario", "on_cbw_error")
LABELS = {"guest_write": "guest write", "job": "job", "data": "data",
          "on_cbw_error": "on-cbw-error"}


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Nested observations as ``{"job.end": "...", ...}`` so that any field compares."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: str(value)}


# Measured durations ("ok after 3.1s") vary from run to run; a change counts only
# beyond this much (so a timeout that wraps from 10 s to 1.4 s shows, jitter does not).
_DURATION = re.compile(r"(\d+(?:\.\d+)?) ?s\b")
DURATION_SLACK_S = 1.0
DURATION_SLACK_RATIO = 0.25


def same_observation(a: str, b: str) -> bool:
    """Equal, or equal but for durations within the slack."""
    if a == b:
        return True
    if _DURATION.sub("#", a) != _DURATION.sub("#", b):
        return False
    for x, y in zip(map(float, _DURATION.findall(a)), map(float, _DURATION.findall(b))):
        if abs(x - y) > max(DURATION_SLACK_S, DURATION_SLACK_RATIO * max(x, y)):
            return False
    return True


@dataclass
class ScenarioChange:
    nodeid: str
    title: str
    fields: list[tuple[str, str, str]]  # (field, in A, in B)


@dataclass
class OutcomeChange:
    nodeid: str
    a: dict[str, str]
    b: dict[str, str]


@dataclass
class Diff:
    a: Run
    b: Run
    scenarios: list[ScenarioChange]
    outcomes: list[OutcomeChange]
    only_a: list[str]
    only_b: list[str]

    @property
    def empty(self) -> bool:
        return not (self.scenarios or self.outcomes or self.only_a or self.only_b)


def _title(row: dict[str, Any]) -> str:
    return f"{row.get('scenario', '?')}, on-cbw-error={row.get('on_cbw_error', '?')}"


def _scenario_changes(nodeid: str, rows_a: list[dict[str, Any]],
                      rows_b: list[dict[str, Any]]) -> Iterator[ScenarioChange]:
    # A test that observed nothing on one side (skipped, failed early) shows as an
    # outcome change instead.
    for ra, rb in zip(rows_a, rows_b):
        fa, fb = flatten(ra), flatten(rb)
        fields = [(k, fa.get(k, "(not observed)"), fb.get(k, "(not observed)"))
                  for k in dict.fromkeys([*fa, *fb])
                  if k not in IDENTITY_KEYS
                  and not same_observation(fa.get(k, ""), fb.get(k, ""))]
        if fields:
            yield ScenarioChange(nodeid, _title(ra), fields)


def compare(a: Run, b: Run) -> Diff:
    ta, tb = a.tests, b.tests
    common = [n for n in ta if n in tb]
    scenarios: list[ScenarioChange] = []
    outcomes = []
    for nodeid in common:
        scenarios += _scenario_changes(nodeid, ta[nodeid].get("observations", []),
                                       tb[nodeid].get("observations", []))
        if ta[nodeid]["outcome"] != tb[nodeid]["outcome"]:
            outcomes.append(OutcomeChange(nodeid, ta[nodeid], tb[nodeid]))
    return Diff(a, b, scenarios, outcomes, [n for n in ta if n not in tb],
                [n for n in tb if n not in ta])


def _label(run: Run) -> str:
    return f"{run.name} (QEMU {run.build.get('version')})"


def render(diff: Diff, width: int = 48) -> str:
    """Side by side: the field, then what A observed, then what B observed."""
    a, b = _label(diff.a), _label(diff.b)
    if diff.empty:
        return f"no difference between {a} and {b} over {len(diff.a.tests)} tests"
    out = [f"--- {a}", f"+++ {b}"]
    if diff.scenarios:
        out += ["", f"{len(diff.scenarios)} scenarios behave differently:"]
    for ch in diff.scenarios:
        out += ["", f"* {ch.title}", f"  ({ch.nodeid})",
                f"    {'':14} {diff.a.name:<{width}} {diff.b.name}"]
        for field, va, vb in ch.fields:
            name = LABELS.get(field, field.replace("_", " "))
            if len(va) < width and len(vb) < 2 * width:
                out.append(f"    {name:14} {va:<{width}} {vb}")
            else:  # too long to stand side by side: one above the other
                out += [f"    {name:14} {diff.a.name}: {va}",
                        f"    {'':14} {diff.b.name}: {vb}"]
    if diff.outcomes:
        out += ["", f"{len(diff.outcomes)} tests changed outcome:"]
    # Tests that changed the same way for the same reasons (a capability one side lacks)
    # read as one entry.
    groups: dict[tuple[str, str, str, str], list[str]] = {}
    for oc in diff.outcomes:
        key = (oc.a["outcome"], oc.a.get("reason", ""), oc.b["outcome"], oc.b.get("reason", ""))
        groups.setdefault(key, []).append(oc.nodeid)
    for (oa, why_a, ob, why_b), nodeids in groups.items():
        if len(nodeids) == 1:
            out.append(f"* {nodeids[0]}: {oa} -> {ob}")
        else:
            out.append(f"* {len(nodeids)} tests: {oa} -> {ob}: " + ", ".join(nodeids[:3])
                       + (", ..." if len(nodeids) > 3 else ""))
        for side, why in ((diff.a.name, why_a), (diff.b.name, why_b)):
            if why:
                out.append(f"    {side}: {why}")
    for side, only in ((diff.a.name, diff.only_a), (diff.b.name, diff.only_b)):
        if only:
            out += ["", f"{len(only)} tests ran on {side} only: " + ", ".join(only[:5])
                    + (" ..." if len(only) > 5 else "")]
    return "\n".join(out)
