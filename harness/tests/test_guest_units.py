"""Unit tests of the guest building blocks that need neither network nor QEMU."""

from __future__ import annotations

import fcntl
import gzip
import lzma
import shutil
import stat
import struct
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from harness.block.topology import guest_device
from harness.errors import ConfigError, HarnessError, LockTimeout
from harness.guest import console, initramfs, kernel
from harness.guest.console import (
    GuestError,
    Read,
    Write,
    format_ops,
    guest_cmdline,
    parse_console,
    parse_ops,
    pattern_md5,
    qemu_guest_args,
)
from harness.guest.initramfs import NewcWriter, build_initramfs, modinfo, module_depends, read_newc
from harness.guest.kernel import GuestKernel
from harness.qemu import debian

# ----------------------------------------------------------------- synthetic files


def make_elf(sections: dict[str, bytes], notes: Sequence[tuple[bytes, int, bytes]] = (),
             elf32: bool = False) -> bytes:
    """A minimal little-endian ELF with the given sections and one PT_NOTE of ``notes``."""
    names = b"\0" + b"".join(n.encode() + b"\0" for n in [*sections, ".shstrtab"])
    ehsize = 52 if elf32 else 64
    body = bytearray()
    placed = []
    for data in [*sections.values(), names]:
        placed.append((ehsize + len(body), len(data)))
        body += data + b"\0" * (-len(data) % 8)
    note = b"".join(struct.pack("<III", len(n) + 1, len(d), t) + n + b"\0" * (4 - len(n) % 4)
                    + d + b"\0" * (-len(d) % 4) for n, t, d in notes)
    note_off = ehsize + len(body)
    body += note
    shoff = ehsize + len(body)
    name_offs = []
    pos = 1
    for n in [*sections, ".shstrtab"]:
        name_offs.append(pos)
        pos += len(n) + 1
    if elf32:
        shdrs = struct.pack("<IIIIIIIIII", *[0] * 10)
        for (off, size), name_off in zip(placed, name_offs):
            shdrs += struct.pack("<IIIIIIIIII", name_off, 1, 0, 0, off, size, 0, 0, 1, 0)
        phoff = 0
        header = struct.pack("<16sHHIIIIIHHHHHH", b"\x7fELF\x01\x01\x01" + b"\0" * 9, 1, 3, 1, 0,
                             phoff, shoff, 0, ehsize, 32, 0, 40, len(placed) + 1, len(placed))
        return header + bytes(body) + shdrs
    shdrs = struct.pack("<IIQQQQIIQQ", *[0] * 10)
    for (off, size), name_off in zip(placed, name_offs):
        shdrs += struct.pack("<IIQQQQIIQQ", name_off, 1, 0, 0, off, size, 0, 0, 1, 0)
    phoff = shoff + len(shdrs)
    phdrs = (struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(note), len(note), 4)
             if notes else b"")
    header = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01" + b"\0" * 9, 1, 62, 1, 0,
                         phoff if notes else 0, shoff, 0, ehsize, 56, 1 if notes else 0, 64,
                         len(placed) + 1, len(placed))
    return header + bytes(body) + shdrs + phdrs


def make_ko(name: str, depends: str) -> bytes:
    info = f"license=GPL\0depends={depends}\0name={name}\0vermagic=6.0-test SMP\0".encode()
    return make_elf({".text": b"\x90" * 16, ".modinfo": info})


def make_bzimage(version: str, payload: bytes = b"") -> bytes:
    """A file with an x86 boot-protocol setup header (enough for our parsers)."""
    setup_sects = 3
    image = bytearray((setup_sects + 1) * 512)
    image[0x1F1] = setup_sects
    image[0x202:0x206] = b"HdrS"
    image[0x206:0x208] = (0x20F).to_bytes(2, "little")
    ver = f"{version} (builder@test) #1 SMP".encode() + b"\0"
    image[0x300:0x300 + len(ver)] = ver
    image[0x20E:0x210] = (0x300 - 0x200).to_bytes(2, "little")
    image[0x248:0x250] = struct.pack("<II", 0, len(payload))
    return bytes(image) + payload


