"""Guest error delivery: a real Linux guest writes through copy-before-write.

A copy-before-write failure under ``break-guest-write`` (the default) fails the guest's
write, so the guest cannot overwrite what could not be backed up (QAPI OnCbwError);
the seed commit adds that it "triggers the on-source-error policy": for a guest
write, the device's ``werror`` (QAPI BackupCommon: a guest write's error goes through
the device's werror/rerror).  ``break-snapshot`` lets the write through and leaves
the snapshot invalid.  Here a Linux guest (Debian kernel, busybox init) does the
writes with ``dd oflag=direct``, and the suite checks what the guest, its kernel, QMP
and the disks show:

* ``report`` (and the device default, which reports an EIO): the write fails with
  EIO, the kernel logs it, BLOCK_IO_ERROR (write, report, the device's qom-path,
  the filter's node-name); the source keeps the old data.
* ``stop``: BLOCK_IO_ERROR (stop) + STOP, status ``io-error``; ``cont`` retries and
  stops again while the fault lasts; once it is gone (one-shot rule, or the backup
  job cancelled) ``cont`` completes the write and the guest sees success.
* ``ignore``: the guest is told success though nothing was written: data loss, as
  werror=ignore documents.
* ``break-snapshot``: no error anywhere the guest or QMP can see; the backup target
  lacks the overwritten regions (fleecing: snapshot reads fail, Permission denied).
* Reads keep working throughout.  BLOCK_IO_ERROR is rate-limited (one per second per
  device, except action stop): only "at least one, with the right fields" is asserted.
* SCSI and ATA disks retry a failed write in the guest's driver: a one-shot fault is
  then invisible to the guest (its retry's copy succeeds); a persistent one fails it.

Each disk has its own source (filled with ORIGINAL), target, filter and job; the guest
writes NEW at GUEST_WRITES, where the fault's sector-targeted rules sit, and reads
UNTOUCHED regions.  Four boots serve every test (see "The boots" below): each test
checks its own disks of a guest it shares with others.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from harness.block.images import Images
from harness.guest import (
    DiskRun,
    GuestDisk,
    GuestOp,
    GuestRun,
    Op,
    Read,
    Write,
    guest_devices,
    run_guest,
)
from harness.plugin.rows import guest_disk_row
from harness.scenarios.cbw import (
    CHUNK,
    GUEST_WRITES,
    NEW,
    ORIGINAL,
    UNTOUCHED,
    Fault,
    Layout,
    value_id,
)
from iotests.expectations import BREAKS_GUEST_WRITE, BROKEN_SNAPSHOT_ERROR, errno_text

pytestmark = pytest.mark.guest

SITES = ("target-write", "source-read")
EIO = errno_text(errno.EIO)
FIRST = GUEST_WRITES[0]
ON_CBW_ERROR_BACKUP = "blockdev-backup.on-cbw-error"
FLEECING_NEEDS = ("copy-before-write.on-cbw-error", "snapshot-access")

# The guests (keys of shared_boot), by what they serve first; boot_disks() lists their disks.
BOOT_OMITTED = "guest-omitted"
BOOT_BREAK_GUEST_WRITE = "guest-break-guest-write"
BOOT_FLEECING = "guest-fleecing"
BOOT_BREAK_SNAPSHOT = "guest-break-snapshot"
BOOT_OF_VALUE = {None: BOOT_OMITTED, "break-guest-write": BOOT_BREAK_GUEST_WRITE}


def backup_value_needs(value: str | None) -> tuple[str, ...]:
    """What blockdev-backup needs for ``value``: an explicit one needs QEMU 10.1+.  The
    one rule for the tests' ``requires`` (backup_values) and the guests' disks
    (backup_values_run)."""
    return () if value is None else (ON_CBW_ERROR_BACKUP,)


def backup_values(values):
    """on-cbw-error values for blockdev-backup, each checked in the guest of its value."""
    return [pytest.param(v, id=value_id(v), marks=[
        pytest.mark.shares(BOOT_OF_VALUE[v]),
        *([pytest.mark.requires(*backup_value_needs(v))] if backup_value_needs(v) else [])])
        for v in values]


BREAKING = pytest.mark.parametrize("on_cbw_error", backup_values(BREAKS_GUEST_WRITE))
FLEECING = pytest.mark.requires(*FLEECING_NEEDS)


# ------------------------------------------------------------------------- running

def guest_reads_region(disk: GuestDisk, offset: int) -> bool:
    """A persistent source-read fault also fails the guest's own reads of its regions
    (that is the source's error, not the copy-before-write's): do not read them."""
    persistent_read_fault = disk.fault.site in ("source-read", "both") and not disk.fault.once
    return not (persistent_read_fault and offset in disk.fault.failing_writes())


def standard_plan(disks: list[GuestDisk]) -> list[Op]:
    """Per disk: write NEW at each of GUEST_WRITES, then read the untouched regions and
    read back the written ones."""
    devices = guest_devices(disks)
    plan: list[Op] = []
    for disk in disks:
        dev = devices[disk.name]
        plan += [Write(dev, off, CHUNK, NEW) for off in GUEST_WRITES]
        plan += [Read(dev, off, CHUNK) for off in UNTOUCHED]
        plan += [Read(dev, off, CHUNK) for off in GUEST_WRITES if guest_reads_region(disk, off)]
    return plan


def region(images: Images, path: Path, offset: int) -> str:
    """What a region of a raw image holds, offline: new, old, zero or mixed."""
    for name, pattern in (("new", NEW), ("old", ORIGINAL), ("zero", 0)):
        if images.holds(path, pattern, offset, CHUNK, "raw"):
            return name
    return "mixed"


@pytest.fixture
def report_disks(images, summary_row, build_info):
    """``report_disks(run, names)``: each disk becomes a row of the run's summary table."""
    names_device = build_info.has("event.BLOCK_IO_ERROR.qom-path")  # not in 7.2

    def report(run: GuestRun, names: Iterable[str]) -> None:
        for name in names:
            d = run.disk(name)
            summary_row(**summary(run, d, images))
            if names_device:
                assert all("qom-path" in e for e in d.io_errors), d.io_errors
    return report


