"""Unit tests for harness.blkdebug: model, QMP shape, config-file round trip, errors.

The optional last test feeds every file in configs/ to a real qemu-io; it runs only
when QEMU_IO names a qemu-io binary (or wrapper script).
"""

from __future__ import annotations

import doctest
import errno
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from harness.block import blkdebug
from harness.block.blkdebug import (
    BlkdebugRules,
    InjectError,
    SetState,
    blkdebug_node,
    fail_always,
    fail_once,
    load,
    parse,
    render,
    validate,
)
from harness.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CONFIG_FILES = sorted(CONFIGS.glob("*.conf"))

# BlkdebugEvent values of QEMU 7.2 and 11.1 (identical), from query-qmp-schema.
EVENTS = frozenset([
    "l1_update", "l1_grow_alloc_table", "l1_grow_write_table", "l1_grow_activate_table",
    "l2_load", "l2_update", "l2_update_compressed", "l2_alloc_cow_read", "l2_alloc_write",
    "read_aio", "read_backing_aio", "read_compressed", "write_aio", "write_compressed",
    "vmstate_load", "vmstate_save", "cow_read", "cow_write", "reftable_load", "reftable_grow",
    "reftable_update", "refblock_load", "refblock_update", "refblock_update_part",
    "refblock_alloc", "refblock_alloc_hookup", "refblock_alloc_write",
    "refblock_alloc_write_blocks", "refblock_alloc_write_table", "refblock_alloc_switch_table",
    "cluster_alloc", "cluster_alloc_bytes", "cluster_free", "flush_to_os", "flush_to_disk",
    "pwritev_rmw_head", "pwritev_rmw_after_head", "pwritev_rmw_tail", "pwritev_rmw_after_tail",
    "pwritev", "pwritev_zero", "pwritev_done", "empty_image_prepare", "l1_shrink_write_table",
    "l1_shrink_free_l2_clusters", "cor_write", "cluster_alloc_space", "none",
])
MEMBERS_7_2 = frozenset({"event", "state", "iotype", "errno", "sector", "once", "immediately"})


