"""Tests of the guest layer (harness.guest.vm), the guest kernel options and zstd.

Unit tests need neither network nor QEMU; those marked ``guest`` boot the real guest
to check that a guest that fails is reported with its console log, and QEMU ends.
"""

from __future__ import annotations

import shutil

import pytest

from harness.errors import ConfigError
from harness.guest import (
    GuestDisk,
    GuestError,
    GuestImage,
    Op,
    Read,
    Write,
    guest_devices,
    kernel,
    run_guest,
)
from harness.qemu.machine import Machine
from harness.scenarios.cbw import CHUNK, Fault, Layout
from harness.tests.test_guest_units import cache, fake_kernel, make_bzimage, make_elf  # noqa: F401
from harness.tests.test_plugin_runs import run_pytest

# ------------------------------------------------------------------------ disks

def test_guest_device_names_follow_the_disk_order() -> None:
    disks = [GuestDisk("a"), GuestDisk("s", kind="virtio-scsi"), GuestDisk("b")]
    assert guest_devices(disks) == {"a": "/dev/vda", "s": "/dev/sda", "b": "/dev/vdb"}
    assert GuestDisk("a").qom_path == "/machine/peripheral/a/virtio-backend"
    assert GuestDisk("s", kind="ahci").qom_path == "/machine/peripheral/s"


@pytest.mark.parametrize("disks, match", [
    ([GuestDisk("s", kind="virtio-scsi"), GuestDisk("t", kind="ahci")], "at most one SCSI or AHCI"),
    ([GuestDisk("a"), GuestDisk("a")], "names repeat"),
])
def test_ambiguous_disk_sets_are_config_errors(disks, match) -> None:
    with pytest.raises(ConfigError, match=match):
        guest_devices(disks)


@pytest.mark.parametrize("kwargs, match", [
    ({"kind": "nvme"}, "unknown disk kind 'nvme': use one of virtio-blk, virtio-scsi, ahci"),
    ({"werror": "retry"}, "unknown werror/rerror policy 'retry'"),
    ({"layout": Layout.BACKUP_SYNC_FULL}, "unknown layout"),
    ({"layout": Layout.FLEECING, "werror": "stop", "fault": Fault("target-write", once=False)},
     "never ends without a job to cancel"),
])
def test_bad_disks_are_config_errors(kwargs, match) -> None:
    with pytest.raises(ConfigError, match=match):
        GuestDisk("d", **kwargs)


def test_missing_module_names_kernel_and_module(tmp_path, cache) -> None:  # noqa: F811
    image = GuestImage(fake_kernel(tmp_path, {"virtio_blk": ""}), tmp_path / "busybox")
    (tmp_path / "busybox").write_bytes(b"\x7fELF")
    assert image.initramfs(["virtio-blk"]) == image.initramfs(["virtio-blk"])  # built once
    with pytest.raises(ConfigError, match=r"kernel 6\.0-test has no module virtio_scsi under"):
        image.initramfs(["virtio-scsi"])


# ------------------------------------------------------------------------- zstd

def pvh_bzimage(tmp_path, elf: bytes):
    """A bzImage whose payload is ``elf`` compressed as the kernel build does: a zstd
    frame without its size, then the size in 4 bytes."""
    co = pytest.importorskip("zstandard").ZstdCompressor().compressobj()
    payload = co.compress(elf) + co.flush() + len(elf).to_bytes(4, "little")
    bz = tmp_path / "vmlinuz-zstd"
    bz.write_bytes(make_bzimage("6.0-test", payload))
    return bz


PVH_ELF = make_elf({".text": b"\x90" * 4096}, notes=[(b"Xen", 18, b"\0\0\0\x01")])


def test_zstd_pvh_without_host_tools(tmp_path, cache, monkeypatch) -> None:  # noqa: F811
    monkeypatch.setattr(shutil, "which", lambda name: None)
    out = kernel.pvh_image(pvh_bzimage(tmp_path, PVH_ELF))
    assert out is not None and out.read_bytes() == PVH_ELF


@pytest.mark.skipif(shutil.which("zstd") is None, reason="no zstd tool on this host")
def test_zstd_tool_stands_in_for_the_package(tmp_path, cache, monkeypatch) -> None:  # noqa: F811
    monkeypatch.setattr(kernel, "_zstandard", None)
    out = kernel.pvh_image(pvh_bzimage(tmp_path, PVH_ELF))
    assert out is not None and out.read_bytes() == PVH_ELF


