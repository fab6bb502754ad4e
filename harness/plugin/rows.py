"""Summary rows: what a scenario saw, as a row of the run's summary and as JSON.

Every row has the table's columns (``scenario``, ``on_cbw_error``, ``guest_write``,
``job``, ``data``) and, for the grid and for comparing builds: ``family`` (the
scenario without its fault or option values), ``fault``, ``policy`` (the job's error
policy, "" if default) and ``observation`` (everything observed, JSON-serialisable;
offsets are string keys).  Other parts read these keys: keep them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..block.data import GUEST_WRITES
from ..block.topology import Layout
from ..guest.vm import DiskRun, GuestRun
from ..qemu.qemu_io import QemuIoResult
from ..scenarios.cbw import JobOutcome, Observation, value_id
from ..scenarios.cbw_timeout import TimeoutRun

FAMILIES = {
    Layout.BACKUP_SYNC_NONE: "backup sync=none",
    Layout.BACKUP_SYNC_FULL: "backup sync=full",
    Layout.FLEECING: "fleecing",
    Layout.PUSH_FROM_SNAPSHOT: "push from snapshot",
}

# The families of tests that drive QEMU themselves (no Scenario), by key: a CaseRow's.
CASE_FAMILIES = {
    "nbd-read-shapes": "fleecing, read shapes over NBD",
    "push-read-shapes": "push from snapshot, read shapes (job chunks)",
    "snapshot-discard": "fleecing, discard on the snapshot",
    "discard-source": "push from snapshot, discard-source",
    "sync-top": "backup sync=top (qcow2 over a backing file)",
    "qcow2-formats": "backup sync=full, qcow2 source and target",
    "min-cluster-size": "fleecing, min-cluster-size",
    "drive-backup": "drive-backup sync=full",
    "paused-across-drains": "backup sync=full, paused job across drains",
    "two-filters": "fleecing export + backup job on one disk",
}


def _io(offset: int | str, result: QemuIoResult) -> dict[str, Any]:
    return {"offset": offset, "ok": result.ok, "error": result.error}


def _by_offset(verdicts: dict[Any, bool]) -> dict[str, bool]:
    return {str(k): v for k, v in verdicts.items()}


def job_dict(job: JobOutcome | None) -> dict[str, Any] | None:
    if job is None:
        return None
    return {"end": job.end, "error": job.error,
            "errors": [list(a) for a in job.error_actions], "statuses": list(job.statuses),
            "paused_on_error": job.paused_on_error,
            "paused_again_after_resume": job.paused_again_after_resume,
            "status_before_cancel": job.status_before_cancel}


def observation_dict(obs: Observation) -> dict[str, Any]:
    """The whole observation, as JSON can carry it."""
    return {
        "guest_writes": [_io(off, r) for off, r in obs.guest_writes.items()],
        "snapshot_reads": [_io(off, r) for off, r in obs.snapshot_reads.items()],
        "job": job_dict(obs.job),
        "data": {"source_holds_new": _by_offset(obs.source_holds_new),
                 "source_holds_original": _by_offset(obs.source_holds_original),
                 "backup_is_point_in_time": obs.backup_is_point_in_time,
                 "target_holds_old": _by_offset(obs.backup_holds_original)},
        "unresponsive": obs.unresponsive,
    }


def _guest_cell(obs: Observation) -> str:
    failed = obs.failed_writes
    if not failed:
        return "all ok"
    return f"{len(failed)}/{len(obs.guest_writes)} failed: {sorted(obs.write_errors)[0]}"


def _job_cell(obs: Observation) -> str:
    if obs.unresponsive:
        return "QEMU stopped answering QMP"
    return obs.job.describe() if obs.job else "-"


def _data_cell(obs: Observation) -> str:
    parts = []
    if obs.snapshot_reads:
        bad = [r for r in obs.snapshot_reads.values() if not r.ok]
        parts.append("snapshot reads ok" if not bad else f"snapshot reads fail: {bad[0].error}")
    if obs.backup_holds_original:
        copied = [o for o, v in obs.backup_holds_original.items() if v]
        parts.append(f"target has old data at {len(copied)}/{len(obs.backup_holds_original)}")
    if obs.backup_is_point_in_time is not None:
        parts.append("backup point-in-time" if obs.backup_is_point_in_time else
                     "backup NOT point-in-time")
    return "; ".join(parts)


def observation_row(obs: Observation, *, policy: str = "", note: str | None = None
                    ) -> dict[str, Any]:
    """One summary row of a scenario; ``note`` tells apart runs of one family that
    differ otherwise (who read the snapshot, the job's speed)."""
    family = FAMILIES[obs.layout] + (f", {note}" if note else "")
    scenario = f"{obs.layout.value} / {obs.fault.name}"
    if policy:
        scenario += f" / job policy {policy}"
    if note:
        scenario += f" / {note}"
    return {"scenario": scenario, "on_cbw_error": value_id(obs.on_cbw_error),
            "guest_write": _guest_cell(obs), "job": _job_cell(obs), "data": _data_cell(obs),
            "family": family, "fault": obs.fault.name, "policy": policy,
            "observation": observation_dict(obs)}


def timeout_row(run: TimeoutRun) -> dict[str, Any]:
    """One summary row of a cbw-timeout run (durations stay out of ``observation``:
    they vary from run to run; the timing class is in)."""
    if run.cbw_timeout is None:
        setting = f"unset (sizes for {run.plan.timeout} s)"
    elif run.cbw_timeout != run.plan.timeout:
        setting = f"{run.cbw_timeout} s (sizes for {run.plan.timeout} s)"
    else:
        setting = f"{run.cbw_timeout} s"
    timeout = (f"cbw-timeout={run.cbw_timeout}s" if run.cbw_timeout is not None
               else "cbw-timeout unset")
    guest = "; ".join(f"{label}: {w.error or 'ok'} after {w.seconds:.1f}s"
                      for label, w in run.writes.items())
    bad = [r for r in run.reads.values() if not r.ok]
    data = "snapshot reads ok" if not bad else f"snapshot reads fail: {bad[0].error}"
    observation = {
        "guest_writes": [{"label": label, "offset": w.offset, "size": w.size, "ok": w.ok,
                          "error": w.error, "timing": w.timing}
                         for label, w in run.writes.items()],
        "snapshot_reads": [{"label": label, "offset": run.read_ranges[label][0],
                            "size": run.read_ranges[label][1], "ok": r.ok, "error": r.error}
                           for label, r in run.reads.items()],
        "job": None,
        "data": {"source_holds_new": dict(run.source_holds_new),
                 "source_holds_original": dict(run.source_holds_original)},
        "unresponsive": None,
    }
    return {"scenario": f"fleecing, throttled target / {timeout} "
                        f"(sizes for {run.plan.timeout}s)",
            "on_cbw_error": value_id(run.on_cbw_error), "guest_write": guest,
            "job": "-", "data": data, "family": f"cbw-timeout, {setting}",
            "fault": "copy slowed by a throttled target", "policy": "",
            "observation": observation}


def guest_disk_row(run: GuestRun, d: DiskRun, source: list[str], target: list[str]
                   ) -> dict[str, Any]:
    """One summary row per disk of a real guest's boot; ``source`` / ``target``: what
    each of ``GUEST_WRITES`` holds afterwards (new, old, zero, mixed)."""
    disk = d.disk
    writes = [op for op in run.ops_on(disk.name) if op.op == "write"]
    failed = [op for op in writes if not op.ok]
    actions = sorted({e["action"] for e in d.io_errors})
    data = [f"BLOCK_IO_ERROR {'/'.join(actions)}" if actions else "no BLOCK_IO_ERROR"]
    if d.stops:
        data.append("stops answered " + ", ".join(s.answer for s in d.stops))
    if d.snapshot_reads:
        bad = {r.error for r in d.snapshot_reads.values() if not r.ok}
        data.append(f"snapshot reads fail: {bad.pop()}" if bad else "snapshot reads ok")
    data.append(f"source {'/'.join(source)}, target {'/'.join(target)}")
    werror = f"werror={disk.werror or 'default'}"
    observation = {
        "guest_writes": [{"offset": op.offset, "ok": op.ok, "error": op.errno_text}
                         for op in writes],
        "snapshot_reads": [_io(off, r) for off, r in d.snapshot_reads.items()],
        "job": {"status": d.job_status},
        "block_io_errors": [[e.get("operation"), e.get("action")] for e in d.io_errors],
        "stops": [s.answer for s in d.stops],
        "data": {"source": dict(zip(map(str, GUEST_WRITES), source)),
                 "target": dict(zip(map(str, GUEST_WRITES), target))},
        "unresponsive": None,
    }
    return {"scenario": f"guest {disk.kind} {werror} / {disk.layout.value} / {disk.fault.name}",
            "on_cbw_error": value_id(disk.on_cbw_error),
            "guest_write": (f"{len(failed)}/{len(writes)} failed: {failed[0].errno_text}"
                            if failed else "all ok"),
            "job": d.job_status or "-", "data": "; ".join(data),
            "family": f"guest, {FAMILIES[disk.layout]}, {disk.kind} {werror}",
            "fault": disk.fault.name, "policy": "", "observation": observation}


@dataclass
class CaseRow:
    """The summary row of a test that drives QEMU itself (no Scenario).

    The test notes what it sees as it goes, before it checks it, so that a failing
    case's row shows what QEMU did: the guest's requests (:meth:`guest`), how the job
    ended (``job``), and each data verdict (:meth:`saw`: "backup" -> "ok", "wrong", or
    an error text).  ``family`` is a key of :data:`CASE_FAMILIES`.
    """

    family: str
    case: str
    on_cbw_error: str | None = None
    fault: str = "no-fault"
    policy: str = ""
    job: str | None = None
    requests: dict[str, str | None] = field(default_factory=dict)  # request -> its error
    verdicts: dict[str, str] = field(default_factory=dict)
    details: dict[str, dict[str, str]] = field(default_factory=dict)  # see saw_each

    def __post_init__(self) -> None:
        if self.family not in CASE_FAMILIES:
            raise KeyError(f"unknown summary family {self.family!r}: add it to "
                           f"harness/plugin/rows.py CASE_FAMILIES")

    def job_ended(self, event: dict[str, Any]) -> None:
        """How the job ended, from its BLOCK_JOB_COMPLETED (or CANCELLED) event."""
        error = event["data"].get("error")
        self.job = "cancelled" if event["event"] == "BLOCK_JOB_CANCELLED" else \
            f"failed ({error})" if error else "completed"

    def guest(self, request: str, result: QemuIoResult) -> None:
        self.requests[request] = result.error

    def saw(self, what: str, verdict: str | bool) -> None:
        """``verdict``: True/False for the data being what it must be, or the error."""
        self.verdicts[what] = {True: "ok", False: "wrong"}.get(verdict, str(verdict)) \
            if isinstance(verdict, bool) else verdict

    def saw_each(self, what: str, verdicts: dict[str, str | bool]) -> None:
        """Several verdicts of one kind (reads of several shapes): the cell shows "ok" or
        the first that is not, the observation all of them."""
        each = {k: {True: "ok", False: "wrong"}.get(v, str(v)) if isinstance(v, bool) else v
                for k, v in verdicts.items()}
        self.details[what] = each
        bad = next((f"{k}: {v}" for k, v in each.items() if v != "ok"), None)
        self.verdicts[what] = bad or "ok"

    def as_row(self) -> dict[str, Any]:
        family = CASE_FAMILIES[self.family]
        failed = [e for e in self.requests.values() if e]
        guest = "-" if not self.requests else "all ok" if not failed else \
            f"{len(failed)}/{len(self.requests)} failed: {failed[0]}"
        scenario = f"{family} / {self.case}" + (f" / {self.fault}" if self.fault != "no-fault"
                                                else "")
        return {"scenario": scenario, "on_cbw_error": value_id(self.on_cbw_error),
                "guest_write": guest, "job": self.job or "-",
                "data": "; ".join(f"{what} {v}" for what, v in self.verdicts.items()),
                "family": family, "fault": self.fault, "policy": self.policy,
                "observation": {"guest_requests": dict(self.requests), "job": self.job,
                                "data": dict(self.verdicts), "details": dict(self.details)}}
