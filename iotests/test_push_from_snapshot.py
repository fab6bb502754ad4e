"""Push backup from the fleecing snapshot: blockdev-backup sync=full from snapshot-access.

The copy-before-write node saves old data for the snapshot; a braked backup job
(speed=1, 64 KiB chunks) copies the snapshot to the backup image while the guest
writes, then is released.  ``on-cbw-error`` is the copy-before-write driver's.

The job reads the snapshot, so a broken snapshot (break-snapshot) is an error of
the job's own reads: EACCES, "Permission denied", handled by its on-source-error
(read, policy action).  Whatever happens, a backup that reports success must hold
the point-in-time data.  A job that ignores errors is released to a finite speed
(harness.cbw.CRUISE_SPEED); released to full speed, ignore on a broken snapshot
livelocks QEMU: that is test_livelock.py.
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
    BROKEN_SNAPSHOT_ERROR,
    assert_basics,
    assert_completed_point_in_time,
    assert_success_means_point_in_time,
    breaks_snapshot,
    errno_text,
    expected_action,
)

pytestmark = pytest.mark.requires("copy-before-write.on-cbw-error", "snapshot-access",
                                  "blockdev-backup.x-perf")

VALUES = pytest.mark.parametrize("on_cbw_error", ON_CBW_ERROR_VALUES, ids=value_id)
SITES = ("target-write", "source-read")


@VALUES
def test_control_without_fault(scenario, check_transcript, on_cbw_error):
    obs = run(scenario(layout=Layout.PUSH_FROM_SNAPSHOT, on_cbw_error=on_cbw_error))
    assert_basics(obs, on_cbw_error, NO_FAULT)
    assert_completed_point_in_time(obs)
    check_transcript()


@pytest.mark.parametrize("site", SITES)
@VALUES
def test_one_shot_fault(scenario, check_transcript, on_cbw_error, site):
    fault = Fault(site, once=True)
    obs = run(scenario(layout=Layout.PUSH_FROM_SNAPSHOT, on_cbw_error=on_cbw_error,
                       fault=fault))
    assert_basics(obs, on_cbw_error, fault)
    if on_cbw_error in BREAKS_GUEST_WRITE:
        # The snapshot stayed valid: the job reads the old data and completes.
        assert_completed_point_in_time(obs)
    else:
        # The job's read of the broken snapshot fails; the default policy reports it.
        assert obs.ended_job.error_actions == [("read", "report")]
        assert obs.ended_job.end == "failed"
        assert obs.ended_job.error == errno_text(BROKEN_SNAPSHOT_ERROR)
        assert obs.ended_job.statuses[-3:] == ["aborting", "concluded", "null"]
    assert_success_means_point_in_time(obs)
    check_transcript()


@pytest.mark.parametrize("policy,code", POLICY_CASES, ids=POLICY_CASE_IDS)
@pytest.mark.parametrize("site", SITES)
@VALUES
def test_persistent_fault_job_policy(scenario, check_transcript, on_cbw_error, site, policy,
                                     code):
    fault = Fault(site, once=False, errno=code)
    obs = run(scenario(layout=Layout.PUSH_FROM_SNAPSHOT, on_cbw_error=on_cbw_error,
                       fault=fault, on_source_error=policy, on_target_error=policy))
    assert_basics(obs, on_cbw_error, fault)
    job = obs.ended_job
    if breaks_snapshot(on_cbw_error, fault):
        read_error: int | None = BROKEN_SNAPSHOT_ERROR  # not the fault's errno
    elif site == "source-read":
        read_error = code  # the uncopied regions are read from the failing source
    else:
        read_error = None  # the failed writes left the source as the snapshot needs it
    if read_error is None:
        assert_completed_point_in_time(obs)
    else:
        action = expected_action(policy, read_error)
        assert job.error_actions[0] == ("read", action)
        if action == "report":
            assert job.end == "failed" and job.error == errno_text(read_error)
        elif action == "stop":
            assert job.paused_on_error and job.paused_again_after_resume
            assert job.end == "cancelled"
        else:  # ignore: the job retries the failing read until cancelled
            assert len(job.errors) >= 3 and {a for _, a in job.error_actions} == {"ignore"}
            assert job.end == "cancelled"
    assert_success_means_point_in_time(obs)
    check_transcript()
