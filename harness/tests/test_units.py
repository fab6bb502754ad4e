"""Unit tests of the harness's pure helpers (no QEMU needed)."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from harness.errors import ConfigError, MissingCapability, describe_exit
from harness.plugin.reference import regenerate
from harness.plugin.session import check_artifacts_dir, make_run_dir
from harness.plugin.shared import shared
from harness.plugin.summary import render_grid
from harness.qemu import builds, probe
from harness.qemu.debian import mirror_in
from harness.qemu.machine import _sh_quote_relocatable, event_matches
from harness.qemu.probe import Schema
from harness.qemu.qemu_io import QemuIoResult, abridged, parse_dump
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
    ({"release": "eleven"}, "unknown QEMU release 'eleven'"),
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
    assert "Pattern verification failed" in str(QemuIoResult(
        "r", "Pattern verification failed at offset 0, 512 bytes").error)


def qemu_io_dump(data: bytes, offset: int) -> str:
    """``read -v offset len(data)`` as qemu-io prints it (C's isalnum: ASCII only)."""
    lines = [f"{offset + at:08x}:  " + "".join(f"{b:02x} " for b in data[at:at + 16]) + " " +
             "".join(chr(b) if b < 128 and chr(b).isalnum() else "." for b in data[at:at + 16])
             for at in range(0, len(data), 16)]
    return "\n".join([*lines, f"read {len(data)}/{len(data)} bytes at offset {offset}", ""])


@pytest.mark.parametrize("length", [16, 4096, 4096 + 7, 100])
def test_dump_read_back_exactly(length):
    data = bytes(range(256)) * 16 + b"tail of 7"
    data = data[:length]
    offset = (1 << 20) + 48
    assert parse_dump(qemu_io_dump(data, offset), offset, length) == data
    assert parse_dump(qemu_io_dump(data, offset), offset - 16, length) is None
    assert parse_dump(qemu_io_dump(data, offset), offset, length + 1) is None


def test_dump_with_a_wrong_line_is_none():
    data = bytes(range(256)) * 8
    good = qemu_io_dump(data, 0)
    lines = good.split("\n")
    wrong_address = [*lines[:50], lines[50].replace("00000320", "00000330", 1), *lines[51:]]
    wrong_digit = [*lines[:50], "00000320:  zz" + lines[50][13:], *lines[51:]]
    missing = lines[:50] + lines[51:]
    repeated = [*lines[:-2], lines[0], *lines[-2:]]
    for text in (wrong_address, wrong_digit, missing, repeated):
        assert parse_dump("\n".join(text), 0, len(data)) is None


def test_dump_past_4_gib_and_with_other_text():
    """Wider addresses and non-ASCII text are read line by line, as exactly."""
    data = bytes(range(64))
    offset = (1 << 32) - 32
    assert parse_dump(qemu_io_dump(data, offset), offset, 64) == data
    text = qemu_io_dump(data, 0).replace("....", "\u00e9...", 1)
    assert parse_dump(text, 0, 64) == data


def test_abridged_output_keeps_its_ends_and_failures():
    dump = qemu_io_dump(bytes(range(256)) * 64, 0)
    assert abridged("wrote 512/512 bytes at offset 0") == "wrote 512/512 bytes at offset 0"
    short = abridged(dump)
    assert len(short) < 4200 and short.startswith(dump[:2048]) and short.endswith(dump[-2048:])
    assert f"[... {len(dump) - 4096} characters left out ...]" in short
    middle = len(dump) // 2
    failed = dump[:middle] + "\nread failed: Input/output error\n" + dump[middle:]
    assert QemuIoResult("r", abridged(failed)).error == "Input/output error"
    assert QemuIoResult("r", abridged(dump)).ok


def test_describe_exit():
    assert describe_exit(-9) == "killed by signal 9 (SIGKILL)"
    assert describe_exit(1) == "exit status 1"


SCHEMA: list[dict[str, Any]] = [
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


def test_not_a_debian_host_says_what_to_do(monkeypatch, tmp_path):
    """The QEMU's error names --qemu-build / QEMU_PROG (the guest kernel's is in
    test_plugin_runs: it names --guest-kernel and -m 'not guest')."""
    from harness.errors import ProvisionError
    from harness.qemu import debian
    monkeypatch.setenv("CBW_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr("harness.qemu.debian.shutil.which", lambda name: None)
    with pytest.raises(ProvisionError) as info:
        debian.host_mirror()
    assert "not a Debian-family host" in str(info.value)
    assert "--qemu-build" not in str(info.value)  # the caller says what else to do
    with pytest.raises(ProvisionError) as info:
        builds.provision("11.1")
    message = str(info.value)
    assert "cannot provision QEMU 11.1: not a Debian-family host" in message
    assert "--qemu-build DIR or QEMU_PROG" in message and "\n" not in message


# ------------------------------------------------------------ choosing a build

def test_build_dir_with_tilde_is_expanded_for_every_binary(fake_build, monkeypatch):
    """--qemu-build=~/dir reaches pytest unexpanded: the folder check and the binary
    lookup both expand it."""
    monkeypatch.setenv("HOME", str(fake_build.parent))
    choice = builds.choose(qemu_build=f"~/{fake_build.name}", env={})
    assert not choice.needs_provisioning
    assert dict(choice.chosen) == {t: fake_build / t for t in builds.TOOLS}
    assert builds.choose(qemu_prog=f"~/{fake_build.name}/qemu-system-x86_64",
                         env={}).chosen["qemu-img"] == fake_build / "qemu-img"


def test_choosing_fetches_nothing(tmp_path, monkeypatch):
    """Choosing checks paths only: the release is fetched by realize()."""
    monkeypatch.setenv("CBW_CACHE_DIR", str(tmp_path / "cache"))
    choice = builds.choose(env={}, release="7.2")
    assert choice.needs_provisioning and choice.release == "7.2"
    assert "qemu-img: provisioned release 7.2" in choice.describe()
    assert not (tmp_path / "cache").exists()


def version_script(folder: Path, name: str, first_line: str) -> Path:
    path = folder / name
    path.write_text(f"#!/bin/sh\necho '{first_line}'\n")
    path.chmod(0o755)
    return path


def test_not_a_qemu_binary_is_named_so(tmp_path):
    with pytest.raises(ConfigError) as info:
        probe.tool_version("qemu-img", Path("/bin/true"), "--qemu-img-prog")
    message = str(info.value)
    assert message.startswith("/bin/true (--qemu-img-prog) is not a QEMU binary")
    assert "pass QEMU's qemu-img" in message and "\n" not in message
    img = version_script(tmp_path, "qemu-img", "qemu-img version 9.2.0 (v9.2.0)")
    assert probe.tool_version("qemu-img", img) == "qemu-img version 9.2.0 (v9.2.0)"
    with pytest.raises(ConfigError, match="is not a QEMU binary"):  # the wrong tool
        probe.tool_version("qemu-system-x86_64", img)


def build_info_with(versions: dict[str, str], origins: dict[str, str]) -> probe.BuildInfo:
    build = builds.QemuBuild(Path("/q/qemu-system-x86_64"), Path("/p/qemu-img"),
                             Path("/p/qemu-io"), origins)
    return probe.BuildInfo(build, "11.1.3", "", ["tcg"], Schema(SCHEMA), versions)


def test_mixed_versions_name_each_binary_origin_and_version():
    origins = {"qemu-system-x86_64": "QEMU_PROG", "qemu-img": "provisioned release 11.1",
               "qemu-io": "provisioned release 11.1"}
    same = build_info_with({"qemu-system-x86_64": "QEMU emulator version 11.1.3 (x)",
                            "qemu-img": "qemu-img version 11.1.3", "qemu-io":
                            "qemu-io version 11.1.3"}, origins)
    assert same.mixed_versions() is None
    mixed = build_info_with({"qemu-system-x86_64": "QEMU emulator version 10.2.50",
                             "qemu-img": "qemu-img version 11.1.3",
                             "qemu-io": "qemu-io version 11.1.3"}, origins)
    assert mixed.mixed_versions() == (
        "binaries of different QEMU versions: qemu-system-x86_64 10.2.50 (QEMU_PROG), "
        "qemu-img 11.1.3 (provisioned release 11.1), qemu-io 11.1.3 (provisioned release 11.1)")


# ------------------------------------------------------------ capabilities

NBD_SCHEMA: list[dict[str, Any]] = [
    {"name": "nbd-server-start", "meta-type": "command", "arg-type": "n1"},
    {"name": "n1", "meta-type": "object", "members": [{"name": "addr", "type": "n2"}]},
    {"name": "n2", "meta-type": "object", "tag": "type", "members": [{"name": "type",
                                                                      "type": "str"}],
     "variants": [{"case": "unix", "type": "n3"}]},
    {"name": "n3", "meta-type": "object", "members": [{"name": "data", "type": "n4"}]},
    {"name": "n4", "meta-type": "object", "members": [{"name": "path", "type": "str"},
                                                      {"name": "abstract", "type": "bool"}]},
    {"name": "block-export-add", "meta-type": "command", "arg-type": "n1"},
    {"name": "BLOCK_IO_ERROR", "meta-type": "event", "arg-type": "e1"},
    {"name": "e1", "meta-type": "object", "members": [{"name": "qom-path", "type": "str"}]},
]


def test_capabilities_of_nbd_and_block_io_error_come_from_the_schema():
    def info(entries: list[dict[str, Any]]) -> probe.BuildInfo:
        return probe.BuildInfo(builds.QemuBuild(Path("q"), Path("i"), Path("o")), "11.1.3", "",
                               ["tcg"], Schema(entries))
    # The client side (the nbd driver's server.abstract) is missing from this schema.
    server_only = info(SCHEMA + NBD_SCHEMA)
    assert not server_only.has("nbd.abstract-unix-socket")
    assert server_only.has("event.BLOCK_IO_ERROR.qom-path")
    with pytest.raises(MissingCapability) as missing:
        server_only.require("nbd.abstract-unix-socket")
    assert str(missing.value).startswith(
        "build lacks capability 'nbd.abstract-unix-socket': an NBD server")
    assert str(missing.value).endswith("(QEMU 11.1.3)")
    client: list[dict[str, Any]] = [
        {"name": "3", "meta-type": "object", "tag": "driver",
         "members": [{"name": "driver", "type": "4"}],
         "variants": [{"case": "nbd", "type": "c1"}]},
        {"name": "4", "meta-type": "enum", "values": ["nbd"]},
        {"name": "c1", "meta-type": "object", "members": [{"name": "server", "type": "n2"}]}]
    both = info([e for e in SCHEMA if e["name"] not in ("3", "4")] + NBD_SCHEMA + client)
    assert both.has("nbd.abstract-unix-socket")
    assert not info(SCHEMA).has("event.BLOCK_IO_ERROR.qom-path")


# ------------------------------------------------------------ reference transcripts

def test_regen_reference_on_another_build_never_touches_the_shared_file(tmp_path):
    shared = tmp_path / "test_a_x.out"
    assert regenerate("default\n", tmp_path, "test_a[x]", (11, 1, 3)) == shared
    # Another release: a file of its own where the text differs, the shared one untouched.
    assert regenerate("old\n", tmp_path, "test_a[x]", (7, 2, 22)) == tmp_path / "test_a_x.7.2.out"
    assert shared.read_text() == "default\n"
    assert (tmp_path / "test_a_x.7.2.out").read_text() == "old\n"
    # Where it says the same as the shared file, no file of its own (a stale one goes).
    assert regenerate("default\n", tmp_path, "test_a[x]", (7, 2, 22)) is None
    assert not (tmp_path / "test_a_x.7.2.out").exists()
    assert regenerate("dev\n", tmp_path, "test_b", (11, 2, 50)) == tmp_path / "test_b.11.2.out"
    assert not (tmp_path / "test_b.out").exists()


# ------------------------------------------------------------ the run's folders

def test_unusable_tmpdir_is_one_line(tmp_path, monkeypatch):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    monkeypatch.setenv("TMPDIR", str(not_a_dir))
    with pytest.raises(ConfigError) as info:
        make_run_dir()
    assert str(info.value).startswith(f"TMPDIR {not_a_dir}: cannot create the run's folder")
    assert "set TMPDIR to a writable folder" in str(info.value)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("harness.plugin.session.shutil.disk_usage",
                        lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(ConfigError, match=r"only 1 MB free, a run needs about 67 MB"):
        make_run_dir()
    assert not list(tmp_path.glob("cbw-run-*")), "the refused run left its folder"


def test_unwritable_artifacts_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError) as info:
        check_artifacts_dir(blocker / "artifacts")
    assert str(info.value).startswith(f"--artifacts {blocker / 'artifacts'}: cannot write there")
    assert "\n" not in str(info.value)
    assert check_artifacts_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"


# ------------------------------------------------------------ provisioning

def fake_command(folder: Path, name: str, script: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(f"#!/bin/sh\n{script}\n")
    (folder / name).chmod(0o755)


def test_hung_apt_and_unpack_are_bounded_and_named(tmp_path, monkeypatch):
    from harness.errors import ProvisionError
    from harness.qemu import debian
    fake_command(tmp_path / "bin", "apt-get", "exec sleep 60")
    fake_command(tmp_path / "bin", "dpkg-deb", "exec sleep 60")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    apt = debian.PrivateApt(tmp_path / "apt", ["trixie"], mirror=MIRROR)
    (tmp_path / "apt" / "archives").mkdir(parents=True)
    start = time.monotonic()
    with pytest.raises(ProvisionError) as info:
        apt._run(["update"], "update the package lists of trixie", timeout=0.5)
    assert time.monotonic() - start < 5
    assert str(info.value).startswith("apt-get update hung: no result within 0 s while "
                                      "trying to update the package lists of trixie")
    with pytest.raises(ProvisionError, match=r"unpacking x.deb \(dpkg-deb \| tar\) hung"):
        debian._unpack_one(tmp_path / "x.deb", tmp_path / "prefix", (), timeout=0.5)
    assert time.monotonic() - start < 10


def fake_release(cache: Path, name: str) -> Path:
    """A provisioned release of an older layout: a prefix and wrappers without names."""
    top = cache / "qemu" / name
    libdir = top / "prefix/usr/lib/x86_64-linux-gnu"
    libdir.mkdir(parents=True)
    (libdir / "ld-linux-x86-64.so.2").write_text("")
    (top / "prefix/usr/bin").mkdir(parents=True)
    (top / "bin").mkdir()
    for tool in builds.TOOLS:
        (top / "prefix/usr/bin" / tool).write_text("")
        (top / "bin" / tool).write_text("#!/bin/sh\nexec old-wrapper\n")
    (top / "complete.json").write_text(json.dumps({"release": name, "version": "11.1.3"}))
    return top


def test_cached_release_of_an_older_layout_gets_named_wrappers(tmp_path, monkeypatch):
    """Wrappers exec the loader through a symlink named after the tool, so the kernel
    names the process after QEMU (pgrep/pidof work); old caches are brought up to date
    without a download."""
    monkeypatch.setenv("CBW_CACHE_DIR", str(tmp_path))
    top = fake_release(tmp_path, "11.1")
    assert builds.provision("11.1") == top / "bin"
    assert json.loads((top / "complete.json").read_text())["layout"] == builds.LAYOUT
    for tool in builds.TOOLS:
        named = top / "bin/.names" / tool
        assert named.is_symlink()
        assert named.resolve() == (top / "prefix/usr/lib/x86_64-linux-gnu/"
                                   "ld-linux-x86-64.so.2").resolve()
        script = (top / "bin" / tool).read_text()
        assert f'exec "$B/.names/{tool}" ' in script and f"--argv0 {tool} " in script


# ------------------------------------------------------------ the summary grid

def row(scenario: str, value: str, guest: str, job: str, data: str, outcome: str = "passed",
        test: str = "t.py::test_x", **extra: str) -> dict[str, str]:
    return {"scenario": scenario, "on_cbw_error": value, "guest_write": guest, "job": job,
            "data": data, "outcome": outcome, "test": test, **extra}


def test_summary_grid_reads_at_a_glance():
    info = build_info_with({}, {})
    livelock = "t.py::test_ignored_read_error_on_broken_snapshot"
    rows = [
        row("sync-full / target-write-once-EIO", value, "1/2 failed: Input/output error",
            "completed", "target has old data at 2/2; backup point-in-time")
        for value in ("omitted", "break-guest-write")
    ] + [
        row("sync-full / target-write-once-EIO", "break-snapshot", "all ok", "completed",
            "backup NOT point-in-time", outcome="xfailed"),
        row("fleecing / no-fault", "omitted", "all ok", "-", "snapshot reads ok"),
        row("fleecing / no-fault", "break-guest-write", "all ok", "-",
            "snapshot reads fail: Permission denied"),
        row("push / target-write-once-EIO / job policy ignore", "break-snapshot", "all ok",
            "QEMU stopped answering QMP", "", outcome="xfailed", test=f"{livelock}[full-speed]"),
        row("push / target-write-once-EIO / job policy ignore", "break-snapshot", "all ok",
            "cancelled; BLOCK_JOB_ERROR read/ignore", "", test=f"{livelock}[speed-limit]"),
        row("guest virtio-blk werror=report / fleecing / x", "omitted", "all ok", "-", "",
            family="guest delivery"),
    ]
    lines = render_grid(rows, info).splitlines()
    grid = "\n".join(re.sub(r" +", " ", line) for line in lines)  # without the padding
    assert lines[0].startswith("copy-before-write error handling, QEMU 11.1.3")
    assert "on-cbw-error omitted behaves as break-guest-write in: sync-full" in grid
    assert "on-cbw-error omitted differs from break-guest-write in: fleecing" in grid
    assert "sync-full | omitted = break-guest-write | break-snapshot" in grid
    assert ("target-write-once-EIO | guest EIO 1/2; job ok; backup ok | "
            "departure: guest ok; job ok; backup wrong") in grid
    assert "no-fault | guest ok; snapshot ok | guest ok; snapshot EACCES" in grid
    # The livelock's two speeds differ: two labelled lines, not one cell overwritten.
    assert "target-write-once-EIO / job policy ignore [full-speed]" in grid
    assert "target-write-once-EIO / job policy ignore [speed-limit]" in grid
    assert "departure: guest ok; QEMU hung" in grid and "guest ok; job cancelled" in grid
    assert "guest delivery" in grid  # the producer's family wins over the scenario's text
    assert max(len(line) for line in lines) < 120


def test_provision_command_without_apt_names_the_ways_out(tmp_path, monkeypatch, capsys):
    from harness import provision
    monkeypatch.setenv("CBW_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr("harness.qemu.debian.shutil.which", lambda name: None)
    assert provision.main(["--no-qemu", "--kernel"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: guest kernel: ") and "\n" not in err
    assert "--guest-kernel bzImage" in err and '-m "not guest"' in err
    assert provision.main(["7.2"]) == 1
    assert "--qemu-build DIR or QEMU_PROG" in capsys.readouterr().err


def test_shared_run_runs_once_for_every_asker_and_links_its_files(tmp_path):
    """The second asker waits for the first (the lock), gets its outcome, and has the
    run's files in its own folder; a run that raised is run again by the next asker."""
    base, runs = tmp_path / "shared", []
    started, release = threading.Event(), threading.Event()

    def make(folder: Path) -> dict[str, int]:
        runs.append(folder)
        (folder / "vm.qmp.log").write_text("conversation")
        started.set()
        assert release.wait(30)
        return {"answer": 42}

    folders = [tmp_path / "a", tmp_path / "b"]
    for f in folders:
        f.mkdir()
    outcomes: list[Any] = []
    first = threading.Thread(target=lambda: outcomes.append(shared(base, "k", folders[0], make)))
    first.start()
    assert started.wait(30)
    second = threading.Thread(target=lambda: outcomes.append(shared(base, "k", folders[1], make)))
    second.start()
    second.join(0.5)
    assert second.is_alive(), "the second asker must wait for the run under way"
    release.set()
    first.join(30)
    second.join(30)
    assert outcomes == [{"answer": 42}, {"answer": 42}] and len(runs) == 1
    for f in folders:
        assert (f / "vm.qmp.log").read_text() == "conversation"

    failures: list[Path] = []

    def failing(folder: Path) -> None:
        failures.append(folder)
        (folder / "vm.stderr").write_text("boom")
        raise RuntimeError("boot failed")
    for name in ("c", "d"):
        (tmp_path / name).mkdir()
        with pytest.raises(RuntimeError, match="boot failed"):
            shared(base, "broken", tmp_path / name, failing)
        assert (tmp_path / name / "vm.stderr").read_text() == "boom"
    assert len(failures) == 2, "a run that raised is not shared: the next asker runs it again"


def test_shared_run_links_a_tests_own_part_only(tmp_path):
    """A run of several parts (one QEMU each, in a subfolder): each asker gets the files
    of its part, not the others'; a part that made no files links nothing."""
    def make(folder: Path) -> str:
        for part in ("one", "two"):
            (folder / part).mkdir()
            (folder / part / f"{part}.qmp.log").write_text(part)
        return "done"

    folders = {name: tmp_path / name for name in ("one", "two", "none")}
    for name, folder in folders.items():
        folder.mkdir()
        assert shared(tmp_path / "shared", "parts", folder, make, part=name) == "done"
    assert [p.name for p in folders["one"].iterdir()] == ["one.qmp.log"]
    assert [p.name for p in folders["two"].iterdir()] == ["two.qmp.log"]
    assert list(folders["none"].iterdir()) == []


def test_microvm_is_a_capability_of_the_probed_machine_types():
    info = build_info_with({}, {})
    assert not info.has("machine.microvm")  # a build without it: scenarios stay on pc
    info.machines = ["microvm", "pc", "pc-i440fx-11.1"]
    assert info.has("machine.microvm")
    assert probe.BuildInfo.from_json(info.build, info.to_json()).machines == info.machines
