"""Runs shared by several tests: one QEMU run whose outcome several tests check.

A guest boot costs seconds; tests that differ only in what they check of it (one test
per ``on-cbw-error`` value, each with its own disks in the guest) can share one boot.
The first test to ask for a key, in whichever xdist worker, runs it in a folder of the
run's own; a test that asks meanwhile waits for it (a file lock in the run folder, which
the workers share), then gets its outcome.  Every test gets the run's files linked into
its own folder, so a failing test keeps the QMP conversation, QEMU's output and the
replay of the run it checked, as if it had run it.

A run that serves tests each with a part of its own (one QEMU each, in a subfolder
named after the part) links into a test's folder the files of its part only: the
test's folder then holds its own QEMU's files, as if it had run alone.

A run that raised is not shared: the next test runs it again, and fails on its own
files.  A worker killed during a run releases the lock with its process: the next test
runs it again too.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ..qemu.cache import locked

T = TypeVar("T")

# A guest boot and its plan end well within this (READY_TIMEOUT + END_TIMEOUT and more).
WAIT_TIMEOUT = 300.0
_OUTCOME = "outcome.pickle"


def shared(base: Path, key: str, test_folder: Path, make: Callable[[Path], T],
           part: str | None = None) -> T:
    """``make(folder)``'s outcome for ``key``: run once in ``base/<key>`` and kept there;
    the folder's files (``part``: those of its subfolder ``part``) are linked into
    ``test_folder`` in every case."""
    folder = base / re.sub(r"[^A-Za-z0-9_.=-]+", "_", key)
    folder.mkdir(parents=True, exist_ok=True)
    outcome = folder / _OUTCOME
    with locked(folder, f"the run shared as {key!r}", timeout=WAIT_TIMEOUT):
        if outcome.exists():
            result: T = pickle.loads(outcome.read_bytes())
        else:
            for stale in folder.iterdir():  # a run that raised left its files
                if stale.is_dir():
                    shutil.rmtree(stale)
                else:
                    stale.unlink()
            try:
                result = make(folder)
            finally:
                _link_files(folder if part is None else folder / part, test_folder)
            outcome.write_bytes(pickle.dumps(result))
            return result
    _link_files(folder if part is None else folder / part, test_folder)
    return result


def _link_files(folder: Path, test_folder: Path) -> None:
    if not folder.is_dir():
        return  # a part whose run made no files
    for path in folder.iterdir():
        if path.is_file() and path.name != _OUTCOME:
            dest = test_folder / path.name
            if not dest.exists():
                os.link(path, dest)

