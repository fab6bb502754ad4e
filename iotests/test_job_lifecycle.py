"""A backup job's lifecycle (QAPI JobStatus, job-finalize / job-dismiss, transactions).

blockdev-backup sync=full from a raw source to a raw target under ``-machine none``;
the "guest" writes with HMP qemu-io on the job's copy-before-write filter node
("cbw", ``filter-node-name``), while the job is braked (speed 1, 64 KiB chunks, as
in the rest of the suite), so that each write meets data the job has not copied.

Documented (QAPI ``BlockdevBackup`` / ``JobStatus`` / ``job-finalize`` /
``job-dismiss``, ``TransactionProperties``):

* ``auto-finalize: false``: a job that finished its work waits in ``pending`` until
  ``job-finalize``; ``auto-dismiss: false``: it then stays ``concluded`` until
  ``job-dismiss``; a verb the status does not accept is refused;
* BLOCK_JOB_COMPLETED means the backup is done: the target, read at once, holds the
  point-in-time data;
* ``completion-mode: grouped``: the jobs of one transaction complete together, and
  if one fails, the others are cancelled.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from harness.block.images import Images
from harness.block.topology import Layout, Topology
from harness.errors import CommandFailed
from harness.qemu.machine import Machine
from harness.scenarios.cbw import CHUNK, GUEST_WRITES, IMAGE_SIZE, NEW, ORIGINAL, Fault

pytestmark = pytest.mark.requires("blockdev-backup.x-perf", "blockdev-backup.auto-finalize")


@dataclass
class Backup:
    """One source -> target backup of ``Topology`` ``prefix`` and its reference copy."""

    topology: Topology
    images: Images

    @property
    def job(self) -> str:
        return self.topology.job

    def make_images(self) -> None:
        source = self.images.create(self.topology.image("source").name, IMAGE_SIZE, "raw")
        self.images.write(source, ORIGINAL, 0, IMAGE_SIZE, "raw")
        self.images.create(self.topology.image("target").name, IMAGE_SIZE, "raw")

    def args(self, **extra: Any) -> dict[str, Any]:
        args = self.topology.backup_args(speed=1, max_chunk=CHUNK)
        assert args is not None
        return {**args, **extra}

    def target_is_point_in_time(self) -> bool:
        """The target file as it is now (QEMU running): the page cache has what QEMU wrote."""
        return self.images.holds(self.topology.image("target"), ORIGINAL, 0, IMAGE_SIZE, "raw")


def backups(images: Images, *prefixes: str, fault: Fault | None = None) -> list[Backup]:
    out = [Backup(Topology(Layout.BACKUP_SYNC_FULL, images.folder, fault=fault if i else None,
                           prefix=p, job=f"{p}job"), images)
           for i, p in enumerate(prefixes)]
    for b in out:
        b.make_images()
    return out


def launch(launch_vm: Callable[..., Machine], backups_: list[Backup]) -> Machine:
    args: list[str] = []
    for b in backups_:
        for node in b.topology.image_nodes():
            args += ["-blockdev", json.dumps(node)]
    return launch_vm(args, machine_type="none")


def statuses(vm: Machine, job: str) -> list[str]:
    """The job's JOB_STATUS_CHANGE statuses, less the paused/running pairs of drains
    (each HMP qemu-io drains I/O, which pauses a running job for a moment)."""
    out: list[str] = []
    for e in vm.events_named("JOB_STATUS_CHANGE", {"id": job}):
        status = e["data"]["status"]
        if status == "running" and out and out[-1] == "paused":
            out.pop()
        else:
            out.append(status)
    return out


def query_status(vm: Machine, job: str) -> str | None:
    return next((j["status"] for j in vm.cmd("query-jobs") if j["id"] == job), None)


def guest_writes(vm: Machine, backup: Backup) -> None:
    for off in GUEST_WRITES:
        result = vm.qemu_io(backup.topology.write_node, f"write -P {NEW:#x} {off} {CHUNK}",
                            device=False)
        assert result.ok, f"guest write at {off}: {result.output}"


def refused(vm: Machine, verb: str, job: str, status: str) -> None:
    with pytest.raises(CommandFailed) as exc:
        vm.cmd(f"job-{verb}", {"id": job})
    assert "cannot accept command verb" in exc.value.desc and status in exc.value.desc, \
        exc.value.desc


def test_manual_finalize_and_dismiss(launch_vm, images):
    (b,) = backups(images, "")
    vm = launch(launch_vm, [b])
    vm.cmd("blockdev-backup", b.args(**{"auto-finalize": False, "auto-dismiss": False}))
    vm.wait_job_status(b.job, "running")
    guest_writes(vm, b)
    refused(vm, "dismiss", b.job, "running")
    vm.cmd("block-job-set-speed", {"device": b.job, "speed": 0})
    pending = vm.wait_job_status(b.job, "pending")
    vm.wait_event("BLOCK_JOB_PENDING", {"id": b.job})
    assert query_status(vm, b.job) == "pending"
    assert not vm.events_named("BLOCK_JOB_COMPLETED"), "completed before job-finalize"
    refused(vm, "dismiss", b.job, "pending")

    vm.cmd("job-finalize", {"id": b.job})
    completed = vm.wait_event("BLOCK_JOB_COMPLETED", {"device": b.job}, after=pending)
    assert b.target_is_point_in_time(), "BLOCK_JOB_COMPLETED came, the target is not the " \
        "point-in-time data yet"
    assert "error" not in completed["data"], completed["data"]
    vm.wait_job_status(b.job, "concluded")
    assert query_status(vm, b.job) == "concluded", "auto-dismiss=false: the job must stay"
    refused(vm, "finalize", b.job, "concluded")

    vm.cmd("job-dismiss", {"id": b.job})
    vm.wait_job_status(b.job, "null")
    assert query_status(vm, b.job) is None
    assert statuses(vm, b.job) == ["created", "running", "waiting", "pending", "concluded",
                                   "null"]
    assert images.holds(b.topology.image("source"), NEW, GUEST_WRITES[0], CHUNK, "raw")


@pytest.mark.requires("transaction.completion-mode")
@pytest.mark.parametrize("fault", [None, Fault("target-write", once=False)],
                         ids=["no-fault", "second-job-target-write-always"])
def test_grouped_transaction(launch_vm, images, fault):
    """Two backups in one transaction; the second's target fails every write at 1 MiB
    (the job's own copy meets it: report, the default policy, fails that job)."""
    first, second = backups(images, "a-", "b-", fault=fault)
    vm = launch(launch_vm, [first, second])
    vm.cmd("transaction", {
        "actions": [{"type": "blockdev-backup", "data": first.args()},
                    {"type": "blockdev-backup", "data": second.args(speed=0)}],
        "properties": {"completion-mode": "grouped"}})
    if fault is None:
        # The second job finishes its copy at full speed and waits for the first.
        vm.wait_job_status(second.job, "waiting")
        assert query_status(vm, first.job) == "running"
        assert not vm.events_named("BLOCK_JOB_COMPLETED"), "a grouped job completed alone"
        vm.cmd("block-job-set-speed", {"device": first.job, "speed": 0})
        for b in (first, second):
            event = vm.wait_event("BLOCK_JOB_COMPLETED", {"device": b.job})
            assert "error" not in event["data"], event["data"]
            assert b.target_is_point_in_time(), f"{b.job} completed, its target is not " \
                "the point-in-time data"
        return
    failed = vm.wait_event("BLOCK_JOB_COMPLETED", {"device": second.job})
    assert failed["data"].get("error") == "Input/output error", failed["data"]
    cancelled = vm.wait_any_event([("BLOCK_JOB_CANCELLED", {"device": first.job}),
                                   ("BLOCK_JOB_COMPLETED", {"device": first.job})])
    assert cancelled["event"] == "BLOCK_JOB_CANCELLED", (
        f"grouped: the first job must be cancelled when the second fails, got {cancelled}")
    for b in (first, second):
        vm.wait_job_status(b.job, "null")