def fake_kernel(tmp: Path, modules: dict[str, str], version: str = "6.0-test",
                builtin: tuple[str, ...] = ()) -> GuestKernel:
    """A kernel tree with .ko.xz modules {name: depends} (one name with a dash in its file)."""
    mdir = tmp / "lib/modules" / version
    for i, (name, deps) in enumerate(modules.items()):
        sub = mdir / "kernel/drivers" / f"d{i}"
        sub.mkdir(parents=True)
        (sub / f"{name.replace('_', '-')}.ko.xz").write_bytes(lzma.compress(make_ko(name, deps)))
    (mdir / "kernel").mkdir(parents=True, exist_ok=True)
    (mdir / "modules.builtin").write_text("".join(f"kernel/x/{b}.ko\n" for b in builtin))
    vmlinuz = tmp / "vmlinuz"
    vmlinuz.write_bytes(make_bzimage(version))
    return GuestKernel(vmlinuz, version, mdir)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CBW_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ---------------------------------------------------------------------- console log

GOOD_LOG = (
    '[    0.000000] Linux version 6.12 early noise that is ignored\r\n'
    'CBW-KMSG i=-1 lvl=3 t=1.729139 I/O error, dev vda, sector 0 op 0x0:(READ) flags 0x0 '
    'phys_seg 1 prio class 2\r\n'
    'CBW-READY t=1.83\r\n'
    'CBW-RESULT i=0 op=write dev=/dev/vda off=1048576 len=65536 rc=1 t0=1.87 t1=1.92 pat=55 '
    'err="Input/output error" msg="dd: error writing \'/dev/vda\': Input/output error"\r\n'
    'CBW-RESULT i=1 op=read dev=/dev/vda off=0 len=4096 rc=0 t0=2.96 t1=2.98 got=4096 '
    'md5=df679e5ec8fb672842974a36d303d0ff head=11111111111111111111111111111111 '
    'err="" msg=""\r\n'
    'CBW-RESULT i=2 op=read dev=/dev/vda off=8192 len=512 rc=1 t0=3.0 t1=3.01 got=0 '
    'md5=d41d8cd98f00b204e9800998ecf8427e head= err="Input/output error" msg="dd: '
    '/dev/vda: Input/output error"\r\n'
    'CBW-RESULT i=3 op=fsyncwrite dev=/dev/vda off=3 len=1000 rc=0 t0=3.1 t1=3.2 pat=77 '
    'err="" msg=""\r\n'
    # The operations' kernel messages come after the plan (init.sh, kmsg.awk).
    'CBW-KMSG i=0 lvl=3 t=1.928438 I/O error, dev vda, sector 2048 op 0x1:(WRITE) flags '
    '0x8800 phys_seg 16 prio class 2\r\n'
    'CBW-KMSG i=1 lvl=6 t=2.5 clocksource: Switched to clocksource tsc\r\n'
    'CBW-DONE ops=4 t=3.3\r\n'
    '[    3.400000] reboot: Restarting system\r\n'
    'qemu-system-x86_64: Failed flush during close: Input/output error\n'
)


def test_read_is_uniform_only_when_its_md5_says_so() -> None:
    """The guest reports head and md5; the host tells a uniform read from both."""
    line = ("CBW-READY t=1\r\nCBW-RESULT i=0 op=read dev=/dev/vda off=0 len=4096 rc=0 t0=1 "
            "t1=1 got=4096 md5={md5} head=" + "11" * 16 + ' err="" msg=""\r\n'
            "CBW-DONE ops=1 t=2\r\n")
    uniform = parse_console(line.format(md5=pattern_md5(0x11, 4096))).check().ops[0]
    assert uniform.fill == 0x11
    mixed = parse_console(line.format(md5=pattern_md5(0x11, 4095))).check().ops[0]
    assert mixed.fill is None and mixed.head == b"\x11" * 16


