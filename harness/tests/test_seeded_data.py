"""Seeded image data and qemu-io dumps: what the request-shape tests compare byte for byte."""

from __future__ import annotations

import json

from harness.block.images import Images, seeded_bytes
from harness.qemu import replay
from harness.qemu.qemu_io import QemuIoResult


def test_seeded_fill_is_recorded_and_replayed_the_same(tmp_path, qemu_build):
    made = tmp_path / "made"
    made.mkdir()
    images = Images(qemu_build, made)
    path = images.create("s.raw", 8192, "raw")
    written = images.fill_seeded(path, 7, 1000, 3000)
    assert written == seeded_bytes(7, 3000) and written != seeded_bytes(8, 3000)
    assert images.read_raw(path, 1000, 3000) == written
    assert images.read_raw(path, 0, 1000) == bytes(1000)
    recipe = [json.loads(line) for line in images.recipe.read_text().splitlines()]
    again = tmp_path / "again"
    replay.make_images({"recipe": recipe}, again, again, None)
    assert (again / "s.raw").read_bytes() == path.read_bytes()


DUMP = ("00000010:  aa bb cc dd ee ff 00 11 22 33 44 55 66 77 88 99  ................\n"
        "00000020:  01 02 03  ...\n"
        "read 19/19 bytes at offset 16\n")


def test_dump_read_back_as_bytes():
    data = bytes.fromhex("aabbccddeeff00112233445566778899010203")
    assert QemuIoResult("read -v 16 19", DUMP).dumped(16, 19) == data


def test_dump_of_another_range_or_with_a_gap_is_none():
    result = QemuIoResult("read -v 16 19", DUMP)
    assert result.dumped(0, 19) is None       # not the range asked for
    assert result.dumped(16, 32) is None      # cut short
    gap = DUMP.replace("00000020:", "00000030:")
    assert QemuIoResult("read -v 16 19", gap).dumped(16, 19) is None
    failed = QemuIoResult("read -v 16 19", "read failed: Permission denied")
    assert failed.dumped(16, 19) is None and failed.error == "Permission denied"


def test_elapsed_by_qemu_ios_own_clock():
    short = "wrote 2097152/2097152 bytes at offset 0\n2 MiB, 1 ops; 00.61 sec (3.280 MiB/sec)"
    long = "wrote 10/10 bytes at offset 4\n10 MiB, 1 ops; 0:01:02.50 (4.996 MiB/sec)"
    assert QemuIoResult("write", short).elapsed == 0.61
    assert QemuIoResult("write", long).elapsed == 62.5
    assert QemuIoResult("write", "write failed: Connection timed out").elapsed is None
