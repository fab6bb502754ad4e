"""Unit tests of the harness's pure helpers (no QEMU needed)."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from harness.errors import ConfigError, describe_exit
from harness.qemu import builds
from harness.qemu.debian import mirror_in
from harness.qemu.machine import QemuIoResult, _sh_quote_relocatable, event_matches
from harness.qemu.probe import Schema
from harness.qemu.transcript import Transcript, compare, filter_qemu_io, path_filter, reference_path

MIRROR = "http://mirror.invalid/debian"


def test_mirror_from_deb822_skips_security_and_disabled():
    deb822 = [f"Types: deb\nURIs: http://x.invalid/debian-security\nSuites: bookworm-security\n\n"
              f"Types: deb\nURIs: http://y.invalid/debian\nEnabled: no\n\n"
              f"Types: deb deb-src\nURIs: {MIRROR}/\nSuites: bookworm\n"]
    assert mirror_in(deb822, []) == MIRROR


def test_mirror_from_one_line_sources_with_options():
    assert mirror_in([], [f"# comment\ndeb [arch=amd64 signed-by=/k.gpg] {MIRROR} bookworm main"]
                     ) == MIRROR
    assert mirror_in([], ["deb http://archive.invalid/ubuntu jammy main"]) is None


def fake_tool(folder: Path, name: str) -> Path:
    path = folder / name
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def fake_build(tmp_path):
    for tool in builds.TOOLS:
        fake_tool(tmp_path, tool)
    return tmp_path


def test_select_precedence_option_over_build_dir_over_env(fake_build, tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    own_img = fake_tool(other, "qemu-img")
    env_io = fake_tool(other, "qemu-io")
    b = builds.select(qemu_build=str(fake_build), qemu_img_prog=str(own_img),
                      env={"QEMU_IO_PROG": str(env_io)})
    assert b.qemu_img == own_img and b.origin["qemu-img"] == "--qemu-img-prog"
    assert b.qemu_io == fake_build / "qemu-io"  # --qemu-build beats the environment
    assert b.origin["qemu-system-x86_64"] == "--qemu-build" and b.release is None


def test_select_env_and_siblings(fake_build):
    b = builds.select(env={"QEMU_PROG": str(fake_build / "qemu-system-x86_64")})
    assert b.origin["qemu-system-x86_64"] == "QEMU_PROG"
    assert b.qemu_img == fake_build / "qemu-img" and b.origin["qemu-img"] == "beside QEMU_PROG"


@pytest.mark.parametrize("kwargs,message", [
    ({"qemu_prog": "/nonexistent/qemu"}, "--qemu-prog: /nonexistent/qemu does not exist"),
    ({"qemu_build": "/nonexistent"}, "--qemu-build /nonexistent: not a directory"),
    ({"release": "9.9"}, "unknown QEMU release '9.9'"),
])
def test_select_errors_are_one_line(kwargs, message):
    with pytest.raises(ConfigError) as info:
        builds.select(env={}, **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_select_not_executable(tmp_path):
    path = tmp_path / "qemu"
    path.write_text("")
    with pytest.raises(ConfigError, match="is not executable"):
        builds.select(qemu_prog=str(path), env={})


def test_event_matches_partially_and_recursively():
    event = {"event": "BLOCK_JOB_ERROR", "data": {"device": "j", "operation": "write",
                                                  "nested": {"a": 1, "b": 2}}}
    assert event_matches(event, "BLOCK_JOB_ERROR", {"device": "j", "nested": {"a": 1}})
    assert event_matches(event, "BLOCK_JOB_ERROR", None)
    assert not event_matches(event, "BLOCK_JOB_ERROR", {"operation": "read"})
    assert not event_matches(event, "BLOCK_JOB_ERROR", {"missing": None})
    assert not event_matches(event, "STOP", None)


def test_reproducer_quoting_is_relocatable(tmp_path):
    folder = "/tmp/run x/t-1"
    arg = f'{{"filename":"{folder}/a b.raw"}}'
    quoted = _sh_quote_relocatable(arg, folder)
    out = subprocess.run(["sh", "-c", f'HERE=/elsewhere; printf %s {quoted}'],
                         capture_output=True, text=True).stdout
    assert out == '{"filename":"/elsewhere/a b.raw"}'


def test_qemu_io_result_errors():
    assert QemuIoResult("w", "write failed: Input/output error").error == "Input/output error"
    assert QemuIoResult("r", "read failed: Permission denied").error == "Permission denied"
    assert QemuIoResult("w", "wrote 512/512 bytes at offset 0").ok
    assert "Pattern verification failed" in QemuIoResult(
        "r", "Pattern verification failed at offset 0, 512 bytes").error


def test_describe_exit():
    assert describe_exit(-9) == "killed by signal 9 (SIGKILL)"
    assert describe_exit(1) == "exit status 1"


SCHEMA = [
    {"name": "blockdev-backup", "meta-type": "command", "arg-type": "1"},
    {"name": "1", "meta-type": "object", "members": [{"name": "on-cbw-error", "type": "2"}]},
    {"name": "2", "meta-type": "enum", "values": ["break-guest-write", "break-snapshot"]},
    {"name": "blockdev-add", "meta-type": "command", "arg-type": "3"},
    {"name": "3", "meta-type": "object", "tag": "driver",
     "members": [{"name": "driver", "type": "4"}, {"name": "node-name", "type": "str"}],
     "variants": [{"case": "copy-before-write", "type": "5"}, {"case": "blkdebug", "type": "6"}]},
    {"name": "4", "meta-type": "enum", "members": [{"name": "copy-before-write"},
                                                   {"name": "blkdebug"}]},
    {"name": "5", "meta-type": "object", "members": [{"name": "cbw-timeout", "type": "int"}]},
    {"name": "6", "meta-type": "object", "members": [{"name": "inject-error", "type": "[7]"}]},
    {"name": "[7]", "meta-type": "array", "element-type": "7"},
    {"name": "7", "meta-type": "object", "members": [{"name": "event", "type": "8"}]},
    {"name": "8", "meta-type": "enum", "values": ["read_aio", "write_aio"]},
]


def test_schema_queries():
    s = Schema(SCHEMA)
    assert s.command_args("blockdev-backup") == {"on-cbw-error"}
    assert s.command_arg_enum("blockdev-backup", "on-cbw-error") == ["break-guest-write",
                                                                     "break-snapshot"]
    assert s.block_drivers() == {"copy-before-write", "blkdebug"}
    assert s.driver_options("copy-before-write") == {"driver", "node-name", "cbw-timeout"}
    assert s.driver_options("nonexistent") == set()
    assert s.blkdebug_events() == ["read_aio", "write_aio"]
    assert s.command_args("nonexistent") == set()


def test_transcript_filters_paths_timings_and_timestamps(tmp_path):
    t = Transcript()
    t.add_filter(path_filter(tmp_path))
    t.log(f"open {tmp_path}/x.raw")
    t.event({"timestamp": {"seconds": 1}, "event": "STOP"})
    t.log("wrote 512/512 bytes at offset 0\n512 bytes, 1 ops; 00.00 sec (1 MiB/sec and 2 ops/sec)")
    assert t.text == 'open TEST_DIR/x.raw\n{"event": "STOP"}\nwrote 512/512 bytes at offset 0\n'
    assert filter_qemu_io("64 KiB, 1 ops; 0.01 sec (x)") == ""


def test_reference_compare_and_version_specific_file(tmp_path):
    ref = reference_path(tmp_path, "test_a[x-y]", (11, 1))
    assert ref.name == "test_a_x-y.out"
    with pytest.raises(AssertionError, match="--regen-reference"):
        compare("a\n", ref, regenerate=False)
    compare("a\n", ref, regenerate=True)
    compare("a\n", ref, regenerate=False)
    with pytest.raises(AssertionError, match=r"(?s)-a.*\+b"):
        compare("b\n", ref, regenerate=False)
    (tmp_path / "test_a_x-y.10.0.out").write_text("old\n")
    assert reference_path(tmp_path, "test_a[x-y]", (10, 0)).name == "test_a_x-y.10.0.out"


def test_not_a_debian_host_says_what_to_do(monkeypatch):
    from harness.errors import ProvisionError
    from harness.qemu import debian
    monkeypatch.setattr(debian.shutil, "which", lambda name: None)
    with pytest.raises(ProvisionError) as info:
        debian.host_mirror()
    assert "not a Debian-family host" in str(info.value)
    assert "--qemu-build" in str(info.value) and "\n" not in str(info.value)
