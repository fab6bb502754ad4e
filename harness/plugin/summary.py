"""The grid a maintainer reads at a glance, and the same rows as JSON.

One block per scenario family; in it one line per case (fault, job policy, note) and
one column per ``on-cbw-error`` value, each cell a short verdict ("guest EIO; job ok;
backup ok").  Where ``on-cbw-error`` omitted and ``break-guest-write`` give the same
verdict in every case of a family, the two share one column, and the grid says so.

Rows carry ``scenario, on_cbw_error, guest_write, job, data`` (and ``outcome``,
``test``); ``family`` where the producer gives it, else the scenario up to its first
" / ".
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..qemu.probe import BuildInfo

VALUE_ORDER = ("omitted", "break-guest-write", "break-snapshot")
DEFAULT_VALUE, OMITTED = "break-guest-write", "omitted"
MAX_CELL = 64

_ERRNO_NAMES = {"Input/output error": "EIO", "No space left on device": "ENOSPC",
                "Permission denied": "EACCES", "Invalid argument": "EINVAL",
                "Operation not permitted": "EPERM"}
_ERRNO_TEXT = re.compile("|".join(re.escape(t) for t in _ERRNO_NAMES))


def family_of(row: dict[str, Any]) -> str:
    return str(row.get("family") or str(row.get("scenario", "")).split(" / ")[0])


def case_of(row: dict[str, Any]) -> str:
    """The scenario without its family: fault, job policy, note."""
    scenario = str(row.get("scenario", ""))
    family = family_of(row)
    rest = scenario[len(family):].lstrip(" /") if scenario.startswith(family) else scenario
    return rest or "-"


def _errnos(text: str) -> str:
    return _ERRNO_TEXT.sub(lambda m: _ERRNO_NAMES[m.group(0)], text)


def _guest(text: str) -> str:
    if not text or text == "-":
        return ""
    if text == "all ok":
        return "guest ok"
    m = re.match(r"(\d+)/(\d+) failed: (.*)", text)
    if m:
        return f"guest {_errnos(m.group(3))}" + ("" if m.group(1) == m.group(2) else
                                                 f" {m.group(1)}/{m.group(2)}")
    return f"guest {_errnos(text)}"


def _job(text: str) -> str:
    if not text or text == "-":
        return ""
    if text == "QEMU stopped answering QMP":
        return "QEMU hung"
    # How it ended; the job's error policy is in the case's label.
    first = _errnos(text.split(";")[0].strip()).replace("completed", "ok")
    return "job " + re.sub(r"failed \((\S+)\)", r"failed \1", first)


_DATA_WORDS = [(r"^backup point-in-time$", "backup ok"),
               (r"^backup NOT point-in-time$", "backup wrong"),
               (r"^snapshot reads ok$", "snapshot ok"),
               (r"^snapshot reads fail: (.*)$", r"snapshot \1"),
               (r"^target has old data at .*$", ""),
               (r"^no BLOCK_IO_ERROR$", ""),
               (r"^BLOCK_IO_ERROR (.*)$", r"IO_ERROR \1"),
               (r"^stops answered .*$", "stopped"),
               (r"^source (\S+), target (\S+)$", r"src \1 tgt \2")]


def _data(text: str) -> list[str]:
    out = []
    for part in (p.strip() for p in text.split(";") if p.strip()):
        for pattern, short in _DATA_WORDS:
            if re.match(pattern, part):
                part = re.sub(pattern, short, part)
                break
        if part:
            out.append(_errnos(part))
    return out


def verdict(row: dict[str, Any]) -> str:
    """A cell: what the guest, the job and the data showed, and how the test ended."""
    parts = [p for p in (_guest(str(row.get("guest_write", ""))), _job(str(row.get("job", ""))))
             if p] + _data(str(row.get("data", "")))
    text = "; ".join(parts) or "-"
    outcome = row.get("outcome")
    if row.get("departure"):
        return f"departure: {row['departure']}"
    prefix = {"xfailed": "departure: ", "failed": "FAILED: ", "error": "ERROR: ",
              "xpassed": "XPASS: "}.get(str(outcome), "")
    text = prefix + text
    return text if len(text) <= MAX_CELL else text[:MAX_CELL - 1] + "…"


def _param(row: dict[str, Any]) -> str:
    """The test's parameters without the on-cbw-error value: what tells apart two rows
    of one case (the livelock's two speeds)."""
    test = str(row.get("test", ""))
    params = test[test.find("[") + 1:-1] if test.endswith("]") else ""
    value = str(row.get("on_cbw_error", ""))
    return params.replace(value, "").strip("-").replace("--", "-") or test.split("::")[-1]


def _cells(rows: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """(case label, value) -> verdict; a case whose rows of one value disagree is split
    into one label per test parameter."""
    by_case: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_case[case_of(r)].append(r)
    cells: dict[tuple[str, str], str] = {}
    for case, case_rows in by_case.items():
        per_value: dict[str, set[str]] = defaultdict(set)
        for r in case_rows:
            per_value[str(r.get("on_cbw_error"))].add(verdict(r))
        split = any(len(v) > 1 for v in per_value.values())
        for r in case_rows:
            label = f"{case} [{_param(r)}]" if split else case
            cells[(label, str(r.get("on_cbw_error")))] = verdict(r)
    return cells


def _value_key(value: str) -> tuple[int, str]:
    return (VALUE_ORDER.index(value) if value in VALUE_ORDER else len(VALUE_ORDER), value)


def render_family(family: str, rows: list[dict[str, Any]]) -> tuple[list[str], bool]:
    """The block of one family, and whether omitted and break-guest-write were merged."""
    cells = _cells(rows)
    labels = sorted({label for label, _ in cells})
    values = sorted({value for _, value in cells}, key=_value_key)
    both = [label for label in labels
            if (label, OMITTED) in cells and (label, DEFAULT_VALUE) in cells]
    merged = bool(both) and all(cells[(label, OMITTED)] == cells[(label, DEFAULT_VALUE)]
                                for label in both)
    if merged:  # one column; say where only one of the two ran
        for label in labels:
            has_omitted, has_default = (label, OMITTED) in cells, (label, DEFAULT_VALUE) in cells
            if has_default and not has_omitted:
                cells[(label, OMITTED)] = cells[(label, DEFAULT_VALUE)] + f" ({DEFAULT_VALUE} only)"
            elif has_omitted and not has_default:
                cells[(label, OMITTED)] += f" ({OMITTED} only)"
    columns = [v for v in values if not (merged and v == DEFAULT_VALUE)]
    header = [family] + [f"{OMITTED} = {DEFAULT_VALUE}" if merged and v == OMITTED else v
                         for v in columns]
    table = [[label] + [cells.get((label, v), "") for v in columns] for label in labels]
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]

    def line(vals: list[str]) -> str:
        return " | ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()
    return [line(header), "-+-".join("-" * w for w in widths)] + [line(r) for r in table], merged


def render_grid(rows: Sequence[dict[str, Any]], info: BuildInfo) -> str:
    by_family: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_family[family_of(r)].append(r)
    out = [f"copy-before-write error handling, QEMU {info.version} ({info.package}): "
           f"{len(rows)} scenarios in {len(by_family)} "
           f"famil{'y' if len(by_family) == 1 else 'ies'}"]
    same, differ = [], []
    blocks: list[str] = []
    for family in sorted(by_family):
        block, merged = render_family(family, by_family[family])
        values = {str(r.get("on_cbw_error")) for r in by_family[family]}
        if merged:
            same.append(family)
        elif {OMITTED, DEFAULT_VALUE} <= values:
            differ.append(family)
        blocks += ["", *block]
    if same:
        out.append(f"on-cbw-error omitted behaves as {DEFAULT_VALUE} in: {', '.join(same)}")
    if differ:
        out.append(f"on-cbw-error omitted differs from {DEFAULT_VALUE} in: "
                   f"{', '.join(differ)}")
    return "\n".join(out + blocks)


def write_json(rows: Sequence[dict[str, Any]], info: BuildInfo, path: Path,
               run: dict[str, Any] | None = None) -> Path:
    """The rows (each with its scenario's full observation), the build's identity and the
    run's (harness version, timestamps, counts); ``results.json`` has every test."""
    path.parent.mkdir(parents=True, exist_ok=True)
    b = info.build
    binaries = {tool: {"path": str(p), "origin": b.origin.get(tool),
                       "version": info.tool_versions.get(tool)}
                for tool, p in [("qemu-system-x86_64", b.qemu_system), ("qemu-img", b.qemu_img),
                                ("qemu-io", b.qemu_io)]}
    qemu = {"version": info.version, "package": info.package, "binary": str(b.qemu_system),
            "binaries": binaries}
    path.write_text(json.dumps({"run": run or {}, "qemu": qemu, "rows": list(rows)}, indent=1))
    return path
