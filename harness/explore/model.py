"""The documented copy-before-write semantics, as an oracle the explorer checks QEMU against.

A copy-before-write node over ``source`` with ``target``, made by one of four layouts:

* fleecing: added by the user, a ``snapshot-access`` node on top;
* push from the snapshot: fleecing, plus a ``blockdev-backup sync=full`` job that
  copies the snapshot to a ``backup`` image;
* backup sync=none: the filter of a ``blockdev-backup sync=none`` job (its target is
  the backup);
* backup sync=full: the filter of a ``blockdev-backup sync=full`` job, which also
  copies every cluster itself.

Jobs start braked (speed 1, one 64 KiB chunk at a time): the first chunk (cluster 0)
is copied at once, then the job waits until a speed change releases it.  One blkdebug
fault plan; the steps a user takes: guest writes, write-zeroes and discards on the
copy-before-write node (or the guest disk above a job's filter), reads of the
snapshot, reads of the source node (which drain the graph above it), the job's
speed, pause, resume and cancel.  For each step the model says
what QEMU must answer (success, or which error), which job events must follow, and
what the data must be.  It is written from the documentation (QAPI ``OnCbwError``,
``BlockdevOnError``, ``BackupCommon``), not from QEMU's code:

* Before a guest write, write-zeroes or discard changes a cluster not yet copied, the
  old data is copied to the target: read from the source, written to the target
  (one copy per contiguous run of clusters of 64 KiB, the block-copy cluster size of
  a raw target).
* ``break-guest-write`` (and the default): a request whose copy fails fails with the
  copy's error, and the source keeps its old data ("the guest will not be able to
  overwrite areas that cannot be backed up").
* ``break-snapshot``: the request goes on ("continue guest write"), the snapshot is
  invalid from then on: every later read of it fails with ``Permission denied``
  (EACCES), no further copies are made, and "any backup or export process based on
  it will finally fail".
* Otherwise a snapshot reader gets the point-in-time data byte for byte: from the
  target where the cluster was copied, else from the source (whose read may meet the
  fault plan's source-read rule: then the read fails with that errno).
* A job's own I/O error goes through its policy (``on-source-error`` for reads,
  ``on-target-error`` for writes; ``BLOCK_JOB_ERROR`` with the operation and action):
  ``report`` ends the job with the error, ``stop`` pauses it until resumed,
  ``ignore`` retries; ``enospc`` stops on ENOSPC and reports anything else.  A guest
  request's copy failure is not the job's error (QAPI note on ``BackupCommon``).
* A job that ends without error (``BLOCK_JOB_COMPLETED`` without ``error``) holds the
  point-in-time data in its target.  A sync=none job runs until cancelled.
* QEMU never dies and always answers QMP.

Faults follow blkdebug's rules: an ``inject-error`` rule on the source's ``read_aio``
(iotype read) or the target's ``write_aio`` (iotype write), limited to one cluster's
first sector or not, ``once`` or persistent, with an errno, and armed at once or only
after N requests of its site (a chain of ``set-state`` rules counting that event: the
first N pass whatever their sector).  A rule limited to a sector fails an I/O whose
range covers that sector.  So the model counts every request on the source and the
target: a copy is one read and one write per contiguous run (none written if the read
failed), a braked job's chunk one per cluster, a snapshot read one source read per
uncopied run (up to the first failure).

Known departures of QEMU from this (``harness/scenarios/departures.py``) are named
here by :func:`known_departure`, for the build's version, so the explorer reports
only what is new.
"""

from __future__ import annotations

import copy
import errno as errno_mod
import os
from dataclasses import dataclass, field

from ..scenarios import departures

KiB = 1024
MiB = 1024 * KiB
CLUSTER = 64 * KiB
CLUSTERS = 4
IMAGE_SIZE = CLUSTER * CLUSTERS
SECTOR = 512
ON_CBW_ERROR_VALUES: tuple[str | None, ...] = (None, "break-guest-write", "break-snapshot")
FAULT_SITES = ("source-read", "target-write")
# The errnos a fault injects.  None is special on the paths involved: the guest
# request and the job's end report strerror() of it, the ``enospc`` policy stops on
# ENOSPC only (ECANCELED, EAGAIN, EINTR, ETIMEDOUT and EACCES, which QEMU's job, retry,
# cbw-timeout and broken-snapshot paths use themselves, are left out).
FAULT_ERRNOS = (errno_mod.EIO, errno_mod.ENOSPC, errno_mod.EPERM, errno_mod.EINVAL,
                errno_mod.ENOMEM)
