"""Where provisioned things live (outside the checkout), and a lock to share them."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import LockTimeout

if TYPE_CHECKING:
    from .debian import Suite

# Long enough for a slow mirror to deliver a QEMU release or a kernel to another process.
LOCK_TIMEOUT = 600.0


def cache_root() -> Path:
    """``$CBW_CACHE_DIR``, else ``$XDG_CACHE_HOME/cbw-harness``, else ``~/.cache/cbw-harness``."""
    explicit = os.environ.get("CBW_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "cbw-harness"


def apt_root(suite: Suite) -> Path:
    """The private apt directory of a suite set, shared by everything fetched from it."""
    return cache_root() / "apt" / "-".join(suite.suites)


@contextlib.contextmanager
def locked(path: Path, what: str = "", timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` (xdist workers may provision at once);
    give up after ``timeout`` seconds with an error naming the holder's lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = Path(f"{path}.lock")
    with open(lock, "w") as fh:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise LockTimeout(
                        f"another process has held the lock on {what or path} ({lock}) for "
                        f"over {timeout:.0f} s: wait for it to finish or stop it") from None
                time.sleep(0.2)  # flock has no waitable notification with a timeout
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
