"""A backup job among other things: drains while it is paused, a second copy-before-write
filter on the same disk, the disk in an iothread, errors that come at once.

Documented (QAPI ``block-job-pause`` / ``block-job-resume``, ``BlockdevOnError``,
``BackupCommon``, ``OnCbwError``):

* a paused job (``block-job-pause``, or an error under the policy ``stop``) stays
  paused until ``block-job-resume``, whatever else happens meanwhile: operations
  that drain I/O (a graph change, qemu-io on the job's node, a device attached to
  and removed from it) pause and resume jobs internally, and must not resume a job
  the user (or its error policy) paused; resumed, it completes, and its target,
  read as soon as BLOCK_JOB_COMPLETED comes, is the point-in-time image;
* two copy-before-write filters on one disk (a fleecing snapshot exported over NBD,
  and a backup job's filter above it) each keep their own point-in-time copy: a
  fault in one breaks only that one, as its ``on-cbw-error`` says;
* the disk in an iothread changes nothing of the above (``run()``'s backup story);
* ``on-source-error=ignore``: "ignore the error, only report a QMP event"; QEMU
  keeps serving QMP, so the job can be cancelled, also when the failing request
  fails at once without any I/O (blkdebug ``immediately``) and the job runs at full
  speed.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from harness.block import nbd
from harness.block.topology import Layout, Topology
from harness.qemu.machine import Machine
from harness.scenarios.cbw import (
    CHUNK,
    GEOMETRY,
    GUEST_WRITES,
    IMAGE_SIZE,
    NEW,
    NO_FAULT,
    ORIGINAL,
    Fault,
    MiB,
    run,
)
from iotests.expectations import (
    assert_basics,
    assert_completed_point_in_time,
    assert_same_bytes,
    errno_text,
)
from iotests.test_nbd_export import NBD_BROKEN_SNAPSHOT_ERROR

SEED = 0x9D
COMMAND_TIMEOUT = 2.0  # seconds: replies take milliseconds; a livelocked QEMU never replies
ONE_SHOT = Fault("target-write", once=True)


def query_status(vm: Machine, job: str) -> str | None:
    return next((j["status"] for j in vm.cmd("query-jobs") if j["id"] == job), None)


# ------------------------------------------------------------- paused across drains
def drains(vm: Machine, topology: Topology) -> dict[str, Callable[[], None]]:
    """Operations that drain I/O, each checked to have done its part."""
    def graph_change() -> None:
        vm.cmd("blockdev-add", {"driver": "null-co", "node-name": "spare", "size": MiB})
        vm.cmd("blockdev-del", {"node-name": "spare"})

    def qemu_io() -> None:  # a cluster the job has not copied yet: the filter copies it
        result = vm.qemu_io(topology.write_node, f"write -P {NEW:#x} {3 * MiB} {CHUNK}",
                            device=False)
        assert result.ok, f"guest write while the job is paused: {result.output}"

    def device_change() -> None:
        vm.cmd("device_add", {"driver": "scsi-hd", "id": "disk1", "bus": "scsi0.0",
                              "drive": topology.write_node, **GEOMETRY})
        vm.cmd("device_del", {"id": "disk1"})
        vm.wait_event("DEVICE_DELETED", {"device": "disk1"})

    return {"blockdev-add and blockdev-del of another node": graph_change,
            "qemu-io on the job's filter": qemu_io,
            "device_add and device_del of a disk on the job's filter": device_change}


@pytest.mark.requires("blockdev-backup.x-perf")
@pytest.mark.parametrize("paused_by", ["block-job-pause", "target-write-error-stop"])
def test_paused_job_stays_paused_across_drains(launch_vm, images, case_row, paused_by):
    by_error = paused_by != "block-job-pause"
    row = case_row("paused-across-drains", f"paused by {paused_by}",
                   fault=ONE_SHOT.name if by_error else "no-fault",
                   policy="stop" if by_error else "")
    topology = Topology(Layout.BACKUP_SYNC_FULL, images.folder,
                        fault=ONE_SHOT if by_error else None)
    source = images.create(topology.image("source").name, IMAGE_SIZE, "raw")
    original = images.fill_seeded(source, SEED, 0, IMAGE_SIZE)
    images.create(topology.image("target").name, IMAGE_SIZE, "raw")
    args = ["-S", "-device", json.dumps({"driver": "virtio-scsi-pci", "id": "scsi0"})]
    for node in topology.image_nodes():
        args += ["-blockdev", json.dumps(node)]
    vm = launch_vm(args, machine_type="pc")
    job = topology.job
    if by_error:  # at full speed the job's own write at 1 MiB meets the one-shot fault
        vm.cmd("blockdev-backup", topology.backup_args(on_target_error="stop", max_chunk=CHUNK))
        error = vm.wait_event("BLOCK_JOB_ERROR", {"device": job})
        assert (error["data"]["operation"], error["data"]["action"]) == ("write", "stop"), error
        paused = vm.wait_job_status(job, "paused", after=error)
    else:
        vm.cmd("blockdev-backup", topology.backup_args(speed=1, max_chunk=CHUNK))
        vm.wait_job_status(job, "running")
        before = vm.events[-1]  # blockdev-backup's own drain pauses the job for a moment
        vm.cmd("block-job-pause", {"device": job})
        paused = vm.wait_job_status(job, "paused", after=before)
        vm.cmd("block-job-set-speed", {"device": job, "speed": 0})  # paused: no effect yet
    stayed: dict[str, str | bool] = {}
    for name, drain in drains(vm, topology).items():
        drain()
        since = vm.events[next(i for i, e in enumerate(vm.events) if e is paused) + 1:]
        ran = [e for e in since if e["event"] == "JOB_STATUS_CHANGE" and
               e["data"]["status"] != "paused"]
        status = query_status(vm, job)
        stayed[name] = "ok" if not ran and status == "paused" else f"{status} after it"
        row.saw_each("stayed paused", stayed)
        assert not ran, f"the paused job left its pause after {name}: {ran}"
        assert status == "paused", f"the job is not paused after {name}"
    vm.cmd("block-job-resume", {"device": job})
    end = vm.wait_event("BLOCK_JOB_COMPLETED", {"device": job})
    row.job_ended(end)
    assert "error" not in end["data"], end["data"]
    backup = images.read_raw(topology.image("target"))
    row.saw("backup", backup == original)
    assert_same_bytes("the target, read when BLOCK_JOB_COMPLETED came", backup, original)
    errors = vm.events_named("BLOCK_JOB_ERROR")
    assert len(errors) == (1 if by_error else 0), f"BLOCK_JOB_ERROR events: {errors}"


# ------------------------------------------------------- two copy-before-write filters
FAULTS = {  # (the fleecing filter's on-cbw-error, fault on its target's write)
    "no-fault": (None, NO_FAULT),
    "fleecing-copy-fails-break-guest-write": ("break-guest-write", ONE_SHOT),
    "fleecing-copy-fails-break-snapshot": ("break-snapshot", ONE_SHOT),
}
ON_THE_FILTER = pytest.mark.departure("fleecing-export-follows-backup-filter")
STACKINGS = [  # the backup job's device: below or on the fleecing filter
    pytest.param("source", id="backup-below-the-fleecing-filter"),
    pytest.param("cbw", id="backup-on-the-fleecing-filter", marks=ON_THE_FILTER),
]
EARLY_WRITE = 3 * MiB  # written after the fleecing snapshot, before the backup starts


@pytest.mark.requires("copy-before-write.on-cbw-error", "snapshot-access",
                      "blockdev-backup.x-perf", "nbd.abstract-unix-socket")
@pytest.mark.parametrize("on_cbw_error,fault", FAULTS.values(), ids=FAULTS.keys())
@pytest.mark.parametrize("device", STACKINGS)
def test_fleecing_export_and_backup_job_on_one_disk(launch_vm, images, transcript, build_info,
                                                     case_row, device, on_cbw_error, fault):
    """A fleecing snapshot, exported over NBD; the guest writes at 3 MiB; a backup job
    starts, its filter ("b-cbw") on the fleecing filter ("cbw") or below it, on the
    source; the guest writes through the top filter, so each write meets both.  The
    export is the image as it was at the fleecing's start (or, broken by a fault under
    break-snapshot, fails); the backup the image as it was at the job's start."""
    row = case_row("two-filters", f"backup {'on' if device == 'cbw' else 'below'} the "
                   "fleecing filter", on_cbw_error=on_cbw_error, fault=fault.name)
    fleece = Topology(Layout.FLEECING, images.folder, on_cbw_error=on_cbw_error, fault=fault)
    backup = Topology(Layout.BACKUP_SYNC_FULL, images.folder, fault=None, prefix="b-",
                      job="b-job")
    source = images.create(fleece.image("source").name, IMAGE_SIZE, "raw")
    images.write(source, ORIGINAL, 0, IMAGE_SIZE, "raw")
    for t in (fleece, backup):
        images.create(t.image("target").name, IMAGE_SIZE, "raw")
    args: list[str] = []
    for node in [*fleece.image_nodes(), backup.raw_node("target")]:
        args += ["-blockdev", json.dumps(node)]
    vm = launch_vm(args, machine_type="none")
    for node in fleece.filter_nodes():
        vm.cmd("blockdev-add", node)
    export = nbd.NbdExport(vm, build_info, images, transcript, node=fleece.snapshot_node)
    export.start()
    early = vm.qemu_io(fleece.write_node, f"write -P {NEW:#x} {EARLY_WRITE} {CHUNK}",
                       device=False)
    assert early.ok, f"guest write before the backup: {early.output}"
    job_args = backup.backup_args(speed=1, max_chunk=CHUNK)
    assert job_args is not None
    vm.cmd("blockdev-backup", {**job_args, "device": fleece.node(device)})
    vm.wait_job_status(backup.job, "running")
    top = backup.write_node if device == "cbw" else fleece.write_node

    breaks_guest_write = fault.injects and on_cbw_error != "break-snapshot"
    for off in GUEST_WRITES:
        request = f"write -P {NEW:#x} {off} {CHUNK}"
        result = vm.qemu_io(top, request, device=False)
        row.guest(request, result)
        expected = errno_text(fault.errno) if breaks_guest_write and \
            off in fault.failing_writes() else None
        assert result.error == expected, \
            f"guest write at {off}: expected {expected or 'success'}, got {result.output!r}"
    read = export.read(0, IMAGE_SIZE, ORIGINAL)
    row.saw("export", "Pattern verification failed" not in read.output and (read.error or True))
    if fault.injects and not breaks_guest_write:
        assert read.error == errno_text(NBD_BROKEN_SNAPSHOT_ERROR), \
            f"the broken fleecing snapshot served over NBD: {read.output}"
    else:
        assert read.ok and "Pattern verification failed" not in read.output, \
            f"the fleecing export is not the image as it was at its start: {read.output}"
    export.stop()
    vm.cmd("block-job-set-speed", {"device": backup.job, "speed": 0})
    end = vm.wait_event("BLOCK_JOB_COMPLETED", {"device": backup.job})
    row.job_ended(end)
    assert "error" not in end["data"], f"the backup job: {end['data']}"
    at_backup_start = bytearray([ORIGINAL]) * IMAGE_SIZE
    at_backup_start[EARLY_WRITE:EARLY_WRITE + CHUNK] = bytes([NEW]) * CHUNK
    held = images.read_raw(backup.image("target"))
    row.saw("backup", held == at_backup_start)
    assert_same_bytes("the backup job's target, read at its completion", held,
                      bytes(at_backup_start))
    vm.shutdown()
    written = images.holds_each(source, NEW, GUEST_WRITES, CHUNK, "raw")
    assert written == {off: not (breaks_guest_write and off in fault.failing_writes())
                       for off in GUEST_WRITES}, f"the guest's data in the source: {written}"


