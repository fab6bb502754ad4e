"""The documented copy-before-write semantics, as an oracle the explorer checks QEMU against.

A copy-before-write node over ``source`` with ``target`` (fleecing: added by the user,
a ``snapshot-access`` node on top; or the filter of a ``blockdev-backup sync=none``
job), one blkdebug fault plan, and the steps a user takes: guest writes on the
copy-before-write node, reads of the snapshot, the job's cancel.  For each step
the model says what QEMU must answer (success, or which error) and what the data must
be afterwards.  It is written from the documentation (QAPI ``OnCbwError``), not from
QEMU's code:

* Before a guest write changes a cluster not yet copied, the old data is copied to the
  target: read from the source, written to the target (one copy per cluster of 64 KiB,
  the block-copy cluster size of a raw target).
* ``break-guest-write`` (and the default): a write whose copy fails fails with the
  copy's error, and the source keeps its old data ("the guest will not be able to
  overwrite areas that cannot be backed up").
* ``break-snapshot``: the write succeeds ("continue guest write"), the snapshot is
  invalid from then on: every later read of it fails with ``Permission denied``
  (EACCES), and no further copies are made.
* Otherwise a snapshot reader gets the point-in-time data byte for byte: from the
  target where the cluster was copied, else from the source, the same range (whose
  read may meet the fault plan's source-read rule: then the read fails with that errno).
* QEMU never dies and always answers QMP.

Faults follow blkdebug's rules: an ``inject-error`` rule on the source's ``read_aio``
(iotype read) or the target's ``write_aio`` (iotype write), limited to one cluster's
first sector or not, ``once`` or persistent, with an errno.  A rule limited to a sector
fails an I/O whose range covers that sector.

Known departures of QEMU from this (``harness/scenarios/departures.py``) are named
here by :func:`known_departure`, so the explorer reports only what is new.
"""

from __future__ import annotations

import errno as errno_mod
import os
from dataclasses import dataclass, field

KiB = 1024
CLUSTER = 64 * KiB
CLUSTERS = 4
IMAGE_SIZE = CLUSTER * CLUSTERS
SECTOR = 512
ON_CBW_ERROR_VALUES: tuple[str | None, ...] = (None, "break-guest-write", "break-snapshot")
FAULT_SITES = ("source-read", "target-write")
FAULT_ERRNOS = (errno_mod.EIO, errno_mod.ENOSPC)


def original_pattern(cluster: int) -> int:
    """The byte each cluster of the source holds at the point in time (one per cluster,
    so that data read from the wrong cluster shows)."""
    return 0x10 + cluster


def original_image() -> bytes:
    return b"".join(bytes([original_pattern(c)]) * CLUSTER for c in range(CLUSTERS))


def error_text(errno: int) -> str:
    """What qemu-io prints after ``failed:`` for ``-errno`` (QEMU uses strerror)."""
    return os.strerror(errno)


