"""The table a maintainer pastes into a review, and the same rows as JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..qemu.probe import BuildInfo

COLUMNS = ("scenario", "on-cbw-error", "guest write", "job", "data", "outcome")


def _cell(row: dict[str, Any], column: str) -> str:
    key = {"guest write": "guest_write", "on-cbw-error": "on_cbw_error"}.get(column, column)
    return str(row.get(key, ""))


def render_table(rows: Sequence[dict[str, Any]], info: BuildInfo) -> str:
    """A Markdown table, sorted by scenario then on-cbw-error value."""
    ordered = sorted(rows, key=lambda r: (str(r.get("scenario")), str(r.get("on_cbw_error"))))
    cells = [[_cell(r, c) for c in COLUMNS] for r in ordered]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    out = [f"copy-before-write error handling, QEMU {info.version} ({info.package})",
           line(COLUMNS), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


def write_json(rows: Sequence[dict[str, Any]], info: BuildInfo, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"qemu": {"version": info.version, "package": info.package,
                                         "binary": str(info.build.qemu_system)},
                                "rows": list(rows)}, indent=1))
    return path