def test_parse_good_log() -> None:
    r = parse_console(GOOD_LOG).check()
    assert r.ready and r.done and r.ready_time == 1.83 and r.panic is None
    assert [o.op for o in r.ops] == ["write", "read", "read", "fsyncwrite"]
    w, rd, bad, fs = r.ops
    assert (w.device, w.offset, w.length, w.pattern) == ("/dev/vda", 1048576, 65536, 0x55)
    assert not w.ok and w.rc == 1 and w.errno_text == "Input/output error"
    assert w.message == "dd: error writing '/dev/vda': Input/output error"
    assert rd.ok and rd.got == 4096 and rd.fill == 0x11 and rd.head == b"\x11" * 16
    assert rd.md5 == pattern_md5(0x11, 4096)
    assert not bad.ok and bad.got == 0 and bad.fill is None and bad.head == b""
    assert fs.ok and fs.pattern == 0x77 and fs.md5 is None
    assert [m.op for m in r.io_errors] == [-1, 0]
    assert [m.text for m in r.kmsg_during(w)] == [r.io_errors[1].text]
    assert r.kmsg_during(1)[0].level == 6
    assert r.boot_errors[0].text.startswith("I/O error, dev vda, sector 0")


@pytest.mark.parametrize("log", ["", "complete garbage\n\x00\xff", "[ 0.1] booting\n"])
def test_no_ready_is_an_error_carrying_the_log(log: str) -> None:
    with pytest.raises(GuestError, match="never got ready") as e:
        parse_console(log)
    assert isinstance(e.value, HarnessError)
    for line in log.splitlines():
        assert f"\n  {line}" in str(e.value)


def test_panic_before_ready() -> None:
    log = ("[    1.66] Kernel panic - not syncing: VFS: Unable to mount root fs\n"
           "[    1.66] Call Trace:\n")
    with pytest.raises(GuestError, match="panicked: Kernel panic - not syncing: VFS") as e:
        parse_console(log)
    assert "Call Trace" in str(e.value)


def test_panic_after_ready_fails_check() -> None:
    log = "CBW-READY t=2.0\n[    2.5] Kernel panic - not syncing: Attempted to kill init!\n"
    r = parse_console(log)
    assert r.panic == "Kernel panic - not syncing: Attempted to kill init!"
    with pytest.raises(GuestError, match="panicked"):
        r.check()


def test_incomplete_plan_fails_check() -> None:
    r = parse_console(GOOD_LOG.split("CBW-RESULT i=3")[0])
    assert len(r.ops) == 3 and not r.done
    with pytest.raises(GuestError, match="after 3 operations without CBW-DONE"):
        r.check()


def test_missing_disk_and_module_failures_fail_check() -> None:
    r = parse_console("CBW-NODEV dev=/dev/sdb waited=2\nCBW-READY t=4\nCBW-DONE ops=0 t=4\n")
    assert r.missing_devices == ["/dev/sdb"]
    with pytest.raises(GuestError, match="/dev/sdb"):
        r.check()
    r = parse_console('CBW-MODFAIL module=ahci err="insmod: ERROR: Unknown symbol"\n'
                      "CBW-READY t=4\nCBW-DONE ops=0 t=4\n")
    with pytest.raises(GuestError, match="ahci: insmod: ERROR: Unknown symbol"):
        r.check()


def test_lost_kernel_messages_fail_check() -> None:
    r = parse_console(GOOD_LOG.replace("CBW-DONE", "CBW-KLOST i=2\nCBW-DONE"))
    assert r.kmsg_lost == [2] and r.done
    with pytest.raises(GuestError, match=r"overwrote messages .* end of operation 2"):
        r.check()


@pytest.mark.parametrize("bad", [
    "CBW-RESULT i=0 op=read dev=/dev/vda rc=0",           # fields missing
    "CBW-KLOST lost=3",
    "CBW-RESULT i=0 op=read dev=/dev/vda off=x len=1 rc=0 t0=1 t1=1 got=0",
    "CBW-KMSG lvl=3 t=1.0 no op index",
    "CBW-RESULT i=5 op=read dev=/dev/vda off=0 len=512 rc=0 t0=1 t1=1 got=512",  # out of order
])
def test_malformed_lines_are_errors(bad: str) -> None:
    with pytest.raises(GuestError, match="malformed guest line") as e:
        parse_console(f"CBW-READY t=1.0\n{bad}\n")
    assert bad in str(e.value)


