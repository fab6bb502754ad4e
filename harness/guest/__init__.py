"""A tiny Linux guest (Debian kernel + busybox initramfs) that runs a plan of block I/O.

The host describes the I/O as a list of operations (:mod:`.console`), which travel on
the kernel command line; the guest's init runs them and prints one machine-readable
line per operation on the serial console, which :func:`.console.parse_console` turns
back into typed results.  Typical use::

    kernel, busybox = provision_kernel(), busybox_static()
    initrd = build_initramfs(kernel, busybox, DISK_MODULES["virtio-blk"])
    ops = [Write("/dev/vda", 0, 65536, 0x55), Read("/dev/vda", 0, 65536)]
    argv = [..., *qemu_guest_args(kernel, initrd, guest_cmdline(ops)), "-device", ...]
    report = parse_console(serial_output).check()

:mod:`.vm` puts it all together under copy-before-write: :func:`run_guest` boots the
guest on :class:`GuestDisk` s and returns a :class:`GuestRun`.
"""

from .console import (
                      GuestError,
                      GuestOp,
                      GuestReport,
                      KernelMessage,
                      Op,
                      Read,
                      Write,
                      format_ops,
                      guest_cmdline,
                      parse_console,
                      parse_ops,
                      pattern_md5,
                      qemu_guest_args,
)
from .initramfs import DISK_MODULES, build_initramfs
from .kernel import GuestKernel, busybox_static, provision_kernel
from .vm import (
                      DiskRun,
                      GuestDisk,
                      GuestImage,
                      GuestRun,
                      IoStop,
                      bench_boot,
                      guest_devices,
                      run_guest,
)

__all__ = [
    "DISK_MODULES", "DiskRun", "GuestDisk", "GuestError", "GuestImage",
    "GuestKernel", "GuestOp", "GuestReport", "GuestRun", "IoStop", "KernelMessage", "Op", "Read",
    "Write", "bench_boot", "build_initramfs", "busybox_static",
    "format_ops", "guest_cmdline", "guest_devices", "parse_console", "parse_ops", "pattern_md5",
    "provision_kernel", "qemu_guest_args", "run_guest",
]
