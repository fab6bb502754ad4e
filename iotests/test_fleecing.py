"""Fleecing: a copy-before-write node (blockdev-add) with snapshot-access on top.

The guest writes through the copy-before-write node; a reader of the point-in-time
snapshot (here HMP qemu-io on the snapshot-access node, as an NBD export would read
it) sees the old data.  There is no job: ``on-cbw-error`` is the copy-before-write
driver's own (since 7.1), so this file runs on older builds too.

break-guest-write (the default): a write whose copy fails gets the error, and the
snapshot stays valid.  break-snapshot: the write succeeds and the snapshot is broken:
every read of it fails with EACCES, "Permission denied" (block/copy-before-write.c;
NBD clients see EINVAL).

The rule sets in ``configs/`` are checked here too: given to blkdebug as its
``config`` file, each behaves as its rules sent inline do, and not as no fault does.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.block import blkdebug
from harness.errors import ConfigError
from harness.qemu.transcript import path_filter
from harness.scenarios.cbw import NO_FAULT, ON_CBW_ERROR_VALUES, Fault, Layout, run, value_id
from iotests.expectations import assert_basics, assert_fault_fired

pytestmark = pytest.mark.requires("copy-before-write.on-cbw-error", "snapshot-access")

VALUES = pytest.mark.parametrize("on_cbw_error", ON_CBW_ERROR_VALUES, ids=value_id)
CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.conf"))


@VALUES
def test_control_without_fault(scenario, check_transcript, on_cbw_error):
    obs = run(scenario(layout=Layout.FLEECING, on_cbw_error=on_cbw_error))
    assert_basics(obs, on_cbw_error, NO_FAULT)
    check_transcript()


@pytest.mark.parametrize("once", [True, False], ids=["once", "always"])
@pytest.mark.parametrize("site", ["target-write", "source-read"])
@VALUES
def test_fault(scenario, check_transcript, on_cbw_error, site, once):
    fault = Fault(site, once=once)
    obs = run(scenario(layout=Layout.FLEECING, on_cbw_error=on_cbw_error, fault=fault))
    assert_basics(obs, on_cbw_error, fault)
    check_transcript()


def observed(obs):
    """What the guest and the snapshot's reader saw, and the data left in the source."""
    return ({off: r.error for off, r in obs.guest_writes.items()},
            {off: r.error for off, r in obs.snapshot_reads.items()}, obs.source_holds_new)


@pytest.mark.requires("blkdebug")
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_file_acts_as_its_inline_rules(scenario, check_transcript, build_info, path):
    events = build_info.schema.blkdebug_events()
    from_file, inline = (
        run(scenario(layout=Layout.FLEECING, name=name,
                     fault=Fault.from_config(path, inline=inline, valid_events=events)))
        for name, inline in (("vm-config-file", False), ("vm-inline", True)))
    assert_fault_fired(from_file)
    assert observed(from_file) == observed(inline)
    check_transcript()


@pytest.mark.requires("blkdebug")
def test_unknown_event_in_config_is_one_clear_line(build_info, workdir, transcript,
                                                   check_transcript):
    events = build_info.schema.blkdebug_events()
    transcript.add_filter(path_filter(workdir))
    config = workdir / "typo.conf"
    config.write_text('[inject-error]\nevent = "write_aoi"\niotype = "write"\nerrno = "5"\n')
    with pytest.raises(ConfigError) as from_file:
        blkdebug.load(config, events)
    with pytest.raises(ConfigError) as inline:
        blkdebug.validate(blkdebug.load(config), events)
    listing = f"this build's events: {', '.join(sorted(events))}"
    for exc in (from_file, inline):
        message = str(exc.value)
        transcript.log(message)
        assert "\n" not in message
        assert "unknown blkdebug event 'write_aoi' (did you mean 'write_aio'?)" in message
        assert message.endswith(listing)
    assert str(from_file.value).startswith(f"{config}:2: ")
    check_transcript()