# What `dmesg -r` prints after the boot drain: kernel records ("<level>"), init's end
# marks (user facility 1, level 7: "<15>"), and records after the last mark.
KERNEL_LOG = (
    "<6>[    4.100000] virtio_blk virtio1: [vdb] 8192 512-byte logical blocks\n"
    "<15>[    4.200000] cbw-end 0\n"
    "<3>[    4.300000] I/O error, dev vda, sector 2048 op 0x1:(WRITE) flags 0x8800\n"
    "<7>[    4.310000] a debug message, not forwarded\n"
    "<4>[ 1234.5] cbw-end 1\n"  # a kernel record that looks like a mark is a record
    "<15>[    4.400000] cbw-end 1\n"
    "<15>[    4.500000] cbw-end 2\n"
    "<4>[    4.600000] after the plan: no operation's\n"
)


def run_kmsg_awk(log: str) -> str:
    awk = shutil.which("awk")
    if awk is None:
        pytest.skip("no awk on this host")
    proc = subprocess.run([awk, "-f", str(initramfs.KMSG_AWK)], input=log, capture_output=True,
                          text=True, check=True)
    return proc.stdout


def test_kernel_messages_are_cut_at_the_end_marks() -> None:
    out = run_kmsg_awk(KERNEL_LOG)
    r = parse_console(f"CBW-READY t=4\n{out}CBW-DONE ops=3 t=5\n").check()
    assert [(m.op, m.level, m.time) for m in r.kmsg] == \
        [(0, 6, 4.1), (1, 3, 4.3), (1, 4, 1234.5)]
    assert r.kmsg_during(1)[0].text == "I/O error, dev vda, sector 2048 op 0x1:(WRITE) flags 0x8800"
    assert r.kmsg_during(1)[1].text == "cbw-end 1"
    assert not r.kmsg_during(2) and not r.kmsg_lost


def test_kernel_log_overwritten_before_the_first_mark_is_lost() -> None:
    # The ring buffer dropped the records up to operation 1's end mark.
    out = run_kmsg_awk(KERNEL_LOG.split("<15>[    4.400000] cbw-end 1\n")[1])
    assert out == "CBW-KLOST i=2\n"
    out = run_kmsg_awk("<3>[    4.3] I/O error, dev vdb\n" + KERNEL_LOG.split("cbw-end 0\n")[1])
    assert out.splitlines()[0] == "CBW-KLOST i=1"
    r = parse_console(f"CBW-READY t=4\n{out}CBW-DONE ops=3 t=5\n")
    assert r.kmsg_lost == [1] and not r.kmsg_during(0) and not r.kmsg_during(1)


def init_function(name: str) -> str:
    """The text of shell function ``name`` of init.sh (``name() {`` up to its ``}`` line)."""
    text = initramfs.INIT_SCRIPT.read_text()
    start = text.index(f"\n{name}() {{\n") + 1
    return text[start:text.index("\n}\n", start) + 3]


@pytest.mark.parametrize("output, msg, recs", [
    ("1+0 records in\n1+0 records out\n", "", "1+0"),
    ("dd: error reading '/dev/vda': Input/output error\n0+0 records in\n0+0 records out\n",
     "dd: error reading '/dev/vda': Input/output error", "0+0"),
    ('insmod: can\'t insert "x.ko"\nUnknown symbol in module\n',
     "insmod: can't insert 'x.ko' Unknown symbol in module", ""),
    ("", "", ""),
    ("dd: no newline at the end", "dd: no newline at the end", ""),
])
def test_init_reads_command_output_without_processes(tmp_path: Path, output: str, msg: str,
                                                     recs: str) -> None:
    """output_of: one line, double quotes made single, dd's record count apart."""
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no sh on this host")
    (tmp_path / "err").write_text(output)
    script = init_function("output_of") + init_function("no_quotes") + \
        'output_of "$1"\nprintf "%s|%s" "$msg" "$recs"\n'
    proc = subprocess.run([sh, "-c", script, "sh", str(tmp_path / "err")], capture_output=True,
                          text=True, check=True)
    assert proc.stdout == f"{msg}|{recs}"