@pytest.fixture
def shared_boot(request, shared_run, guest_image, report_disks, build_info):
    """``shared_boot(mine)``: the guest the test's ``shares`` marker names, on
    ``boot_disks(key, build_info)`` (the same disks for every test that shares it),
    running the standard plan; booted once (``shared_run``: whichever test asks first
    boots it, the others check the same run).  ``mine``, the test's own disks, must be
    among them; the summary table gets these only."""
    key = request.node.get_closest_marker("shares").args[0]
    disks = boot_disks(key, build_info)

    def run(mine: list[GuestDisk]) -> GuestRun:
        strays = [d.name for d in mine if d not in disks]
        assert not strays, f"disks {strays} are not in the guest {key}: see boot_disks()"

        def boot_group(launch_vm: Callable[..., Any], images: Images) -> GuestRun:
            return run_guest(launch_vm, images, guest_image, disks, standard_plan(disks),
                             name=key)
        result: GuestRun = shared_run(key, boot_group)
        assert_kernel_logged_all(result, key, disks)
        report_disks(result, [d.name for d in mine])
        return result
    return run


def summary(run: GuestRun, d: DiskRun, images: Images) -> dict[str, Any]:
    return guest_disk_row(run, d, [region(images, d.source, o) for o in GUEST_WRITES],
                          [region(images, d.target, o) for o in GUEST_WRITES])


# ---------------------------------------------------------------------- assertions

def write_at(run: GuestRun, disk: str, offset: int) -> GuestOp:
    return next(op for op in run.ops_on(disk) if op.op == "write" and op.offset == offset)


