"""What QEMU documents, as small checks shared by the suite's tests.

Sources: QAPI ``OnCbwError`` and ``BackupCommon`` (qapi/block-core.json), the
commit that added ``blockdev-backup`` ``on-cbw-error`` (QEMU 10.1), and
``block/copy-before-write.c`` for the error readers of a broken snapshot get
(``-EACCES``).
"""

from __future__ import annotations

import errno
import os

from harness.block.data import first_difference
from harness.scenarios.cbw import GUEST_WRITES, Fault, Observation

BREAKS_GUEST_WRITE = (None, "break-guest-write")  # omitted must mean break-guest-write
BROKEN_SNAPSHOT_ERROR = errno.EACCES  # what readers of a broken snapshot get


def errno_text(code: int) -> str:
    return os.strerror(code)


def expected_action(policy: str, code: int) -> str:
    """The BLOCK_JOB_ERROR action a policy yields for an errno (enospc: stop on ENOSPC)."""
    if policy == "enospc":
        return "stop" if code == errno.ENOSPC else "report"
    return policy


def breaks_snapshot(on_cbw_error: str | None, fault: Fault) -> bool:
    """Does this run break the snapshot (a copy-before-write failure under break-snapshot)?"""
    return on_cbw_error == "break-snapshot" and fault.injects


def assert_guest_writes(obs: Observation, on_cbw_error: str | None, fault: Fault) -> None:
    """break-guest-write: exactly the writes whose copy failed see the error; break-snapshot
    and no fault: every write succeeds."""
    failing = fault.failing_writes() if on_cbw_error in BREAKS_GUEST_WRITE else ()
    for off in GUEST_WRITES:
        result = obs.guest_writes[off]
        if off in failing:
            assert result.error == errno_text(fault.errno), \
                f"guest write at {off}: expected {errno_text(fault.errno)!r}, got {result.output!r}"
        else:
            assert result.ok, f"guest write at {off} should succeed: {result.output!r}"


def assert_source_data(obs: Observation) -> None:
    """A failed guest write left the old data; a successful one the new; the rest untouched."""
    for off, result in obs.guest_writes.items():
        if result.ok:
            assert obs.source_holds_new[off], f"source lacks the guest's data at {off}"
        else:
            assert obs.source_holds_original[off], f"failed write changed the source at {off}"
    for off, original in obs.source_holds_original.items():
        if off not in obs.guest_writes:
            assert original, f"source changed at untouched offset {off}"


def assert_snapshot_reads(obs: Observation, on_cbw_error: str | None, fault: Fault,
                          broken_error: int = BROKEN_SNAPSHOT_ERROR) -> None:
    """Readers of the snapshot see the point-in-time data; once break-snapshot has broken
    it, every read fails with ``broken_error``, whatever the region: EACCES ("Permission
    denied") on the node, what an NBD client gets for it over NBD.

    A persistent source-read fault also fails the snapshot's reads of the regions it
    covers that were never copied (they are read from the source): that is the
    source's own error, not the copy-before-write's.
    """
    assert obs.snapshot_reads, "no snapshot reads to check"
    for off, result in obs.snapshot_reads.items():
        if breaks_snapshot(on_cbw_error, fault):
            expected: str | None = errno_text(broken_error)
        elif fault.site in ("source-read", "both") and not fault.once and \
                off in fault.failing_writes():
            expected = errno_text(fault.errno)
        else:
            expected = None
        assert result.error == expected, (
            f"snapshot read at {off}: expected {expected or 'the old data'}, "
            f"got {result.output!r}")


def assert_success_means_point_in_time(obs: Observation) -> None:
    """A job that reports success must hold the point-in-time data (for sync=none, whose
    normal end is a cancel: its target over the source must be the point-in-time data)."""
    assert obs.job is not None
    if obs.job_reported_success and obs.backup_is_point_in_time is not None:
        assert obs.backup_is_point_in_time, (
            f"backup job reported success ({obs.job.describe()}) but the backup is not the "
            "point-in-time data")


def assert_completed_point_in_time(obs: Observation) -> None:
    """The job completed without an error, and its backup is the point-in-time data."""
    assert obs.job is not None
    assert obs.job.errors == [] and obs.job.end == "completed", obs.job.describe()
    assert obs.job.statuses[-3:] == ["pending", "concluded", "null"], obs.job.statuses
    assert obs.backup_is_point_in_time


def fault_traces(obs: Observation) -> list[str]:
    """What in this run differs from a run without a fault."""
    job = obs.job
    traces = {
        "a guest write failed": bool(obs.failed_writes),
        "the job met an error": bool(job and (job.errors or job.end == "failed")),
        "a snapshot read failed": any(not r.ok for r in obs.snapshot_reads.values()),
        "the backup is not point-in-time": obs.backup_is_point_in_time is False,
        "the target lacks old data": any(v is False for v in obs.backup_holds_original.values()),
    }
    return [text for text, seen in traces.items() if seen]


def assert_fault_fired(obs: Observation) -> None:
    """Something observable differs from the control run: the injection really fired."""
    assert fault_traces(obs), "the injected fault left no trace: did blkdebug fire?"


def assert_like_control(obs: Observation) -> None:
    """Without a fault nothing of what assert_fault_fired looks for may show."""
    assert not fault_traces(obs), f"control run without a fault: {fault_traces(obs)}"


def assert_basics(obs: Observation, on_cbw_error: str | None, fault: Fault,
                  broken_snapshot_error: int = BROKEN_SNAPSHOT_ERROR) -> None:
    """What every run checks: the fault left a trace (or, without one, nothing shows),
    the guest's writes, the snapshot's reads if any (a broken snapshot's fail with
    ``broken_snapshot_error``), and the data left in the source."""
    if fault.injects:
        assert_fault_fired(obs)
    else:
        assert_like_control(obs)
    assert_guest_writes(obs, on_cbw_error, fault)
    if obs.snapshot_reads:
        assert_snapshot_reads(obs, on_cbw_error, fault, broken_snapshot_error)
    assert_source_data(obs)


def assert_same_bytes(what: str, data: bytes, expected: bytes, offset: int = 0) -> None:
    """``data`` (read at ``offset``) is ``expected`` byte for byte; else name the first
    byte that differs, at its offset in the image."""
    assert len(data) == len(expected), f"{what}: read {len(data)} bytes, expected {len(expected)}"
    first = first_difference(data, expected)
    if first is not None:
        raise AssertionError(f"{what} differs from the point-in-time data first at offset "
                             f"{offset + first}: {data[first]:#04x}, expected "
                             f"{expected[first]:#04x}")