# ------------------------------------------------------------------- iothread
@pytest.mark.requires("blockdev-backup.x-perf")
@pytest.mark.parametrize("fault", [NO_FAULT, ONE_SHOT], ids=lambda f: f.name)
def test_disk_in_an_iothread(scenario, fault):
    """The backup story (braked sync=full, two guest writes through a SCSI disk whose
    controller runs in an iothread) with on-cbw-error left to its default.  No guest
    driver runs (-S): the disk's nodes are in the iothread as far as virtio-scsi moves
    them there when the disk is plugged; the test does not look inside QEMU for it."""
    obs = run(scenario(layout=Layout.BACKUP_SYNC_FULL, fault=fault, iothread=True,
                       summary_note="disk in an iothread"))
    assert_basics(obs, None, fault)
    assert_completed_point_in_time(obs)


# ------------------------------------------------------- errors that come at once
@pytest.mark.requires("blockdev-backup.x-perf")
@pytest.mark.departure("ignore-on-broken-snapshot-livelocks")  # the same cause
def test_ignore_against_immediate_read_errors(scenario):
    """Every read of the source at 1 MiB and 2 MiB fails at once (no I/O); the job,
    released to full speed, ignores its read errors.  The harness cancels it after a
    few BLOCK_JOB_ERRORs: QEMU must still answer."""
    fault = Fault("source-read", once=False, immediately=True)
    obs = run(scenario(layout=Layout.BACKUP_SYNC_FULL, fault=fault, on_source_error="ignore",
                       release_speed=0, command_timeout=COMMAND_TIMEOUT,
                       summary_note="errors at once, full speed"))
    assert_basics(obs, None, fault)
    assert {a for _, a in obs.ended_job.error_actions} == {"ignore"}
    assert obs.ended_job.end == "cancelled"