def assert_write_failed_in_guest(run: GuestRun, disk: str, offset: int) -> None:
    """The guest's write got EIO and its kernel logged an I/O error on that disk."""
    op = write_at(run, disk, offset)
    assert op.errno_text == EIO, f"{disk}: write at {offset}: expected EIO, got {op}"
    name = run.disk(disk).device.removeprefix("/dev/")
    logged = [m.text for m in run.io_errors_during(op)]
    assert any(f"dev {name}," in text for text in logged), \
        f"{disk}: the guest kernel logged no I/O error on {name} for the write: {logged}"


def assert_write_succeeded_in_guest(run: GuestRun, disk: str, offset: int) -> GuestOp:
    op = write_at(run, disk, offset)
    assert op.ok, f"{disk}: write at {offset} failed in the guest: {op}"
    return op


def assert_block_io_errors(d: DiskRun, action: str) -> None:
    """At least one BLOCK_IO_ERROR (more are rate-limited), each naming this write error,
    the device (qom-path; ``device`` is empty with -blockdev) and the filter node."""
    assert d.io_errors, f"{d.disk.name}: no BLOCK_IO_ERROR"
    want = {"operation": "write", "action": action, "reason": EIO, "node-name": d.filter_node}
    for event in d.io_errors:
        # qom-path is checked where the build has it (boot() checks that it is there).
        expected = {**want, "qom-path": d.disk.qom_path} if "qom-path" in event else want
        assert {k: event.get(k) for k in expected} == expected, f"{d.disk.name}: {event}"


def assert_reads_work(run: GuestRun, disk: str, written: dict[int, int]) -> None:
    """Every read of the disk succeeded and saw ``written[offset]`` (ORIGINAL elsewhere)."""
    reads = [op for op in run.ops_on(disk) if op.op == "read"]
    assert reads
    for op in reads:
        want = written.get(op.offset, ORIGINAL)
        assert op.ok and op.got == CHUNK, f"{disk}: read at {op.offset} failed: {op}"
        assert op.fill == want, f"{disk}: read at {op.offset}: {op.fill} instead of {want:#x}"


def assert_regions(images: Images, path: Path, want: dict[int, str], what: str) -> None:
    got = {off: region(images, path, off) for off in want}
    assert got == want, what


# --------------------------------------------------------------------------- tests

def kind_disk(kind: str, once: bool) -> GuestDisk:
    """The disk of test_disk_kind_report for ``kind`` and ``once``."""
    return GuestDisk(f"{kind.split('-')[-1]}-{'once' if once else 'always'}", kind=kind,
                     werror="report", fault=Fault("target-write", once=once))


# One SCSI or ATA disk per guest (guest_devices): each joins another test's guest.  This
# test comes first: each guest's first test, which conftest runs among the long ones and
# which boots it, then runs on every build (the others may need a capability).
KIND_BOOTS = (("virtio-scsi", True, BOOT_FLEECING), ("virtio-scsi", False, BOOT_OMITTED),
              ("ahci", True, BOOT_BREAK_SNAPSHOT), ("ahci", False, BOOT_BREAK_GUEST_WRITE))


@pytest.mark.parametrize("kind, once", [
    pytest.param(kind, once, id=f"{kind}-{'once' if once else 'always'}",
                 marks=pytest.mark.shares(key)) for kind, once, key in KIND_BOOTS])
def test_disk_kind_report(shared_boot, images, kind, once):
    """SCSI (virtio-scsi + scsi-hd) and ATA (ahci + ide-hd) disks, werror=report, on-cbw-error
    left to its default: QEMU reports the error to the guest's driver, which retries the
    write (SCSI midlayer: Aborted Command; libata error handling).  A one-shot fault is
    gone at the retry: the guest sees success, and the retry was copied first.  A
    persistent one fails every retry and the write."""
    disk = kind_disk(kind, once)
    run = shared_boot([disk])
    name = disk.name
    d = run.disk(name)
    assert_block_io_errors(d, "report")
    if once:
        for off in GUEST_WRITES:
            assert_write_succeeded_in_guest(run, name, off)
        assert_regions(images, d.source, {off: "new" for off in GUEST_WRITES},
                       "the guest's retry went through")
        assert_regions(images, d.target, {off: "old" for off in GUEST_WRITES},
                       "the retried write was copied before it went through")
        assert_reads_work(run, name, {off: NEW for off in GUEST_WRITES})
    else:
        for off in GUEST_WRITES:
            assert_write_failed_in_guest(run, name, off)
        assert_regions(images, d.source, {off: "old" for off in GUEST_WRITES},
                       "failed writes left the old data")
        assert_reads_work(run, name, {})