def one_line_error(exc: pytest.ExceptionInfo[ConfigError]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


# --- configs/ -------------------------------------------------------------------

def test_configs_exist_and_are_listed_in_readme() -> None:
    assert len(CONFIG_FILES) >= 6
    readme = (CONFIGS / "README.md").read_text()
    for path in CONFIG_FILES:
        assert f"`{path.name}`" in readme, f"{path.name} missing from configs/README.md"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_config_round_trip(path: Path, tmp_path: Path) -> None:
    rules = load(path, valid_events=EVENTS)
    assert rules.inject_error or rules.set_state
    text = render(rules, header="round trip")
    assert parse(text, "rendered", EVENTS) == rules
    copy = tmp_path / path.name
    copy.write_text(text)
    assert load(copy) == rules
    validate(rules, EVENTS, valid_iotypes=blkdebug.IOTYPES, inject_error_members=MEMBERS_7_2)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_config_says_what_its_name_says(path: Path) -> None:
    rules = load(path)
    (rule,) = rules.inject_error
    assert rules.set_state == []
    name = path.stem
    assert rule.event == ("write_aio" if "target-write" in name else "read_aio")
    assert rule.iotype == ("write" if "target-write" in name else "read")
    assert rule.errno == (errno.ENOSPC if "enospc" in name else errno.EIO)
    assert rule.once is name.endswith("-once")
    head = path.read_text().split("\n", 1)[0]
    assert head.startswith("# "), "each config starts with a comment saying what it does"


# --- model and QMP shape --------------------------------------------------------

def test_inject_error_qmp_leaves_out_unset_members() -> None:
    assert InjectError("write_aio").to_qmp() == {"event": "write_aio", "errno": 5}


def test_inject_error_qmp_all_members() -> None:
    rule = InjectError("read_aio", state=2, iotype="read", errno=28, delay_ns=1000,
                       sector=16, once=True, immediately=True)
    assert rule.to_qmp() == {"event": "read_aio", "state": 2, "iotype": "read", "errno": 28,
                             "delay-ns": 1000, "sector": 16, "once": True,
                             "immediately": True}


def test_set_state_qmp() -> None:
    assert SetState("pwritev", new_state=3).to_qmp() == {"event": "pwritev", "new_state": 3}
    assert SetState("pwritev", state=1, new_state=2).to_qmp() == {
        "event": "pwritev", "state": 1, "new_state": 2}


def test_rules_qmp_leaves_out_empty_lists() -> None:
    assert BlkdebugRules().to_qmp() == {}
    rules = BlkdebugRules([InjectError("write_aio")], [SetState("write_aio", new_state=2)])
    assert rules.to_qmp() == {"inject-error": [{"event": "write_aio", "errno": 5}],
                              "set-state": [{"event": "write_aio", "new_state": 2}]}


def test_fail_helpers() -> None:
    assert fail_once("write_aio", errno=errno.ENOSPC, iotype="write") == BlkdebugRules(
        [InjectError("write_aio", iotype="write", errno=28, once=True)])
    assert fail_always("read_aio") == BlkdebugRules([InjectError("read_aio")])
    assert BlkdebugRules.fail("pwritev", once=True, sector=8).inject_error == [
        InjectError("pwritev", sector=8, once=True)]


def test_fail_skip_builds_a_state_chain() -> None:
    rules = fail_once("read_aio", iotype="read", skip=2)
    assert rules.set_state == [SetState("read_aio", state=1, new_state=2),
                               SetState("read_aio", state=2, new_state=3)]
    assert rules.inject_error == [InjectError("read_aio", state=3, iotype="read", once=True)]
    assert rules.events() == {"read_aio"}


def test_blkdebug_node_inline() -> None:
    image = {"driver": "file", "filename": "/tmp/t.qcow2"}
    node = blkdebug_node("tgt-dbg", image, fail_once("write_aio"))
    assert node == {"driver": "blkdebug", "node-name": "tgt-dbg", "image": image,
                    "inject-error": [{"event": "write_aio", "errno": 5, "once": True}]}
    assert node["image"] is not image  # a copy: later edits of the caller's dict stay out


def test_blkdebug_node_config_path_is_absolute(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "r.conf").write_text(render(fail_once("write_aio")))
    monkeypatch.chdir(tmp_path)
    node = blkdebug_node("dbg", "img-file", None, Path("r.conf"))
    assert node == {"driver": "blkdebug", "node-name": "dbg", "image": "img-file",
                    "config": str(tmp_path / "r.conf")}
    both = blkdebug_node("dbg", "img-file", fail_always("read_aio"), tmp_path / "r.conf")
    assert both["config"] == str(tmp_path / "r.conf") and "inject-error" in both


def test_blkdebug_node_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        blkdebug_node("dbg", "img", config_path=tmp_path / "missing.conf")
    assert "missing.conf" in one_line_error(e)
    with pytest.raises(ConfigError) as e:
        blkdebug_node("", "img")
    assert "node-name" in one_line_error(e)


def test_render_format() -> None:
    rules = BlkdebugRules([InjectError("write_aio", iotype="write", once=True)],
                          [SetState("write_aio", state=1, new_state=2)])
    assert render(rules, header="what\n\nwhy") == (
        '# what\n#\n# why\n\n'
        '[inject-error]\nevent = "write_aio"\niotype = "write"\nerrno = "5"\nonce = "on"\n\n'
        '[set-state]\nevent = "write_aio"\nstate = "1"\nnew_state = "2"\n')


def test_round_trip_of_every_member() -> None:
    rules = BlkdebugRules(
        [InjectError("read_aio", state=2, iotype="block-status", errno=0, delay_ns=10**9,
                     sector=0, once=True, immediately=True),
         InjectError("write_aio")],
        [SetState("read_aio", state=1, new_state=2), SetState("pwritev", new_state=7)])
    assert parse(render(rules)) == rules


def test_parse_accepts_what_qemu_accepts() -> None:
    text = ('# comment\n\n[inject-error]\n  event\t=  "write_aio"  \nonce = "off"\n'
            '[set-state]\nevent = "write_aio"\nnew_state = "2"')  # no final newline
    assert parse(text) == BlkdebugRules([InjectError("write_aio")],
                                        [SetState("write_aio", new_state=2)])


def test_doctests() -> None:
    result = doctest.testmod(blkdebug)
    assert result.attempted > 0 and result.failed == 0


# --- error paths ------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    # syntax, with QEMU's own parser quirks
    ('[inject-error]\nevent="write_aio"\n', ["x.conf:2", "space before '='"]),
    ('[inject-error]\nevent = write_aio\n', ["x.conf:2", "double quotes"]),
    ('[inject-error]\nevent = "write_aio" # why\n', ["x.conf:2", "nothing after"]),
    ('[inject-error]\n   \nevent = "write_aio"\n', ["x.conf:2", "blank line"]),
    ('[inject-error]\n  # note\nevent = "write_aio"\n', ["x.conf:2", "first column"]),
    ('[inject-error\nevent = "write_aio"\n', ["x.conf:1", "section header"]),
    ('[inject-error]\r\nevent = "write_aio"\r\n', ["x.conf:1", "LF"]),
    ('[inject-error]\nevent = "' + "a" * 1100 + '"\n', ["x.conf:2", "longer than"]),
    ('event = "write_aio"\n', ["x.conf:1", "before any section"]),
    ('# nothing\n', ["x.conf", "no rules"]),
    # sections and keys
    ('[inject-errors]\n', ["x.conf:1", "[inject-errors]", "[inject-error], [set-state]"]),
    ('[inject-error "a"]\n', ["x.conf:1", "section ids"]),
    ('[inject-error]\nevent = "write_aio"\nerrorno = "5"\n',
     ["x.conf:3", "'errorno'", "valid keys: event, state, iotype, errno, delay-ns, sector, "
      "once, immediately"]),
    ('[set-state]\nevent = "write_aio"\nonce = "on"\n',
     ["x.conf:3", "'once'", "valid keys: event, state, new_state"]),
    ('[inject-error]\nevent = "write_aio"\nerrno = "5"\nerrno = "28"\n',
     ["x.conf:4", "duplicate key 'errno'", "line 3"]),
    ('[inject-error]\nerrno = "5"\n', ["x.conf:1", "no event"]),
    ('[set-state]\nevent = "write_aio"\n', ["x.conf:1", "no new_state"]),
    # values
    ('[inject-error]\nevent = "write_aio"\nerrno = "EIO"\n', ["x.conf:3", "errno", "\"EIO\""]),
    ('[inject-error]\nevent = "write_aio"\nerrno = "034"\n', ["x.conf:3", "octal"]),
    ('[inject-error]\nevent = "write_aio"\nsector = "-1"\n', ["x.conf:3", "sector"]),
    ('[inject-error]\nevent = "write_aio"\nonce = "yes"\n', ["x.conf:3", "once", "\"on\""]),
    ('[inject-error]\nevent = "write_aio"\nimmediately = "1"\n', ["x.conf:3", "immediately"]),
    ('[inject-error]\nevent = "write_aio"\nerrno = "0"\n', ["x.conf:3", "errno", "delay-ns"]),
    ('[inject-error]\nevent = "write_aio"\nstate = "0"\n', ["x.conf:3", "state", "start at 1"]),
    ('[inject-error]\nevent = "write_aio"\niotype = "writes"\n',
     ["x.conf:3", "'writes'", "read, write, write-zeroes, discard, flush, block-status"]),
    ('[inject-error]\nevent = "write aio"\n', ["x.conf:2", "'write aio'"]),
    ('[set-state]\nevent = "write_aio"\nnew_state = "0"\n', ["x.conf:3", "new_state"]),
])
def test_parse_errors(text: str, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        parse(text, "x.conf")
    msg = one_line_error(e)
    for part in expected:
        assert part in msg, msg


def test_parse_unknown_event_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as e:
        parse('[inject-error]\nevent = "write_aoi"\n', "x.conf", valid_events=EVENTS)
    msg = one_line_error(e)
    assert "x.conf:2" in msg and "'write_aoi'" in msg and "did you mean 'write_aio'" in msg
    assert ", ".join(sorted(EVENTS)) in msg


def test_load_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load(tmp_path / "nope.conf")
    msg = one_line_error(e)
    assert str(tmp_path / "nope.conf") in msg and "No such file or directory" in msg
    with pytest.raises(ConfigError) as e:
        load(tmp_path)
    assert "Is a directory" in one_line_error(e)


def test_load_not_text(tmp_path: Path) -> None:
    path = tmp_path / "bin.conf"
    path.write_bytes(b"\xff\xfe[inject-error]\n")
    with pytest.raises(ConfigError) as e:
        load(path)
    assert str(path) in one_line_error(e) and "UTF-8" in str(e.value)


def test_load_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.conf"
    path.write_text('# x\n\n[inject-error]\nevent = "write_aio"\nonce = "true"\n')
    with pytest.raises(ConfigError) as e:
        load(path)
    assert one_line_error(e).startswith(f"{path}:5: once")


def test_validate_unknown_event_lists_valid_names() -> None:
    rules = BlkdebugRules([InjectError("write_aio")], [SetState("raed_aio", new_state=2)])
    with pytest.raises(ConfigError) as e:
        validate(rules, ["write_aio", "read_aio", "pwritev"])
    msg = one_line_error(e)
    assert "set-state rule 1" in msg and "'raed_aio'" in msg and "'read_aio'?" in msg
    assert msg.endswith("this build's events: pwritev, read_aio, write_aio")


def test_validate_build_limits() -> None:
    validate(fail_once("write_aio"), EVENTS)
    with pytest.raises(ConfigError) as e:
        validate(BlkdebugRules([InjectError("write_aio", errno=0, delay_ns=5)]), EVENTS,
                 inject_error_members=MEMBERS_7_2)
    assert "'delay-ns'" in one_line_error(e)
    with pytest.raises(ConfigError) as e:
        validate(fail_once("write_aio", iotype="block-status"), EVENTS,
                 valid_iotypes=["read", "write"])
    assert "'block-status'" in one_line_error(e) and "read, write" in str(e.value)
    with pytest.raises(ConfigError) as e:
        validate(fail_once("write_aio"), [])
    assert "BlkdebugEvent" in one_line_error(e)


@pytest.mark.parametrize("make, expected", [
    (lambda: InjectError("write_aio", errno=-5), "errno"),
    (lambda: InjectError("write_aio", errno=True), "errno"),  # bool is not an errno
    (lambda: InjectError("write_aio", iotype="writes"), "iotype"),
    (lambda: InjectError("write_aio", once="on"), "once"),  # type: ignore[arg-type]
    (lambda: InjectError("", once=True), "event"),
    (lambda: SetState("write_aio", new_state=2, state=0), "state"),
    (lambda: fail_once("write_aio", skip=-1), "skip"),
    (lambda: render(BlkdebugRules()), "without rules"),
])
def test_model_errors(make: Callable[[], object], expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        make()
    assert expected in one_line_error(e)


# --- against the build under test ---------------------------------------------------

@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_qemu_accepts_config(path: Path, tmp_path: Path, qemu_build: Any) -> None:
    image = tmp_path / "img.raw"
    image.write_bytes(b"\xaa" * 65536)
    spec = (f'json:{{"driver": "raw", "file": {{"driver": "blkdebug", "config": "{path}", '
            f'"image": {{"driver": "file", "filename": "{image}"}}}}}}')
    op = "write 0 4k" if "write" in path.name else "read 0 4k"
    out = subprocess.run([str(qemu_build.qemu_io), "-c", op, "-c", op, spec],
                         capture_output=True, text=True, timeout=60)
    failures = out.stdout.count("failed:") + out.stderr.count("failed:")
    assert "can't open" not in out.stderr, out.stderr
    assert failures == (1 if path.stem.endswith("once") else 2), out.stdout + out.stderr
