"""The QMP conversation of one machine, kept in order with timestamps.

Written to ``qmp.log`` as it happens (one JSON object a line), so the log survives
even if the test process is killed.  A flood of events (QEMU can emit hundreds of
thousands a second when a job retries an error forever) is capped: past the cap,
events are only counted by name.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

MAX_LOGGED_EVENTS = 5000


class Conversation:
    """Commands sent, replies and events received, and harness notes, in order."""

    def __init__(self, path: Path):
        self.path = path
        # Open for the machine's life, line-buffered: the log survives a killed test.
        self._fh = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self._t0 = time.monotonic()
        self._logged_events = 0
        self.dropped_events: Counter[str] = Counter()

    def record(self, direction: str, message: Any) -> None:
        """``direction``: '>' sent to QEMU, '<' received, '#' a note of the harness."""
        if self._fh.closed:
            return
        if direction == "<" and isinstance(message, dict) and "event" in message:
            if self._logged_events >= MAX_LOGGED_EVENTS:
                self.dropped_events[message["event"]] += 1
                return
            self._logged_events += 1
        entry = {"t": round(time.monotonic() - self._t0, 6), "dir": direction, "msg": message}
        self._fh.write(json.dumps(entry, default=str) + "\n")

    def note(self, text: str) -> None:
        self.record("#", text)

    def close(self) -> None:
        if self._fh.closed:
            return
        if self.dropped_events:
            self.note(f"{sum(self.dropped_events.values())} further events not logged "
                      f"(cap {MAX_LOGGED_EVENTS}): {dict(self.dropped_events)}")
        self._fh.close()


def render(path: Path, limit: int = 400) -> str:
    """A human-readable view of ``qmp.log`` (the last ``limit`` entries)."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    out = []
    if len(lines) > limit:
        out.append(f"... {len(lines) - limit} earlier entries in {path.name}")
        lines = lines[-limit:]
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            out.append(line)
            continue
        msg = entry["msg"]
        text = msg if isinstance(msg, str) else json.dumps(msg)
        out.append(f"{entry['t']:10.6f} {entry['dir']} {text}")
    return "\n".join(out)