# A guest serves both fault sites, and several tests (boot_disks): each disk is named
# after its site ("target-..." for a fault on the target's write, "source-..." on the
# source's read) and its role, and where tests differ only by the on-cbw-error value,
# after the value too.

# Short: a disk's node-names end in "-snapshot", and QEMU keeps 31 characters of one.
VALUE_TAG = {None: "om", "break-guest-write": "bgw", "break-snapshot": "bs"}


def at(site: str, role: str) -> str:
    """The disk that plays ``role`` with its fault at ``site``."""
    return f"{site.split('-')[0]}-{role}"


def of_value(on_cbw_error: str | None, name: str) -> str:
    """Disk ``name`` of the disks for ``on_cbw_error``, in a boot shared by several values."""
    return f"{VALUE_TAG[on_cbw_error]}-{name}"


def backup_values_run(build_info, values) -> list[str | None]:
    """The values of ``values`` this build runs with blockdev-backup."""
    return [v for v in values if all(build_info.has(c) for c in backup_value_needs(v))]


def write_error_disks(value: str | None) -> list[GuestDisk]:
    return [disk for site in SITES for disk in (
        GuestDisk(of_value(value, at(site, "default")), on_cbw_error=value,
                  fault=Fault(site, once=True)),
        GuestDisk(of_value(value, at(site, "report")), werror="report", on_cbw_error=value,
                  fault=Fault(site, once=False)),
        GuestDisk(of_value(value, at(site, "ignore")), werror="ignore", on_cbw_error=value,
                  fault=Fault(site, once=False)))]


@BREAKING
def test_write_error_reaches_the_guest(shared_boot, images, on_cbw_error):
    """Per fault site, three disks: device default (one-shot fault), werror=report and
    werror=ignore (persistent faults).  Six of the guest kernel's block I/O error lines:
    one value's disks per guest (see boot_disks)."""
    mine = write_error_disks(on_cbw_error)
    run = shared_boot(mine)
    assert not any(run.disk(d.name).stops for d in mine) and run.final_status != "io-error"
    for name in (of_value(on_cbw_error, at(site, role)) for site in SITES
                 for role in ("default", "report")):
        d = run.disk(name)
        failing = d.disk.fault.failing_writes()
        for off in GUEST_WRITES:
            if off in failing:
                assert_write_failed_in_guest(run, name, off)
            else:
                assert_write_succeeded_in_guest(run, name, off)
        assert_block_io_errors(d, "report")
        kept = {off: ("old" if off in failing else "new") for off in GUEST_WRITES}
        assert_reads_work(run, name, {off: ORIGINAL if v == "old" else NEW
                                      for off, v in kept.items()})
        assert_regions(images, d.source, kept, f"{name}: failed writes left the old data")
        assert_regions(images, d.target, {off: "old" for off in GUEST_WRITES if off not in failing},
                       f"{name}: the regions overwritten were copied first")

    for name in (of_value(on_cbw_error, at(site, "ignore")) for site in SITES):
        ignore = run.disk(name)
        for off in GUEST_WRITES:
            op = assert_write_succeeded_in_guest(run, name, off)
            assert not run.io_errors_during(op), f"{name}: werror=ignore: the guest kernel saw " \
                "an error"
        assert_block_io_errors(ignore, "ignore")
        assert_reads_work(run, name, {})  # the guest reads back the old data it "overwrote"
        assert_regions(images, ignore.source, {off: "old" for off in GUEST_WRITES},
                       f"{name}: werror=ignore: documented data loss: the guest was told its "
                       "writes succeeded, yet the source must still hold the old data")


