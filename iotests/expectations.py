"""What QEMU documents, as small checks shared by the suite's tests.

Sources: QAPI ``OnCbwError`` and ``BackupCommon`` (qapi/block-core.json) and the
commit that added ``blockdev-backup`` ``on-cbw-error`` (QEMU 10.1).
"""

from __future__ import annotations

import errno
import os

from harness.cbw import GUEST_WRITES, Fault, Observation

BREAKS_GUEST_WRITE = (None, "break-guest-write")  # omitted must mean break-guest-write


def errno_text(code: int) -> str:
    return os.strerror(code)


def expected_action(policy: str, code: int) -> str:
    """The BLOCK_JOB_ERROR action a policy yields for an errno (enospc: stop on ENOSPC)."""
    if policy == "enospc":
        return "stop" if code == errno.ENOSPC else "report"
    return policy


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


def assert_success_means_point_in_time(obs: Observation) -> None:
    """A job that reports success must hold the point-in-time data."""
    assert obs.job is not None
    if obs.job.end == "completed" and obs.backup_is_point_in_time is not None:
        assert obs.backup_is_point_in_time, (
            "backup job reported success but the backup is not the point-in-time data")


def assert_fault_fired(obs: Observation) -> None:
    """Something observable differs from the control run: the injection really fired."""
    job = obs.job
    evidence = [
        bool(obs.failed_writes),
        bool(job and (job.errors or job.end == "failed")),
        any(not r.ok for r in obs.snapshot_reads.values()),
        obs.backup_is_point_in_time is False,
        any(v is False for v in obs.backup_holds_original.values()),
    ]
    assert any(evidence), "the injected fault left no trace: did blkdebug fire?"