def clusters_of(offset: int, length: int) -> range:
    return range(offset // CLUSTER, (offset + length - 1) // CLUSTER + 1)


@dataclass(frozen=True)
class FaultPlan:
    """One blkdebug inject-error rule in the copy-before-write path (or none)."""

    site: str | None = None        # "source-read", "target-write", None: no fault
    cluster: int | None = None     # limited to this cluster's first sector; None: any I/O
    once: bool = True
    errno: int = errno_mod.EIO

    def describe(self) -> str:
        if self.site is None:
            return "no fault"
        where = f"cluster {self.cluster}" if self.cluster is not None else "any offset"
        return (f"{self.site} {errno_mod.errorcode[self.errno]} "
                f"{'once' if self.once else 'persistent'} at {where}")

    def strikes(self, site: str, offset: int, length: int) -> bool:
        """Does an I/O of ``site`` on [offset, offset + length) meet the rule?"""
        if site != self.site:
            return False
        if self.cluster is None:
            return True
        start = self.cluster * CLUSTER
        return offset <= start < offset + length


@dataclass(frozen=True)
class Expected:
    """What one step must answer: ``error`` (qemu-io's text) or success, and for a read
    the byte every position must hold."""

    error: str | None
    pattern: int | None = None
    why: str = ""


@dataclass
class FleecingModel:
    """The state the documentation implies: the source's bytes, the clusters copied,
    whether the snapshot is broken, whether a once-only fault was spent."""

    on_cbw_error: str | None
    fault: FaultPlan
    source: bytearray = field(default_factory=lambda: bytearray(original_image()))
    copied: set[int] = field(default_factory=set)
    broken: bool = False
    fault_spent: bool = False
    detached: bool = False  # the filter is gone (its job ended): writes are not copied

    @property
    def breaks_snapshot(self) -> bool:
        return self.on_cbw_error == "break-snapshot"

    def _io_fails(self, site: str, offset: int, length: int) -> bool:
        if self.fault_spent or not self.fault.strikes(site, offset, length):
            return False
        if self.fault.once:
            self.fault_spent = True
        return True

    def _copy(self, clusters: list[int]) -> bool:
        """Copy ``clusters`` (contiguous) before a write; False if the copy fails."""
        offset, length = clusters[0] * CLUSTER, len(clusters) * CLUSTER
        if self._io_fails("source-read", offset, length) or \
                self._io_fails("target-write", offset, length):
            return False
        self.copied.update(clusters)
        return True

    def guest_write(self, offset: int, length: int, pattern: int) -> Expected:
        """A write of ``pattern`` through the copy-before-write node."""
        pending = [] if self.detached else \
            [c for c in clusters_of(offset, length) if c not in self.copied]
        if pending and not self.broken and not self._copy(pending):
            if not self.breaks_snapshot:
                return Expected(error_text(self.fault.errno),
                                why="break-guest-write: the copy failed, so the write must "
                                    "fail with the copy's error and leave the source as it was")
            self.broken = True
        self.source[offset:offset + length] = bytes([pattern]) * length
        why = ("break-snapshot: the copy failed, the write goes on and the snapshot breaks"
               if self.broken and pending else "the old data is saved (or was)")
        return Expected(None, why=why)

    def snapshot_read(self, offset: int, length: int) -> Expected:
        """A read of the snapshot within one cluster: the point-in-time bytes, or an error."""
        (cluster,) = clusters_of(offset, length)
        if self.broken:
            return Expected(error_text(errno_mod.EACCES),
                            why="break-snapshot: once a copy failed, every snapshot read fails")
        if cluster not in self.copied and \
                self._io_fails("source-read", offset, length):
            return Expected(error_text(self.fault.errno),
                            why="the snapshot reads this uncopied cluster from the source, "
                                "whose read meets the fault")
        return Expected(None, original_pattern(cluster), why="the point-in-time data")


def job_may_run(model: FleecingModel) -> bool:
    """A ``blockdev-backup sync=none`` job (whose filter is the copy-before-write node):
    may it still be running?  Not once its snapshot broke: break-snapshot "will make
    the provided snapshot state invalid and any backup or export process based on it
    will finally fail"; the seed commit: it "aborts related jobs"."""
    return not model.broken


def known_departure(layout: str, on_cbw_error: str | None, what: str) -> str | None:
    """The recorded departure (its name in ``harness/scenarios/departures.py``) that a
    disagreement about ``what`` (``job``, ``write``, ``read``, ``data``) in this setting
    is, if any; None: it is new.

    The fleecing layout's writes and reads meet none of the recorded departures; a
    sync=none job that runs on, or is cancelled like a good backup, after its snapshot
    broke is ``sync-none-broken-snapshot-runs-on``.  (The others, sync=full completing,
    the push backup's ignore livelock, cbw-timeout, lie in settings the explorer does not
    draw yet.)"""
    if layout == "backup-sync-none" and on_cbw_error == "break-snapshot" and what == "job":
        return "sync-none-broken-snapshot-runs-on"
    return None