def werror_stop_disks(value: str | None) -> list[GuestDisk]:
    return [disk for site in SITES for disk in (
        GuestDisk(of_value(value, at(site, "once")), werror="stop", on_cbw_error=value,
                  fault=Fault(site, once=True)),
        GuestDisk(of_value(value, at(site, "always")), werror="stop", on_cbw_error=value,
                  fault=Fault(site, once=False), stop_retries=1))]


@BREAKING
def test_werror_stop_pauses_until_the_fault_is_gone(shared_boot, images, on_cbw_error):
    """Per fault site, two werror=stop disks: ``once`` (one-shot fault: the first ``cont``
    completes the write) and ``always`` (persistent: ``cont`` stops again; cancelling the
    backup job drops the filter, and the next ``cont`` completes the write)."""
    mine = werror_stop_disks(on_cbw_error)
    run = shared_boot(mine)
    assert {s.status for d in mine for s in run.disk(d.name).stops} == {"io-error"}
    # The guest's other disks report or ignore their errors: their events are not ours.
    mine_nodes = {run.disk(d.name).filter_node for d in mine}
    names = [e["event"] for e in run.events if e["event"] == "STOP" or (
        e["event"] == "BLOCK_IO_ERROR" and e["data"].get("node-name") in mine_nodes)]
    for i, name in enumerate(names):
        if name == "BLOCK_IO_ERROR":
            assert "STOP" in names[i + 1:i + 3], f"no STOP after BLOCK_IO_ERROR: {names}"
    for site in SITES:
        once = run.disk(of_value(on_cbw_error, at(site, "once")))
        always = run.disk(of_value(on_cbw_error, at(site, "always")))
        assert [s.answer for s in once.stops] == ["cont"], once.disk.name
        assert [s.answer for s in always.stops] == ["cont", "cancel-job+cont"], \
            f"{always.disk.name}: a cont with the fault in place must stop again"
        # action stop is not rate-limited: one event per pause, each followed by STOP.
        for d in (once, always):
            assert_block_io_errors(d, "stop")
            assert len(d.io_errors) == len(d.stops), (d.disk.name, d.io_errors)
        for d in (once, always):
            name = d.disk.name
            for off in GUEST_WRITES:
                op = assert_write_succeeded_in_guest(run, name, off)
                assert not run.io_errors_during(op), f"{name}: the guest saw the paused write fail"
            assert_reads_work(run, name, {off: NEW for off in GUEST_WRITES})
            assert_regions(images, d.source, {off: "new" for off in GUEST_WRITES},
                           f"{name}: the resumed writes reached the disk")
        # The one-shot fault is gone at the retry: its copy succeeds, the backup stays valid.
        assert_regions(images, once.target, {off: "old" for off in GUEST_WRITES},
                       f"{once.disk.name}: the retried write was copied before it went through")
        assert always.job_status is None, f"{always.disk.name}: the cancelled job is still there"


# The two break-snapshot tests below share one guest.
UNAWARE_DISKS = [disk for site in SITES for disk in (
    GuestDisk(at(site, "report"), werror="report", on_cbw_error="break-snapshot",
              fault=Fault(site, once=True)),
    GuestDisk(at(site, "stop"), werror="stop", on_cbw_error="break-snapshot",
              fault=Fault(site, once=False)))]
JOB_ENDS_DISKS = [GuestDisk(at(site, "disk"), on_cbw_error="break-snapshot",
                            fault=Fault(site, once=True)) for site in SITES]


