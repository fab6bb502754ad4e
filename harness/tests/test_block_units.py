"""The block layer offline: topology dicts, raw images in Python (checked against the
build's own qemu-img / qemu-io), the images.jsonl recipe, and the summary-row contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.block.data import CHUNK, GUEST_WRITES, first_difference
from harness.block.faults import NO_FAULT, Fault
from harness.block.images import ImageError, Images, byte_count
from harness.block.topology import Layout, Topology
from harness.plugin.rows import observation_row
from harness.qemu.qemu_io import QemuIoResult
from harness.scenarios.cbw import JobOutcome, Observation, ScenarioSpec

# ------------------------------------------------------------------ topology


def test_fleecing_nodes_with_a_throttled_target(tmp_path: Path) -> None:
    t = Topology(Layout.FLEECING, tmp_path, on_cbw_error="break-snapshot", cbw_timeout=2,
                 fault=None, throttle_bps=1000)
    assert t.image_nodes()[0] == {"driver": "raw", "node-name": "source", "file": {
        "driver": "file", "filename": str(tmp_path / "source.raw")}}
    throttle, cbw, snapshot = t.filter_nodes()
    assert throttle == {"driver": "throttle", "node-name": "throttled-target",
                        "throttle-group": "tg0", "file": "target"}
    assert cbw == {"driver": "copy-before-write", "node-name": "cbw", "file": "source",
                   "target": "throttled-target", "on-cbw-error": "break-snapshot",
                   "cbw-timeout": 2}
    assert snapshot == {"driver": "snapshot-access", "node-name": "snapshot", "file": "cbw"}
    assert t.throttle_group()["limits"] == {"bps-write": 1000}
    assert t.backup_args() is None and t.write_node == t.device_node == "cbw"


@pytest.mark.parametrize("layout", [Layout.BACKUP_SYNC_NONE, Layout.BACKUP_SYNC_FULL])
def test_backup_writes_go_through_its_named_filter(tmp_path: Path, layout: Layout) -> None:
    t = Topology(layout, tmp_path, on_cbw_error="break-guest-write", prefix="d0-",
                 job="d0-job")
    args = t.backup_args(on_source_error="stop", speed=1, max_chunk=CHUNK)
    assert args is not None
    assert args["filter-node-name"] == t.write_node == "d0-cbw"
    assert t.device_node == "d0-source"  # the job puts its filter between
    assert args["on-cbw-error"] == "break-guest-write" and args["on-source-error"] == "stop"
    assert "on-target-error" not in args and args["x-perf"] == {"max-chunk": CHUNK}
    assert t.filter_nodes() == []
    assert t.image("target") == tmp_path / "d0-target.raw"


def test_push_backup_reads_the_snapshot_and_leaves_on_cbw_error_to_the_node(
        tmp_path: Path) -> None:
    t = Topology(Layout.PUSH_FROM_SNAPSHOT, tmp_path, on_cbw_error="break-snapshot")
    args = t.backup_args()
    assert args == {"job-id": "job0", "device": "snapshot", "target": "backup", "sync": "full"}
    assert t.image_roles == ("source", "target", "backup")
    assert t.filter_nodes()[0]["on-cbw-error"] == "break-snapshot"


def test_fault_rules_sit_under_the_node_they_strike(tmp_path: Path) -> None:
    t = Topology(Layout.FLEECING, tmp_path, fault=Fault("target-write", once=True))
    source, target = t.image_nodes()
    assert source["file"]["driver"] == "blkdebug" and "inject-error" not in source["file"]
    rules = target["file"]["inject-error"]
    assert rules == [{"event": "write_aio", "iotype": "write", "errno": 5,
                      "sector": GUEST_WRITES[0] // 512, "once": True}]


# -------------------------------------------------------------------- images

def test_byte_counts() -> None:
    assert [byte_count(x) for x in (5, "64k", "4M", "1G")] == [5, 65536, 4 << 20, 1 << 30]
    with pytest.raises(ImageError, match="size '4 MiB'"):
        byte_count("4 MiB")


def test_raw_verdicts_agree_with_the_builds_tools(images: Images) -> None:
    """The Python answers for raw images are the ones qemu-io and qemu-img give."""
    a = images.create("a.raw", "1M", "raw")
    images.write(a, 0x5A, 0, "64k", "raw")
    images.write(a, 0x5A, 65536 + 512, 512, "raw")
    offsets = [0, 65536, 131072]
    by_tool = images.qemu_io(a, *(f"read -P 0x5a {o} 65536" for o in offsets), fmt="raw")
    assert images.holds_each(a, 0x5A, offsets, 65536, "raw") == by_tool.pattern_reads(offsets)
    zeros = images.create("z.raw", "1M", "raw")
    longer = images.create("l.raw", "2M", "raw")
    copy = images.copy(a, images.path("c.raw"))
    for x, y in ((a, zeros), (a, copy), (zeros, longer), (a, longer)):
        proc = images._run([str(images.build.qemu_img), "compare", "-q", "-f", "raw", "-F",
                            "raw", str(x), str(y)], "compare")
        assert images.identical(x, y, "raw", "raw") is (proc.returncode == 0), (x, y)
    images.write(longer, 1, "1M", 1, "raw")  # data past the shorter image's end
    assert not images.identical(zeros, longer, "raw", "raw")


@pytest.mark.parametrize("at", [0, 63, 64, 1000, (1 << 20) - 2])
def test_first_difference_names_the_first_differing_byte(at: int) -> None:
    a = bytes(range(256)) * 4096
    b = bytearray(a)
    b[at] ^= 0xFF
    b[-1] ^= 0xFF  # a later difference does not hide the first
    assert first_difference(a, b) == at
    assert first_difference(b, a) == at


def test_first_difference_of_equal_and_of_prefixes() -> None:
    assert first_difference(b"abc", bytearray(b"abc")) is None
    assert first_difference(b"", b"") is None
    assert first_difference(b"abc", b"abcd") == 3
    assert first_difference(b"xbc", b"abcd") == 0


def test_holds_data_is_identical_against_bytes(images: Images) -> None:
    """As identical(): a longer image's extra bytes must be zeros, and so the data's."""
    a = images.create("a.raw", "2M", "raw")
    images.write(a, 0x5A, 1000, 70_000, "raw")
    data = images.read_raw(a)
    assert images.holds_data(a, data)
    assert images.holds_data(a, data[:(1 << 20) + 5])  # the rest of the image is zeros
    assert images.holds_data(a, data + bytes(10))
    assert not images.holds_data(a, data + b"\1")
    changed = bytearray(data)
    changed[(1 << 20) + 1] = 1
    assert not images.holds_data(a, bytes(changed))
    assert not images.holds_data(a, data[:70_000])  # 0x5A bytes left over


def test_every_image_made_is_in_the_recipe(images: Images) -> None:
    raw = images.create("s.raw", "1M", "raw")
    images.write(raw, 0xAA, 0, "1M", "raw")
    images.copy(raw, images.path("o.raw"))
    images.holds(raw, 0xAA, 0, 512, "raw")  # reads are not recorded
    images.create("q.qcow2", "1M", "qcow2", ["cluster_size=65536"])
    lines = [json.loads(x) for x in images.recipe.read_text().splitlines()]
    assert lines == [
        {"op": "create", "path": "s.raw", "size": 1 << 20, "format": "raw", "options": []},
        {"op": "fill", "path": "s.raw", "offset": 0, "length": 1 << 20, "pattern": 0xAA},
        {"op": "copy", "from": "s.raw", "to": "o.raw"},
        {"op": "create", "path": "q.qcow2", "size": 1 << 20, "format": "qcow2",
         "options": ["cluster_size=65536"]}]


# ---------------------------------------------------------------------- rows

def test_observation_row_keeps_the_contract() -> None:
    spec = ScenarioSpec(Layout.PUSH_FROM_SNAPSHOT, on_cbw_error="break-snapshot",
                        fault=NO_FAULT, on_source_error="ignore", release_speed=0)
    obs = Observation(spec.layout, spec.on_cbw_error, spec.fault)
    obs.guest_writes[GUEST_WRITES[0]] = QemuIoResult("w", "write failed: Input/output error")
    obs.snapshot_reads[0] = QemuIoResult("r", "read 65536/65536 bytes at offset 0")
    obs.job = JobOutcome("cancelled", errors=[{"operation": "read", "action": "ignore"}])
    obs.source_holds_new[GUEST_WRITES[0]] = False
    row = observation_row(obs, policy=spec.policy, note="full speed")
    assert json.loads(json.dumps(row)) == row
    assert {k: row[k] for k in ("family", "fault", "policy", "on_cbw_error")} == {
        "family": "push from snapshot, full speed", "fault": "no-fault", "policy": "ignore",
        "on_cbw_error": "break-snapshot"}
    assert set(row) >= {"scenario", "guest_write", "job", "data", "observation"}
    o = row["observation"]
    assert o["guest_writes"] == [{"offset": GUEST_WRITES[0], "ok": False,
                                  "error": "Input/output error"}]
    assert o["snapshot_reads"] == [{"offset": 0, "ok": True, "error": None}]
    assert o["job"]["errors"] == [["read", "ignore"]] and o["job"]["end"] == "cancelled"
    assert o["data"]["source_holds_new"] == {str(GUEST_WRITES[0]): False}
