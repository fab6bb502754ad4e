"""Fleecing exported over NBD, read the way a pull-backup client reads the snapshot.

The fleecing layout (a copy-before-write node with snapshot-access on top, see
test_fleecing.py) with the snapshot-access node exported read-only over NBD
(``nbd-server-start`` on an abstract unix socket, ``block-export-add``).  The export
is up before the guest writes; the client is the build's own ``qemu-io -r``,
offline, one connection per read (harness/block/nbd.py).  The fault is on the
copy-before-write's write to the target.

break-guest-write (the default): the write whose copy fails gets the error and the
export serves the point-in-time data everywhere.  break-snapshot: the write succeeds
and, as documented ("any backup or export process based on it will finally fail"),
the export's reads fail, every one, whatever the region: the node fails them with
EACCES, which NBD's protocol cannot carry, so QEMU's NBD server sends EINVAL and the
client sees "Invalid argument" (nbd/server.c, ``system_errno_to_nbd_errno``).  Either
way the export never serves data that is not the point-in-time data as if it were.
"""

from __future__ import annotations

import errno

import pytest

from harness.block import nbd
from harness.scenarios.cbw import (
    CHUNK,
    GUEST_WRITES,
    NO_FAULT,
    ON_CBW_ERROR_VALUES,
    ORIGINAL,
    UNTOUCHED,
    Fault,
    Layout,
    Observation,
    value_id,
)
from iotests.expectations import assert_basics

pytestmark = pytest.mark.requires("copy-before-write.on-cbw-error", "snapshot-access",
                                  "nbd.abstract-unix-socket")

VALUES = pytest.mark.parametrize("on_cbw_error", ON_CBW_ERROR_VALUES, ids=value_id)
NBD_BROKEN_SNAPSHOT_ERROR = errno.EINVAL  # EACCES, as the NBD server sends it


@pytest.fixture
def over_nbd(scenario, images, build_info):
    """``over_nbd(on_cbw_error, fault)``: the fleecing run with the snapshot read over NBD."""
    def run(on_cbw_error: str | None, fault: Fault) -> Observation:
        s = scenario(layout=Layout.FLEECING, on_cbw_error=on_cbw_error, fault=fault,
                     summary_note="read over NBD")
        vm = s.start()
        export = nbd.NbdExport(vm, build_info, images, s.transcript, node="snapshot")
        export.start()
        s.transcript.log(f"NBD client: qemu-io -r --image-opts {export.image_opts}")
        s.guest_writes()
        for off in GUEST_WRITES + UNTOUCHED:
            s.obs.snapshot_reads[off] = export.read(off, CHUNK, ORIGINAL)
        export.stop()
        obs: Observation = s.check_data()
        assert not any("Pattern verification failed" in r.output
                       for r in obs.snapshot_reads.values()), \
            "the export served data that is not the point-in-time data"
        assert_basics(obs, on_cbw_error, fault, NBD_BROKEN_SNAPSHOT_ERROR)
        return obs
    return run


@VALUES
def test_control_without_fault(over_nbd, check_transcript, on_cbw_error):
    over_nbd(on_cbw_error, NO_FAULT)
    check_transcript()


@pytest.mark.parametrize("once", [True, False], ids=["once", "always"])
@VALUES
def test_target_write_fault(over_nbd, check_transcript, on_cbw_error, once):
    over_nbd(on_cbw_error, Fault("target-write", once=once))
    check_transcript()