@pytest.mark.requires("blockdev-backup.on-cbw-error")
@pytest.mark.shares(BOOT_BREAK_SNAPSHOT)
def test_break_snapshot_keeps_the_guest_unaware(shared_boot, images):
    """break-snapshot, per fault site: a report disk (one-shot fault) and a stop disk
    (persistent fault): no error reaches the guest or QMP, and the backup misses what the
    guest overwrote."""
    run = shared_boot(UNAWARE_DISKS)
    for disk in UNAWARE_DISKS:
        assert not run.disk(disk.name).stops, f"{disk.name}: break-snapshot: the guest paused"
        assert not run.disk(disk.name).io_errors, f"{disk.name}: break-snapshot: BLOCK_IO_ERROR"
    for name in (at(site, role) for site in SITES for role in ("report", "stop")):
        for off in GUEST_WRITES:
            op = assert_write_succeeded_in_guest(run, name, off)
            assert not run.io_errors_during(op), f"{name}: the guest kernel saw an error"
        assert_reads_work(run, name, {off: NEW for off in GUEST_WRITES})
        d = run.disk(name)
        assert_regions(images, d.source, {off: "new" for off in GUEST_WRITES},
                       f"{name}: the writes went through")
        # From the failure on nothing is copied: the one-shot fault's second region too.
        assert_regions(images, d.target, {off: "zero" for off in GUEST_WRITES},
                       f"{name}: the backup lacks the overwritten regions (snapshot invalid)")


@pytest.mark.requires("blockdev-backup.on-cbw-error")
@pytest.mark.departure("sync-none-broken-snapshot-runs-on")
@pytest.mark.shares(BOOT_BREAK_SNAPSHOT)
def test_break_snapshot_ends_the_backup_job(shared_boot):
    """break-snapshot, a one-shot fault at each site: the write goes through, and the
    backup job based on the broken snapshot must not go on."""
    run = shared_boot(JOB_ENDS_DISKS)
    for site in SITES:
        name = at(site, "disk")
        assert write_at(run, name, FIRST).ok, name
        assert run.disk(name).job_status != "running", \
            f"{name}: the job goes on with a broken snapshot"


FLEECING_VALUES = [*BREAKS_GUEST_WRITE, "break-snapshot"]


def fleecing_disks(value: str | None) -> list[GuestDisk]:
    return [GuestDisk(of_value(value, at(site, "fleece")), layout=Layout.FLEECING,
                      on_cbw_error=value, fault=Fault(site, once=True)) for site in SITES]


@FLEECING
@pytest.mark.shares(BOOT_FLEECING)
@pytest.mark.parametrize("on_cbw_error", FLEECING_VALUES, ids=value_id)
def test_fleecing_snapshot_under_guest_writes(shared_boot, images, on_cbw_error):
    """A copy-before-write node with snapshot-access on top, a one-shot fault at each
    site; the snapshot is read after the guest's end, as an export would read it."""
    run = shared_boot(fleecing_disks(on_cbw_error))
    for name in (of_value(on_cbw_error, at(site, "fleece")) for site in SITES):
        d = run.disk(name)
        if on_cbw_error == "break-snapshot":
            for off in GUEST_WRITES:
                assert_write_succeeded_in_guest(run, name, off)
            assert not d.io_errors, f"{name}: break-snapshot: BLOCK_IO_ERROR"
            want = errno_text(BROKEN_SNAPSHOT_ERROR)
            assert {off: r.error for off, r in d.snapshot_reads.items()} == \
                {off: want for off in d.snapshot_reads}, \
                f"{name}: reads of a broken snapshot must fail"
            assert_reads_work(run, name, {off: NEW for off in GUEST_WRITES})
        else:
            assert_write_failed_in_guest(run, name, FIRST)
            assert_write_succeeded_in_guest(run, name, GUEST_WRITES[1])
            assert_block_io_errors(d, "report")
            bad = {off: r.output for off, r in d.snapshot_reads.items() if not r.ok}
            assert not bad, f"{name}: the snapshot must still read as the old data: {bad}"
            assert_reads_work(run, name, {FIRST: ORIGINAL, GUEST_WRITES[1]: NEW})


