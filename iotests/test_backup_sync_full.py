"""blockdev-backup sync=full while the guest writes, with copy-before-write faults.

The job is braked (speed=1, 64 KiB chunks) so the guest's writes meet data the job
has not copied yet; releasing the brake lets it finish.

The seed commit says break-guest-write "triggers the on-source-error policy".  The
QAPI note on BackupCommon says the job's on-source-error / on-target-error apply to
the job's own I/O only; a guest write's error goes through the device's werror.  The
suite pins the QAPI reading: a one-shot copy-before-write failure reaches the guest,
fires no BLOCK_JOB_ERROR, and the job re-copies the region itself.
"""

from __future__ import annotations

import pytest

from harness.scenarios.cbw import (
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
    assert_completed_point_in_time,
    assert_success_means_point_in_time,
    errno_text,
    expected_action,
)

pytestmark = pytest.mark.requires("blockdev-backup.on-cbw-error", "blockdev-backup.x-perf")

VALUES = pytest.mark.parametrize("on_cbw_error", ON_CBW_ERROR_VALUES, ids=value_id)
SITES = ("target-write", "source-read")
BROKEN_SNAPSHOT_COMPLETES = pytest.mark.departure("sync-full-broken-snapshot-completes")


@VALUES
def test_control_without_fault(scenario, check_transcript, on_cbw_error):
    obs = run(scenario(layout=Layout.BACKUP_SYNC_FULL, on_cbw_error=on_cbw_error))
    assert_basics(obs, on_cbw_error, NO_FAULT)
    assert_completed_point_in_time(obs)
    check_transcript()


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("on_cbw_error", [
    *BREAKS_GUEST_WRITE, pytest.param("break-snapshot", marks=BROKEN_SNAPSHOT_COMPLETES)],
    ids=value_id)
def test_one_shot_fault(scenario, check_transcript, on_cbw_error, site):
    fault = Fault(site, once=True)
    obs = run(scenario(layout=Layout.BACKUP_SYNC_FULL, on_cbw_error=on_cbw_error, fault=fault))
    assert_basics(obs, on_cbw_error, fault)
    if on_cbw_error in BREAKS_GUEST_WRITE:
        # The job's own policy is not consulted for a guest write's error (QAPI); the
        # job copies the region itself later.
        assert obs.ended_job.errors == [], "BLOCK_JOB_ERROR for a guest write's copy failure"
        assert_completed_point_in_time(obs)
    else:
        assert obs.ended_job.end == "failed", (
            f"snapshot broken by the copy-before-write failure, yet the job ended "
            f"{obs.ended_job.describe()}; backup point-in-time: {obs.backup_is_point_in_time}")
    assert_success_means_point_in_time(obs)
    check_transcript()


@VALUES
def test_one_shot_faults_on_both_sides(scenario, check_transcript, on_cbw_error):
    """A one-shot rule on the source read and one on the target write: the copy-before-write
    consumes one, the job's own later copy of the region meets the other."""
    fault = Fault("both", once=True)
    obs = run(scenario(layout=Layout.BACKUP_SYNC_FULL, on_cbw_error=on_cbw_error, fault=fault))
    assert_basics(obs, on_cbw_error, fault)
    assert obs.ended_job.error_actions == [("write", "report")]
    assert obs.ended_job.end == "failed" and obs.ended_job.error == errno_text(fault.errno)
    check_transcript()


@pytest.mark.parametrize("policy,code", POLICY_CASES, ids=POLICY_CASE_IDS)
@pytest.mark.parametrize("site", ["target-write", "source-read"])
@VALUES
def test_persistent_fault_job_policy(scenario, check_transcript, on_cbw_error, site, policy,
                                     code):
    fault = Fault(site, once=False, errno=code)
    s = scenario(layout=Layout.BACKUP_SYNC_FULL, on_cbw_error=on_cbw_error, fault=fault,
                 on_source_error=policy, on_target_error=policy)
    obs = run(s)
    assert_basics(obs, on_cbw_error, fault)
    job = obs.ended_job
    # The job's own copy of the faulty regions fails: now its policy fires.
    operation = "write" if site == "target-write" else "read"
    action = expected_action(policy, code)
    assert job.errors, "no BLOCK_JOB_ERROR though the job's own I/O fails"
    assert job.error_actions[0] == (operation, action)
    if action == "report":
        assert job.end == "failed" and job.error == errno_text(code)
        assert job.statuses[-3:] == ["aborting", "concluded", "null"]
    elif action == "stop":
        assert job.paused_on_error and job.paused_again_after_resume
        assert job.end == "cancelled"
        assert job.statuses.count("paused") == 2, job.statuses
    else:  # ignore: the job retries the failing chunk until cancelled
        assert len(job.errors) >= 3 and {a for _, a in job.error_actions} == {"ignore"}
        assert job.end == "cancelled"
    assert_success_means_point_in_time(obs)
    check_transcript()