ARMING_DELAYS = (0, 1, 2, 3)  # requests a set-state chain lets pass before the rule
JOB_POLICIES: tuple[str | None, ...] = (None, "report", "stop", "ignore", "enospc")
BRAKE = 1                 # bytes/s: a job copies its first chunk, then waits
CRUISE_SPEED = 64 * MiB   # a released job that ignores errors retries ~1000 times a second
RELEASE_SPEEDS = (0, CRUISE_SPEED)

FLEECING = "fleecing"
PUSH = "push-from-snapshot"
SYNC_NONE = "backup-sync-none"
SYNC_FULL = "backup-sync-full"


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


def runs(clusters: list[int]) -> list[list[int]]:
    """``clusters`` (sorted) cut into contiguous runs: one copy request each."""
    out: list[list[int]] = []
    for c in clusters:
        if out and out[-1][-1] == c - 1:
            out[-1].append(c)
        else:
            out.append([c])
    return out


@dataclass(frozen=True)
class FaultPlan:
    """One blkdebug inject-error rule in the copy-before-write path (or none)."""

    site: str | None = None        # "source-read", "target-write", None: no fault
    cluster: int | None = None     # limited to this cluster's first sector; None: any I/O
    once: bool = True
    errno: int = errno_mod.EIO
    after: int = 0  # armed only after this many requests of its site (set-state chain)

    def describe(self) -> str:
        if self.site is None:
            return "no fault"
        where = f"cluster {self.cluster}" if self.cluster is not None else "any offset"
        armed = f", armed after {self.after} {self.site.split('-')[1]}s" if self.after else ""
        return (f"{self.site} {errno_mod.errorcode[self.errno]} "
                f"{'once' if self.once else 'persistent'} at {where}{armed}")

    def strikes(self, site: str, offset: int, length: int) -> bool:
        """Does an I/O of ``site`` on [offset, offset + length) meet the rule?"""
        if site != self.site:
            return False
        if self.cluster is None:
            return True
        start = self.cluster * CLUSTER
        return offset <= start < offset + length


@dataclass(frozen=True)
class JobPlan:
    """A job's error policies (None: left to the default, report)."""

    on_source_error: str | None = None
    on_target_error: str | None = None

    def action(self, operation: str, errno: int) -> str:
        """The BLOCK_JOB_ERROR action for the job's own ``read`` / ``write`` error."""
        policy = (self.on_source_error if operation == "read" else self.on_target_error) \
            or "report"
        if policy == "enospc":
            return "stop" if errno == errno_mod.ENOSPC else "report"
        return policy

    def describe(self) -> str:
        return (f"on-source-error={self.on_source_error or 'omitted'}, "
                f"on-target-error={self.on_target_error or 'omitted'}")


@dataclass(frozen=True)
class Expected:
    """What one step must answer: ``error`` (qemu-io's text) or success, and for a read
    the byte every position must hold (``data``: the bytes, when they vary)."""

    error: str | None
    pattern: int | None = None
    why: str = ""
    data: bytes | None = None


@dataclass(frozen=True)
class JobEvent:
    """One thing a job must do next: ``error`` (BLOCK_JOB_ERROR ``operation`` /
    ``action``), ``completed`` (``error``: the text; ``ANY_ERROR``: some error,
    unnamed by the documentation), ``cancelled``, ``paused`` (after a stop), or
    ``spinning`` (it retries an ignored error forever; nothing more to wait for)."""

    kind: str
    operation: str | None = None
    action: str | None = None
    error: str | None = None
    why: str = ""

    def describe(self) -> str:
        if self.kind == "error":
            return f"BLOCK_JOB_ERROR {self.operation}/{self.action}"
        if self.kind == "completed":
            return "BLOCK_JOB_COMPLETED" + (" with an error" if self.error == ANY_ERROR else
                                            f" ({self.error})" if self.error else
                                            " without error")
        return {"cancelled": "BLOCK_JOB_CANCELLED", "paused": "paused",
                "spinning": "retrying", "nothing": "no event within the wait",
                "gone": "the job gone"}.get(self.kind, f"job {self.kind}")


ANY_ERROR = "*"