# ----------------------------------------------------------------------- the boots
# A guest boot costs ~4 CPU-seconds under TCG, a disk's plan a fraction of that: four
# guests serve every test, each test checking its own disks.  What bounds a guest:
# * Its kernel logs at most KERNEL_ERROR_BURST block I/O error lines ("I/O error, dev X,
#   sector ...") per 5 s: printk_ratelimited in blk_print_req_error, per call site, not
#   tunable.  assert_write_failed_in_guest looks for them, so a guest's disks may fail no
#   more writes in the guest than that (guest_failed_writes(); checked before the boot,
#   and after it assert_kernel_logged_all() checks that the kernel logged no more).
# * SCSI and ATA disks are /dev/sd*, named in probe order, which is not fixed: one per
#   guest (guest_devices()).  test_disk_kind_report has four, so four guests, which the
#   other tests' disks join.
# * The kernel command line (console.MAX_CMDLINE): about 15 disks of the standard plan.
# A werror=stop disk pauses the whole guest until the harness answers; the guest runs
# its operations one at a time, so no other disk's I/O is in flight meanwhile.
# Lines per guest: omitted / break-guest-write: 6 (write errors: per site 1 for the
# one-shot default disk, 2 for report, 0 for ignore) + 0 (werror=stop) + 2 (the
# persistent fault on the SCSI/ATA disk fails both writes); fleecing: 2 + 2 + 0 (one
# one-shot fault per site; break-snapshot fails none) + 0 (a SCSI retry succeeds);
# break-snapshot: 0.

KERNEL_ERROR_BURST = 10
_BLOCK_ERROR_LINE = re.compile(r"error, dev (\S+), sector ")


def boot_disks(key: str, build_info) -> list[GuestDisk]:
    """The disks of the guest ``key``: what this build runs of the tests sharing it (their
    ``requires``), so every test sharing it boots the same guest."""
    backup_values = backup_values_run(build_info, BREAKS_GUEST_WRITE)
    backup_cbw = build_info.has(ON_CBW_ERROR_BACKUP)
    fleecing = all(build_info.has(c) for c in FLEECING_NEEDS)
    by_value = {BOOT_OF_VALUE[v]: write_error_disks(v) + werror_stop_disks(v)
                for v in backup_values}
    disks = {
        BOOT_OMITTED: by_value.get(BOOT_OMITTED, []),
        BOOT_BREAK_GUEST_WRITE: by_value.get(BOOT_BREAK_GUEST_WRITE, []),
        BOOT_FLEECING: [d for v in FLEECING_VALUES for d in fleecing_disks(v)] if fleecing
        else [],
        BOOT_BREAK_SNAPSHOT: UNAWARE_DISKS + JOB_ENDS_DISKS if backup_cbw else [],
    }[key] + [kind_disk(kind, once) for kind, once, k in KIND_BOOTS if k == key]
    failing = sum(len(guest_failed_writes(d)) for d in disks)
    assert failing <= KERNEL_ERROR_BURST, \
        f"guest {key}: {failing} writes fail in the guest, and its kernel logs at most " \
        f"{KERNEL_ERROR_BURST} of them: move disks to another guest"
    return disks


def guest_failed_writes(disk: GuestDisk) -> tuple[int, ...]:
    """The writes of the standard plan that fail in the guest, each logging one block I/O
    error line: none under werror=stop (the harness resumes them until they succeed),
    werror=ignore or break-snapshot, nor where a SCSI/ATA driver's retry meets a one-shot
    fault no more; else those meeting the fault."""
    if disk.werror in ("stop", "ignore") or disk.on_cbw_error == "break-snapshot" or \
            (disk.kind != "virtio-blk" and disk.fault.once):
        return ()
    return disk.fault.failing_writes()


def assert_kernel_logged_all(run: GuestRun, key: str, disks: list[GuestDisk]) -> None:
    """The guest kernel logged no more block I/O error lines than the guest's disks fail
    writes: else its rate limit may have dropped some that a test looks for."""
    logged = [m.text for m in run.report.kmsg if _BLOCK_ERROR_LINE.search(m.text)]
    expected = sum(len(guest_failed_writes(d)) for d in disks)
    assert len(logged) <= expected, \
        f"guest {key}: the kernel logged {len(logged)} block I/O error lines, {expected} " \
        f"expected (its rate limit keeps {KERNEL_ERROR_BURST}): {logged}"