def test_init_runs_xxd_once_per_content(tmp_path: Path) -> None:
    """first_bytes: reads of equal md5 reuse the first bytes found for it."""
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no sh on this host")
    script = init_function("first_bytes") + (
        'xxd() { echo call >> "$CALLS"; echo "x$4"; }\n'  # stands in for xxd -p -l 16 FILE
        'for f in a b a2 c; do first_bytes "$f" "md5of${f%2}"; printf "%s " "$first"; done\n')
    calls = tmp_path / "calls"
    proc = subprocess.run([sh, "-c", script], capture_output=True, text=True, check=True,
                          env={"CALLS": str(calls), "PATH": "/usr/bin:/bin"})
    assert proc.stdout == "xa xb xa xc "
    assert calls.read_text().count("call") == 3


def test_error_shows_only_the_log_tail() -> None:
    log = "".join(f"line {i}\n" for i in range(500))
    text = str(GuestError("boom", log))
    assert "last 80 of 500 lines" in text and "line 499" in text and "line 10\n" not in text


# ------------------------------------------------------------------- command line

PLAN: list[console.Op] = [Write("/dev/vda", 1 << 20, 65536, 0x55), Read("/dev/vda", 1 << 20, 65536),
        Write("/dev/sda", 3, 1000, 0, mode="fsync")]


def test_cmdline_round_trip() -> None:
    line = guest_cmdline(PLAN, disk_wait=7)
    words = line.split()
    assert "console=ttyS0" in words and "loglevel=1" in words and "cbw.wait=7" in words
    ops = [w for w in words if w.startswith("cbw.ops=")]
    assert len(ops) == 1
    assert parse_ops(ops[0].removeprefix("cbw.ops=")) == PLAN
    assert format_ops(PLAN) == "w:vda:1048576:65536:55,r:vda:1048576:65536,f:sda:3:1000:00"


def test_cmdline_holds_a_dozen_disks_of_six_operations() -> None:
    """The short op syntax is what lets one boot serve a dozen disks: two writes, two
    reads of untouched regions and two read-backs each (the suite's standard plan)."""
    plan: list[console.Op] = []
    for i in range(12):
        dev = "/dev/vd" + chr(ord("a") + i)
        plan += [Write(dev, off, 65536, 0x55) for off in (1 << 20, 2 << 20)]
        plan += [Read(dev, off, 65536) for off in (0, 3 << 20, 1 << 20, 2 << 20)]
    assert len(guest_cmdline(plan)) <= console.MAX_CMDLINE
    assert parse_ops(format_ops(plan)) == plan


def test_cmdline_options() -> None:
    assert "cbw.ops" not in guest_cmdline([])
    line = guest_cmdline([], console="ttyS1", verbose=True, extra=["foo=bar"])
    assert "console=ttyS1" in line and "loglevel=7" in line and line.endswith("foo=bar")