@dataclass
class CbwModel:
    """The state the documentation implies: the source's bytes, the clusters copied,
    whether the snapshot is broken, whether a once-only fault was spent, and the job."""

    on_cbw_error: str | None
    fault: FaultPlan
    layout: str = FLEECING
    job: JobPlan = field(default_factory=JobPlan)
    source: bytearray = field(default_factory=lambda: bytearray(original_image()))
    copied: set[int] = field(default_factory=set)        # in the copy-before-write target
    job_done: set[int] = field(default_factory=set)      # in a push job's backup image
    # Copied by a sync=full job after its snapshot broke: the source's data of then,
    # which the documentation does not promise to be the point in time.
    after_break: set[int] = field(default_factory=set)
    broken: bool = False
    fault_spent: bool = False
    site_requests: int = 0  # requests of the fault's site so far (its blkdebug event)
    unknown: str | None = None  # why the model cannot say what comes next (it stops)
    detached: bool = False  # the filter is gone (its job ended): writes are not copied
    job_state: str = "none"  # none | braked | running | paused | spinning | ended
    speed: int = BRAKE
    user_paused: bool = False
    job_failure: tuple[str, int] | None = None  # a braked job's failed first chunk
    spin_errno: int | None = None  # the error an ignoring job retries for ever

    @property
    def breaks_snapshot(self) -> bool:
        return self.on_cbw_error == "break-snapshot"

    @property
    def job_present(self) -> bool:
        return self.job_state not in ("none", "ended")

    def _io_fails(self, site: str, offset: int, length: int) -> bool:
        """One request of ``site`` on [offset, offset + length): does it fail?  Every
        request of the fault's site raises its blkdebug event, which a set-state chain
        counts, whatever its sector."""
        if site == self.fault.site:
            self.site_requests += 1
        if self.fault_spent or not self.fault.strikes(site, offset, length) or \
                self.site_requests <= self.fault.after:
            return False
        if self.fault.once:
            self.fault_spent = True
        return True

    def _copy(self, run: list[int]) -> bool:
        """Copy one contiguous run of clusters before a write; False if the copy fails."""
        offset, length = run[0] * CLUSTER, len(run) * CLUSTER
        if self._io_fails("source-read", offset, length) or \
                self._io_fails("target-write", offset, length):
            return False
        self.copied.update(run)
        if self.layout == SYNC_FULL:
            self.job_done.update(run)  # the job finds them copied
        return True

    # ---------------------------------------------------------- guest requests
    def guest_write(self, offset: int, length: int, pattern: int, *,
                    kind: str = "write") -> Expected:
        """A write of ``pattern`` (write-zeroes: 0) through the copy-before-write node."""
        pending = [] if self.detached else \
            [c for c in clusters_of(offset, length) if c not in self.copied]
        if pending and not self.broken:
            for run in runs(pending):
                if self._copy(run):
                    continue
                if not self.breaks_snapshot:
                    return Expected(error_text(self.fault.errno),
                                    why=f"break-guest-write: the copy failed, so the {kind} "
                                        f"must fail with the copy's error and leave the "
                                        f"source as it was")
                self.broken = True
                break
        self.source[offset:offset + length] = bytes([pattern]) * length
        why = (f"break-snapshot: the copy failed, the {kind} goes on and the snapshot breaks"
               if self.broken and pending else "the old data is saved (or was)")
        return Expected(None, why=why)

    def guest_discard(self, offset: int, length: int) -> Expected:
        """A discard: copied first as a write; afterwards the range may read as its old
        data or zeroes (the caller accepts either, then records what is there)."""
        return self.guest_write(offset, length, 0, kind="discard")

    # ---------------------------------------------------------- snapshot reads
    def point_in_time(self, offset: int, length: int) -> bytes:
        return original_image()[offset:offset + length]

    def snapshot_read(self, offset: int, length: int) -> Expected:
        """A read of the snapshot: the point-in-time bytes, or an error."""
        if self.broken:
            return Expected(error_text(errno_mod.EACCES),
                            why="break-snapshot: once a copy failed, every snapshot read fails")
        uncopied = [c for c in clusters_of(offset, length) if c not in self.copied]
        for run in runs(uncopied):
            start = max(offset, run[0] * CLUSTER)
            end = min(offset + length, (run[-1] + 1) * CLUSTER)
            if self._io_fails("source-read", start, end - start):
                return Expected(error_text(self.fault.errno),
                                why="the snapshot reads this uncopied range from the "
                                    "source, whose read meets the fault")
        (first, *_) = clusters_of(offset, length)
        return Expected(None, original_pattern(first), why="the point-in-time data",
                        data=self.point_in_time(offset, length))

    def source_read(self, offset: int, length: int) -> Expected:
        """A read of the source node itself, below the filter (HMP qemu-io on it): the
        source's data as it is now, or the fault.  Its temporary BlockBackend drains
        the source's parents when it goes (the caller applies :meth:`drained`)."""
        if self._io_fails("source-read", offset, length):
            return Expected(error_text(self.fault.errno),
                            why="the read of the source meets the fault")
        return Expected(None, why="the source's current data",
                        data=bytes(self.source[offset:offset + length]))

    # ---------------------------------------------------------------- the job
    def job_start(self) -> bool:
        """A sync=full or push job starts braked: it copies cluster 0, then waits.
        True if that copy succeeds.  A failure is not reported yet: the brake holds
        the job before it looks at the result (the release reports it)."""
        self.job_state = "braked"
        self.speed = BRAKE
        self.job_failure = self._job_copy(0)
        return self.job_failure is None

    def job_set_speed(self, speed: int) -> list[JobEvent]:
        self.speed = speed
        if self.job_state == "braked" and speed != BRAKE:
            self.job_state = "running"
            return self._job_runs()
        return []

    def floods(self, speed: int, *, resume: bool = False) -> bool:
        """Would this speed change (or a resume at it) leave the job retrying an
        ignored blkdebug error at full speed?  It then sends >100,000 BLOCK_JOB_ERROR
        events a second, more than the harness can read: the reply to the next command
        waits behind them.  (A broken snapshot's EACCES at full speed is the recorded
        livelock, not a flood: that one is drawn.)"""
        if speed != 0:
            return False
        trial = copy.deepcopy(self)
        if resume:
            trial.job_resume()
        else:
            trial.job_set_speed(speed)
        return trial.job_state == "spinning" and trial.spin_errno != errno_mod.EACCES

    def drained(self) -> list[JobEvent]:
        """A qemu-io on a node (fleecing layouts' guest requests and snapshot reads, a
        read of the source node) drains the graph when it lets go of the node: the job
        pauses for a moment, which abandons a braked job's failed first chunk as a
        pause does (:meth:`job_pause`); a braked job with nothing left to copy (the
        guest's copies did it) then completes, as after a resume (:meth:`job_resume`).
        The job events that must follow."""
        if self.job_state != "braked":
            return []
        self.job_failure = None
        if all(c in self.job_done for c in range(CLUSTERS)):
            return self._job_runs()
        return []

    def job_pause(self) -> None:
        """block-job-pause.  A braked job whose first chunk failed has not reported
        it yet; the pause abandons that copy, and the job retries it when it runs
        again (no error to report: the retry may well succeed)."""
        self.user_paused = True
        if self.job_state == "braked":
            self.job_failure = None
        if self.job_state in ("braked", "running", "spinning"):
            self.job_state = "paused"

    def job_resume(self) -> list[JobEvent]:
        """block-job-resume: the job goes on where it was; after a stop, it retries."""
        self.user_paused = False
        if self.job_state != "paused":
            return []
        if self.layout == SYNC_NONE:
            self.job_state = "running"
            return []
        self.job_state = "braked" if self.speed == BRAKE else "running"
        if self.job_state == "braked" and (
                self.job_failure is not None or
                any(c not in self.job_done for c in range(CLUSTERS))):
            return []  # the brake holds it before its next chunk
        return self._job_runs()  # (braked with nothing left to copy: it completes)

    def job_cancel(self) -> list[JobEvent]:
        """block-job-cancel (force): BLOCK_JOB_CANCELLED, the filter goes."""
        self.job_state = "ended"
        self._detach()
        return [JobEvent("cancelled", why="a cancelled job ends with BLOCK_JOB_CANCELLED")]

    def _job_copy(self, cluster: int) -> tuple[str, int] | None:
        """The job's copy of ``cluster``: None, or the failed operation and errno."""
        offset = cluster * CLUSTER
        if self.layout == PUSH and self.broken:
            return ("read", errno_mod.EACCES)
        if not (self.layout == PUSH and cluster in self.copied) and \
                self._io_fails("source-read", offset, CLUSTER):
            return ("read", self.fault.errno)  # (a push job reads copied clusters
            # from the target, which has no read fault)
        if self.layout == SYNC_FULL and self._io_fails("target-write", offset, CLUSTER):
            return ("write", self.fault.errno)
        self.job_done.add(cluster)
        if self.layout == SYNC_FULL:
            self.copied.add(cluster)
            if self.broken:
                self.after_break.add(cluster)
        return None

    def _job_runs(self) -> list[JobEvent]:
        """A released job reports the failure it stopped on, if any; then copies what
        is left (one request per cluster, issued together; the first failure is its
        BLOCK_JOB_ERROR), then ends."""
        if self.layout == SYNC_NONE:
            return []
        failure, self.job_failure = self.job_failure, None
        if failure is None:
            pending = [c for c in range(CLUSTERS) if c not in self.job_done]
            self._order_decides(len(pending))
            for cluster in pending:
                failed = self._job_copy(cluster)
                if failed is not None and failure is None:
                    failure = failed
                    if failed[1] == errno_mod.EACCES:
                        break  # a broken snapshot fails at once: nothing else was issued
        if failure is not None:
            return self._job_error(*failure)
        self.job_state = "ended"
        self._detach()
        if self.layout == SYNC_FULL and self.broken:
            return [JobEvent("completed", error=ANY_ERROR,
                             why="break-snapshot: the snapshot broke, so the backup based "
                                 "on it must finally fail")]
        return [JobEvent("completed", why="every cluster copied without error")]

    def _order_decides(self, batch: int) -> None:
        """A released sync=full job issues its ``batch`` reads in order, but writes
        each cluster to the target when its read completes: in an order nobody
        knows.  If the target's fault would pick one of those writes by its place in
        that order (a set-state chain that arms within the batch, or a once-only rule
        for any offset), the model cannot say which cluster fails: it says so
        (``unknown``) and the explorer stops checking that example."""
        fault = self.fault
        if self.layout != SYNC_FULL or fault.site != "target-write" or self.fault_spent \
                or batch < 2:
            return
        first, last, arming = self.site_requests + 1, self.site_requests + batch, fault.after + 1
        if first < arming <= last or (fault.cluster is None and fault.once and arming <= last):
            self.unknown = (f"the job's {batch} concurrent target writes meet a fault armed "
                            f"at write {arming} in an order QEMU does not fix")

    def _job_error(self, operation: str, code: int) -> list[JobEvent]:
        """The job's own I/O failed: BLOCK_JOB_ERROR, then what its policy says."""
        action = self.job.action(operation, code)
        error = JobEvent("error", operation, action,
                         why=f"the job's own {operation} failed ({error_text(code)}): its "
                             f"policy says {action}")
        if action == "report":
            self.job_state = "ended"
            self._detach()
            return [error, JobEvent("completed", error=error_text(code),
                                    why="report: the job ends with the error")]
        if action == "stop":
            self.job_state = "paused"
            return [error, JobEvent("paused", why="stop: the job pauses until resumed")]
        if code != errno_mod.EACCES and self.fault.once:
            return [error, *self._job_runs()]  # the fault is spent: the retry copies
        self.job_state = "spinning"
        self.spin_errno = code
        return [error, JobEvent("spinning", why="ignore: the job retries the failing "
                                                "request for ever")]

    def _detach(self) -> None:
        if self.layout in (SYNC_NONE, SYNC_FULL):
            self.detached = True


