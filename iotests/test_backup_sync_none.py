"""blockdev-backup sync=none with a filter node: the copy-before-write of the seed's case.

A sync=none job copies nothing by itself: its copy-before-write filter saves the old
data of each region the guest overwrites, and the job runs until it is cancelled.
So its target holds only those regions (zeros elsewhere); the point-in-time image is
the target over the source, as a qcow2 target with the source as backing shows it.

The job does no I/O of its own, so its on-source-error / on-target-error are never
consulted (QAPI BackupCommon): no BLOCK_JOB_ERROR, whatever the policy.
break-guest-write: the write whose copy fails gets the error and leaves the source as
it was, so the target over the source stays point-in-time.  break-snapshot: that
write goes through uncopied and no later write is copied either; documented, the
snapshot is then invalid and the job "will finally fail" (QAPI OnCbwError) / is
aborted (seed commit).
"""

from __future__ import annotations

import errno

import pytest

from harness.scenarios.cbw import (
    GUEST_WRITES,
    NO_FAULT,
    ON_CBW_ERROR_VALUES,
    POLICY_CASE_IDS,
    POLICY_CASES,
    Fault,
    Layout,
    run,
    value_id,
)
from iotests.expectations import (
    BREAKS_GUEST_WRITE,
    assert_basics,
    assert_fault_fired,
    assert_source_data,
    assert_success_means_point_in_time,
    errno_text,
)

pytestmark = pytest.mark.requires("blockdev-backup.on-cbw-error")

SITES = ("target-write", "source-read")
BROKEN_SNAPSHOT_KEEPS_JOB = pytest.mark.departure("sync-none-broken-snapshot-runs-on")
VALUES = pytest.mark.parametrize("on_cbw_error", [
    *BREAKS_GUEST_WRITE, pytest.param("break-snapshot", marks=BROKEN_SNAPSHOT_KEEPS_JOB)],
    ids=value_id)


def assert_runs_until_cancelled(obs):
    """sync=none never ends by itself, and a guest write's copy failure is not its error."""
    assert obs.ended_job.errors == [], "BLOCK_JOB_ERROR though the job does no I/O of its own"
    assert obs.ended_job.status_before_cancel == "running"
    assert obs.ended_job.end == "cancelled"


def assert_target_has_old_data_where_written(obs):
    """Every region the guest changed was copied first (where a write failed, the source
    still holds the old data and nothing needed copying)."""
    for off, result in obs.guest_writes.items():
        if result.ok:
            assert obs.backup_holds_original[off], f"region {off} overwritten, not copied"


@pytest.mark.parametrize("on_cbw_error", ON_CBW_ERROR_VALUES, ids=value_id)
def test_control_without_fault(scenario, check_transcript, on_cbw_error):
    obs = run(scenario(layout=Layout.BACKUP_SYNC_NONE, on_cbw_error=on_cbw_error))
    assert_basics(obs, on_cbw_error, NO_FAULT)
    assert_target_has_old_data_where_written(obs)
    assert_runs_until_cancelled(obs)
    assert obs.ended_job.statuses == ["created", "running", "aborting", "concluded", "null"]
    check_transcript()


@pytest.mark.parametrize("once", [True, False], ids=["once", "always"])
@pytest.mark.parametrize("site", SITES)
@VALUES
def test_fault(scenario, check_transcript, on_cbw_error, site, once):
    fault = Fault(site, once=once)
    obs = run(scenario(layout=Layout.BACKUP_SYNC_NONE, on_cbw_error=on_cbw_error, fault=fault))
    assert_basics(obs, on_cbw_error, fault)
    if on_cbw_error in BREAKS_GUEST_WRITE:
        assert_target_has_old_data_where_written(obs)
        assert obs.backup_is_point_in_time
        assert_runs_until_cancelled(obs)
    else:
        # No copy-before-write from the failure on: later writes' regions are lost too.
        assert not any(obs.backup_holds_original.values()), obs.backup_holds_original
        assert obs.ended_job.errors == [], "the guest write's copy failure reached the job's policy"
        job = obs.ended_job
        assert job.end == "failed", (
            f"snapshot broken by the copy-before-write failure, yet the job was "
            f"{job.status_before_cancel} when cancelled and ended {job.describe()}")
    assert_success_means_point_in_time(obs)
    check_transcript()


@pytest.mark.parametrize("policy,code", POLICY_CASES, ids=POLICY_CASE_IDS)
@pytest.mark.parametrize("site", SITES)
@VALUES
def test_persistent_fault_job_policy_not_consulted(scenario, check_transcript, on_cbw_error,
                                                   site, policy, code):
    fault = Fault(site, once=False, errno=code)
    obs = run(scenario(layout=Layout.BACKUP_SYNC_NONE, on_cbw_error=on_cbw_error, fault=fault,
                       on_source_error=policy, on_target_error=policy))
    assert_basics(obs, on_cbw_error, fault)
    assert obs.ended_job.errors == [], f"on-*-error={policy} consulted for a guest write's copy"
    assert_success_means_point_in_time(obs)
    check_transcript()


@pytest.mark.parametrize("on_cbw_error", BREAKS_GUEST_WRITE, ids=value_id)
def test_guest_retry_meets_the_other_fault(scenario, check_transcript, on_cbw_error):
    """One-shot faults on both sides of the copy of the first region: the first write's
    copy fails reading the source, the guest's retry fails writing the target, and the
    next retry is copied and goes through.  (break-snapshot fails no write: no retry.)"""
    s = scenario(layout=Layout.BACKUP_SYNC_NONE, on_cbw_error=on_cbw_error,
                 fault=Fault("both", once=True))
    s.start()
    s.guest_writes()
    assert_fault_fired(s.obs)
    first = GUEST_WRITES[0]
    retries = [s.guest_write(first), s.guest_write(first)]
    assert [r.error for r in retries] == [errno_text(errno.EIO), None]
    s.finish_job()
    obs = s.check_data()
    assert_source_data(obs)
    assert_target_has_old_data_where_written(obs)
    assert obs.backup_is_point_in_time
    assert_runs_until_cancelled(obs)
    check_transcript()