def test_zstd_without_any_decompressor_boots_the_bzimage(tmp_path, cache,  # noqa: F811
                                                         monkeypatch) -> None:
    monkeypatch.setattr(kernel, "_zstandard", None)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert kernel.pvh_image(pvh_bzimage(tmp_path, PVH_ELF)) is None
    with pytest.raises(kernel.ZstdFailed, match="pip install zstandard"):
        kernel.zstd_decompress(b"\x28\xb5\x2f\xfd")


# ------------------------------------------------------ options, against real pytest

GUEST_IMAGE_TEST = """
def test_image(guest_image):
    guest_image.initramfs(["virtio-blk"])
"""


@pytest.mark.selftest
@pytest.mark.parametrize("args, message", [
    (["--guest-modules", "/tmp"], "guest kernel: --guest-modules needs --guest-kernel"),
    (["--guest-kernel", "/nonexistent/bzImage"],
     "guest kernel: guest kernel /nonexistent/bzImage does not exist"),
])
def test_bad_guest_kernel_options_are_one_line_errors(tmp_path, args, message) -> None:
    result = run_pytest(tmp_path, GUEST_IMAGE_TEST, *args)
    assert result.returncode == 1, result.stdout
    assert message in result.stdout
    assert "Traceback" not in result.stdout


@pytest.mark.selftest
def test_user_kernel_lacking_a_module_fails_naming_it(tmp_path) -> None:
    k = fake_kernel(tmp_path, {})
    result = run_pytest(tmp_path, GUEST_IMAGE_TEST, "--guest-kernel", str(k.vmlinuz),
                        "--guest-modules", str(k.modules_dir))
    assert result.returncode == 1, result.stdout
    assert "kernel 6.0-test has no module virtio_blk" in result.stdout


# ------------------------------------------------------------ failing real guests

@pytest.fixture
def machines(launch_vm):
    """A launch_vm that remembers its machines."""
    started: list[Machine] = []

    def launch(*args, **kwargs) -> Machine:
        started.append(launch_vm(*args, **kwargs))
        return started[-1]
    launch.started = started  # type: ignore[attr-defined]
    return launch


@pytest.mark.guest
@pytest.mark.selftest
@pytest.mark.parametrize("kwargs, message, in_log", [
    ({"ready_timeout": 0.2}, "the guest was not ready (CBW-READY) within 0.2 s", ""),
    ({"kernel_args": ["rdinit=/nonexistent"]}, "the guest ended before it was ready",
     "Kernel panic - not syncing"),
], ids=["not-ready-in-time", "panic"])
def test_failing_guest_is_an_error_with_its_console(machines, images, guest_image, kwargs,
                                                     message, in_log) -> None:
    disk = GuestDisk("d")
    with pytest.raises(GuestError) as info:
        run_guest(machines, images, guest_image, [disk],
                  [Read(guest_devices([disk])["d"], 0, 512)], **kwargs)
    assert message in str(info.value)
    assert in_log in info.value.log
    assert not machines.started[0].is_running, "QEMU outlived the failed guest"


# ------------------------------------------------------ kernel messages, real guest

@pytest.mark.guest
@pytest.mark.selftest
@pytest.mark.slow  # the iotests check the same attribution in their guests
def test_kernel_messages_belong_to_the_operation_that_logged_them(machines, images,
                                                                   guest_image) -> None:
    """init cuts the kernel log at marks it writes when each operation ends: a failing
    write's I/O error is its own, never a neighbour's (reads that succeed sit between)."""
    disk = GuestDisk("d", werror="report", fault=Fault("target-write", once=False))
    dev = guest_devices([disk])["d"]
    failing = disk.fault.failing_writes()
    plan: list[Op] = [Read(dev, 0, CHUNK), Write(dev, failing[0], CHUNK, 0x55),
                      Read(dev, 0, CHUNK), Write(dev, failing[1], CHUNK, 0x55),
                      Read(dev, 0, CHUNK)]
    run = run_guest(machines, images, guest_image, [disk], plan)
    ops = run.report.ops
    assert [op.ok for op in ops] == [True, False, True, False, True], ops
    for op in ops:
        logged = run.io_errors_during(op)
        if op.ok:
            assert not logged, f"operation {op.index} got another's kernel messages: {logged}"
            continue
        assert len(logged) == 1 and "dev vda," in logged[0].text, logged