def job_may_run(model: CbwModel) -> bool:
    """A ``blockdev-backup sync=none`` job (whose filter is the copy-before-write node):
    may it still be running?  Not once its snapshot broke: break-snapshot "will make
    the provided snapshot state invalid and any backup or export process based on it
    will finally fail"; the seed commit: it "aborts related jobs"."""
    return not model.broken


def known_departure(layout: str, on_cbw_error: str | None, what: str,
                    version: tuple[int, ...], *, job: JobPlan | None = None,
                    speed: int | None = None) -> str | None:
    """The recorded departure (its name in ``harness/scenarios/departures.py``) that a
    disagreement about ``what`` in this setting is, on a build of ``version``, if any;
    None: it is new.  ``what``: ``job`` (the job's events or status), ``data`` (a
    finished job's target), ``unresponsive`` (QEMU stopped answering QMP),
    ``read-leaving-copied`` (a snapshot read that starts in a copied cluster and goes
    on into one not copied), ``write``, ``read``."""
    name = None
    if layout == SYNC_NONE and on_cbw_error == "break-snapshot" and what == "job":
        name = "sync-none-broken-snapshot-runs-on"
    elif layout == SYNC_FULL and on_cbw_error == "break-snapshot" and what in ("job", "data"):
        name = "sync-full-broken-snapshot-completes"
    elif layout == PUSH and on_cbw_error == "break-snapshot" and what == "unresponsive" \
            and job is not None and job.on_source_error == "ignore" and speed == 0:
        name = "ignore-on-broken-snapshot-livelocks"
    elif layout in (FLEECING, PUSH) and what == "read-leaving-copied":
        name = "snapshot-read-leaving-copied-cluster"
    if name is None or not departures.get(name).applies_to(version):
        return None
    return name
