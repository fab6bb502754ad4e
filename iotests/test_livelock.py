"""A push backup from a broken snapshot with on-source-error=ignore.

Fleecing (copy-before-write + snapshot-access) with on-cbw-error=break-snapshot, a
one-shot copy-before-write failure, and a blockdev-backup from the snapshot with
on-source-error=ignore.  Every read of the broken snapshot fails at once (EACCES,
no I/O), and "ignore" retries it.  Documented intent: ignore retries, but QEMU stays
a QEMU: it keeps answering QMP, the job can be cancelled, and it never reports
success (its source is no longer the point-in-time data).

Observed (11.1, 10.0, 7.2), with the job at full speed (speed 0, the default): the
retry loop never yields to the main loop.  It starts inside the block-job-set-speed
that releases the job, which never gets its reply; QEMU sends ~150,000
BLOCK_JOB_ERROR events a second, answers no QMP command (not even quit) and ignores
SIGTERM; only SIGKILL ends it.  The harness reports that QEMU stopped answering,
kills it, and the test ends in a few seconds.  With a speed limit the job's rate
limiter sleeps between the retries, and QEMU behaves as documented.
"""

from __future__ import annotations

import pytest

from harness.scenarios.cbw import CRUISE_SPEED, Fault, Layout, run
from iotests.expectations import assert_basics, assert_success_means_point_in_time

pytestmark = pytest.mark.requires("copy-before-write.on-cbw-error", "snapshot-access",
                                  "blockdev-backup.x-perf")

COMMAND_TIMEOUT = 2.0  # seconds: replies take milliseconds; a livelocked QEMU never replies
LIVELOCK = pytest.mark.departure("ignore-on-broken-snapshot-livelocks")


@pytest.mark.parametrize("speed", [pytest.param(0, marks=LIVELOCK, id="full-speed"),
                                   pytest.param(CRUISE_SPEED, id="speed-limit")])
def test_ignored_read_error_on_broken_snapshot(scenario, check_transcript, speed):
    fault = Fault("target-write", once=True)
    obs = run(scenario(layout=Layout.PUSH_FROM_SNAPSHOT, on_cbw_error="break-snapshot",
                       fault=fault, on_source_error="ignore", release_speed=speed,
                       command_timeout=COMMAND_TIMEOUT))
    assert_basics(obs, "break-snapshot", fault)
    # run() got here: QEMU answered, the job retried (ignore), the harness cancelled it.
    assert {a for _, a in obs.ended_job.error_actions} == {"ignore"}
    assert obs.ended_job.end == "cancelled"
    assert_success_means_point_in_time(obs)
    check_transcript()