@pytest.mark.parametrize("op, match", [
    (Read("/dev/vda", 100, 512), "align"),
    (Write("/dev/vda", 0, 1000, 1), "align"),
    (Write("/dev/vda", 0, 512, 256), "not a byte"),
    (Read("vda", 0, 512), "not a /dev path"),
    (Read("/dev/vda:1", 0, 512), "not a /dev path"),
    (Read("/dev/vda", -512, 512), "offset >= 0"),
    (Read("/dev/vda", 0, 0), "length > 0"),
])
def test_bad_ops_are_config_errors(op: console.Op, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        guest_cmdline([op])


def test_cmdline_too_long() -> None:
    with pytest.raises(ConfigError, match="over x86's 2047"):
        guest_cmdline([Read("/dev/vda", i * 512, 512) for i in range(200)])


@pytest.mark.parametrize("token", ["nope:1", "r:vda:1", "w:vda:0:512:zz", "gate:x",
                                   "read:/dev/vda:0:512"])
def test_parse_ops_rejects_garbage(token: str) -> None:
    with pytest.raises(ConfigError, match="bad guest operation"):
        parse_ops(token)


def test_qemu_args(tmp_path: Path) -> None:
    k = GuestKernel(tmp_path / "vmlinuz", "6.0", None, pvh=tmp_path / "pvh.elf")
    args = qemu_guest_args(k, tmp_path / "i.cpio.gz", "console=ttyS0 x", serial="file:/tmp/log")
    assert args == ["-kernel", str(tmp_path / "pvh.elf"), "-initrd", str(tmp_path / "i.cpio.gz"),
                    "-append", "console=ttyS0 x", "-serial", "file:/tmp/log", "-no-reboot"]
    assert GuestKernel(tmp_path / "vmlinuz", "6.0", None).boot_image == tmp_path / "vmlinuz"


def test_disk_args() -> None:
    controller, dev = guest_device("ahci", "disk0", "n0", werror="stop")
    assert controller == {"driver": "ahci", "id": "ahci0"}
    assert dev == {"driver": "ide-hd", "bus": "ahci0.0", "drive": "n0", "id": "disk0",
                   "werror": "stop"}
    assert guest_device("virtio-blk", "d", "n0")[0] is None
    with pytest.raises(ConfigError, match="unknown guest disk kind"):
        guest_device("floppy", "disk0", "n0")


# ----------------------------------------------------------------------------- cpio

def test_newc_writer_round_trip() -> None:
    w = NewcWriter()
    w.add_dir("bin")
    w.add_file("bin/busybox", b"\x7fELF" + bytes(range(256)) * 3, 0o755)
    w.add_symlink("bin/sh", "busybox")
    w.add_chardev("dev/console", 5, 1)
    w.add_file("/odd-name-length", b"abc")
    data = w.finish()
    assert data == w.finish()  # idempotent
    assert len(data) % 4 == 0
    entries = read_newc(data)
    assert [e.name for e in entries] == ["bin", "bin/busybox", "bin/sh", "dev/console",
                                         "odd-name-length"]
    d, bb, sh, con, odd = entries
    assert stat.S_ISDIR(d.mode) and stat.S_IMODE(d.mode) == 0o755
    assert stat.S_ISREG(bb.mode) and stat.S_IMODE(bb.mode) == 0o755
    assert bb.data == b"\x7fELF" + bytes(range(256)) * 3
    assert stat.S_ISLNK(sh.mode) and sh.data == b"busybox"
    assert stat.S_ISCHR(con.mode) and con.rdev == (5, 1) and con.data == b""
    assert odd.data == b"abc"
    assert len({e.ino for e in entries}) == len(entries)
    with pytest.raises(ValueError):
        w.add_file("late", b"")


def test_newc_header_layout() -> None:
    w = NewcWriter()
    w.add_file("ab", b"xyz", 0o600)
    data = w.finish()
    assert data[:6] == b"070701"
    fields = [int(data[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
    assert fields[1] == stat.S_IFREG | 0o600 and fields[6] == 3 and fields[11] == 3
    assert fields[2] == fields[3] == fields[5] == 0  # root-owned, mtime 0
    # 110-byte header + "ab\0" = 113, padded to 116; then data padded to 4.
    assert data[113:116] == b"\0\0\0" and data[116:119] == b"xyz" and data[120:126] == b"070701"
    if shutil.which("cpio"):  # cross-check with GNU cpio when the host has it
        out = subprocess.run(["cpio", "-t"], input=data, capture_output=True)
        assert out.stdout.split() == [b"ab"]


def test_read_newc_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="bad newc magic"):
        read_newc(b"070707" + b"0" * 200)


# -------------------------------------------------------------------------- modinfo

def test_modinfo_depends() -> None:
    ko = make_ko("sd_mod", "scsi_mod,scsi_common")
    assert module_depends(ko) == ["scsi_mod", "scsi_common"]
    assert modinfo(ko)["name"] == ["sd_mod"]
    assert module_depends(make_ko("virtio_blk", "")) == []
    elf32 = make_elf({".modinfo": b"depends=a\0"}, elf32=True)
    assert module_depends(elf32) == ["a"]
    with pytest.raises(ValueError, match="not an ELF"):
        module_depends(b"MZ\0\0")
    with pytest.raises(ValueError, match=r"no \.modinfo"):
        module_depends(make_elf({".text": b"x"}))


def test_resolve_orders_dependencies(tmp_path: Path) -> None:
    k = fake_kernel(tmp_path, {"ahci": "libata,libahci", "libahci": "libata",
                               "libata": "scsi_mod,scsi_common", "scsi_mod": "scsi_common",
                               "scsi_common": "", "sd_mod": "scsi_mod,scsi_common,crc_t10dif"},
                    builtin=("crc-t10dif",))
    tree = initramfs.ModuleTree(k)
    order = [m.name for m in tree.resolve(["ahci", "sd_mod"])]
    assert order == ["scsi_common", "scsi_mod", "libata", "libahci", "ahci", "sd_mod"]
    assert tree.resolve(["scsi-common"])[0].data.startswith(b"\x7fELF")


def test_missing_module_and_cycle(tmp_path: Path) -> None:
    k = fake_kernel(tmp_path, {"a": "b", "b": "a", "c": "nothere"})
    with pytest.raises(ConfigError, match=r"kernel 6\.0-test has no module virtio_blk"):
        initramfs.ModuleTree(k).resolve(["virtio_blk"])
    with pytest.raises(ConfigError, match=r"no module nothere \(needed by c\)"):
        initramfs.ModuleTree(k).resolve(["c"])
    with pytest.raises(ConfigError, match="cycle a -> b -> a"):
        initramfs.ModuleTree(k).resolve(["a"])
    with pytest.raises(ConfigError, match="without a modules directory"):
        initramfs.ModuleTree(GuestKernel(k.vmlinuz, k.version, None))


# --------------------------------------------------------------------------- build

def test_build_initramfs(tmp_path: Path, cache: Path) -> None:
    k = fake_kernel(tmp_path, {"virtio_scsi": "scsi_mod", "scsi_mod": "scsi_common",
                               "scsi_common": "", "sd_mod": "scsi_mod,scsi_common"})
    bb = tmp_path / "busybox"
    bb.write_bytes(b"\x7fELF static busybox")
    path = build_initramfs(k, bb, ["virtio_scsi", "sd_mod"])
    assert path.parent == cache / "guest" / "initramfs" and path.name.endswith(".cpio.gz")
    entries = {e.name: e for e in read_newc(gzip.decompress(path.read_bytes()))}
    assert entries["init"].data == initramfs.INIT_SCRIPT.read_bytes()
    assert entries[initramfs.KMSG_AWK_PATH].data == initramfs.KMSG_AWK.read_bytes()
    assert stat.S_IMODE(entries["init"].mode) == 0o755
    assert entries["bin/busybox"].data == bb.read_bytes()
    assert entries["bin/sh"].data == b"busybox"
    assert entries["dev/console"].rdev == (5, 1)
    order = entries["etc/cbw/modules"].data.decode().split()
    assert order == [f"/lib/modules/6.0-test/{m}.ko" for m in
                     ("scsi_common", "scsi_mod", "virtio_scsi", "sd_mod")]
    assert entries["lib/modules/6.0-test/sd_mod.ko"].data == make_ko("sd_mod",
                                                                     "scsi_mod,scsi_common")
    # Every directory an entry lives in is itself in the archive, before it.
    names = list(entries)
    for n in names:
        parent = n.rpartition("/")[0]
        assert not parent or names.index(parent) < names.index(n)

    mtime = path.stat().st_mtime_ns
    assert build_initramfs(k, bb, ["virtio_scsi", "sd_mod"]) == path
    assert path.stat().st_mtime_ns == mtime  # cached, not rebuilt
    bb.write_bytes(b"\x7fELF another busybox")
    assert build_initramfs(k, bb, ["virtio_scsi", "sd_mod"]) != path
    assert build_initramfs(k, bb, ["virtio_scsi"]) != path
    out = build_initramfs(k, bb, [], out_dir=tmp_path / "out")
    assert out.parent == tmp_path / "out"


def test_build_initramfs_missing_busybox(tmp_path: Path, cache: Path) -> None:
    k = fake_kernel(tmp_path, {})
    with pytest.raises(ConfigError, match=r"busybox binary .* does not exist"):
        build_initramfs(k, tmp_path / "nope", [])


def test_init_script_parses() -> None:
    # The guest runs busybox ash; a POSIX parser catches syntax slips.
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no sh on this host")
    proc = subprocess.run([sh, "-n", str(initramfs.INIT_SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# -------------------------------------------------------------------------- kernel

def test_bzimage_version_and_from_user(tmp_path: Path, cache: Path) -> None:
    k = fake_kernel(tmp_path, {"virtio_blk": ""})
    assert kernel.bzimage_version(k.vmlinuz) == "6.0-test"
    user = GuestKernel.from_user(k.vmlinuz, k.modules_dir, pvh=False)
    assert (user.version, user.modules_dir, user.pvh) == ("6.0-test", k.modules_dir, None)
    assert GuestKernel.from_user(k.vmlinuz, pvh=False).modules_dir is None
    with pytest.raises(ConfigError, match="does not exist"):
        GuestKernel.from_user(tmp_path / "missing")
    with pytest.raises(ConfigError, match="has no kernel/ subdirectory"):
        GuestKernel.from_user(k.vmlinuz, tmp_path)
    other = tmp_path / "lib/modules/6.1-other"
    (other / "kernel").mkdir(parents=True)
    with pytest.raises(ConfigError,
                       match=r"is kernel 6\.0-test but .* holds modules for 6\.1-other"):
        GuestKernel.from_user(k.vmlinuz, other)
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a kernel" * 100)
    with pytest.raises(ConfigError, match="not an x86 bzImage"):
        GuestKernel.from_user(junk)


def test_pvh_extraction(tmp_path: Path, cache: Path) -> None:
    pvh_elf = make_elf({".text": b"\x90"}, notes=[(b"Xen", 18, b"\0\0\0\x01")])
    payload = lzma.compress(pvh_elf, format=lzma.FORMAT_XZ) + len(pvh_elf).to_bytes(4, "little")
    bz = tmp_path / "vmlinuz-pvh"
    bz.write_bytes(make_bzimage("6.0-test", payload))
    out = kernel.pvh_image(bz)
    assert out is not None and out.read_bytes() == pvh_elf
    assert kernel.pvh_image(bz) == out  # cached
    k = GuestKernel.from_user(bz)
    assert k.boot_image == out

    plain = make_elf({".text": b"\x90"}, notes=[(b"Linux", 1, b"x")])
    bz2 = tmp_path / "vmlinuz-nopvh"
    bz2.write_bytes(make_bzimage("6.0-test", gzip.compress(plain)))
    assert kernel.pvh_image(bz2) is None
    assert GuestKernel.from_user(bz2).boot_image == bz2


def test_cached_kernel_needs_no_apt(tmp_path: Path, cache: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    guest = cache / "guest"
    prefix = guest / "kernel-6.0-test"
    (prefix / "usr/lib/modules/6.0-test/kernel").mkdir(parents=True)
    (prefix / "boot").mkdir()
    (prefix / "boot/vmlinuz-6.0-test").write_bytes(make_bzimage("6.0-test"))
    (guest / "trixie-linux-image-cloud-amd64.json").write_text('{"dir": "kernel-6.0-test"}')

    def no_apt(*_a: object, **_k: object) -> None:
        raise AssertionError("apt used although the kernel is cached")
    monkeypatch.setattr(debian, "PrivateApt", no_apt)
    monkeypatch.setattr(debian, "host_mirror", no_apt)
    with pytest.raises(AssertionError):  # no completion marker yet: would provision
        kernel.provision_kernel(pvh=False)
    (prefix / kernel.MARKER).write_text("{}")
    k = kernel.provision_kernel(pvh=False)
    assert k.version == "6.0-test" and k.vmlinuz == prefix / "boot/vmlinuz-6.0-test"
    assert k.modules_dir == prefix / "usr/lib/modules/6.0-test"


def test_lock_wait_is_bounded(tmp_path: Path) -> None:
    from harness.qemu.cache import locked
    path = tmp_path / "x"
    with open(tmp_path / "x.lock", "a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(LockTimeout, match="held the lock on the thing"), \
                locked(path, "the thing", timeout=0.3):
                pass
    with locked(path, "the thing", timeout=0.3):
        pass
