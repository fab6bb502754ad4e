"""A real Linux guest writing through copy-before-write: set up, drive, observe.

Data flows one way::

    GuestImage + GuestDisk specs + a plan of guest ops
        -> run_guest(): images, QEMU launched with -S, the CBW layout of each disk,
           cont, answers to werror/rerror=stop pauses, the guest's end
        -> GuestRun: the GuestReport, the BLOCK_IO_ERROR / STOP events, run states

QEMU is shut down when :func:`run_guest` returns, so the test reads the images
offline (``images.holds(run.disk("d0").source, ...)``).

Each :class:`GuestDisk` has its own source and target images (raw, filled with
:data:`~harness.block.data.ORIGINAL`) under its own copy-before-write filter (the
graph: :class:`~harness.block.topology.Topology`), and its own blkdebug
:class:`~harness.block.faults.Fault`, whose rules name the sectors of
:data:`~harness.block.data.GUEST_WRITES`: the guest's boot (partition scan) never meets
them, only the copy-before-write of a guest write there.  Layouts:

* ``Layout.BACKUP_SYNC_NONE``: ``blockdev-backup sync=none`` with a filter node,
  started while QEMU waits under ``-S`` (``on-cbw-error`` is the job's, 10.1+);
* ``Layout.FLEECING``: a ``copy-before-write`` node (its own ``on-cbw-error``, 7.1+)
  with ``snapshot-access`` on top, all on the command line; after the guest's end
  the snapshot is read back (:attr:`DiskRun.snapshot_reads`).

``-action shutdown=pause`` (with ``-no-reboot``) keeps QEMU alive after the guest
ends, so QMP still answers: the harness reads the snapshots and the jobs then.

Example::

    image = GuestImage.provision()
    disks = [GuestDisk("d0", werror="report", fault=Fault("target-write"))]
    dev = guest_devices(disks)["d0"]                      # "/dev/vda"
    run = run_guest(launch_vm, images, image, disks, [Write(dev, MiB, CHUNK, NEW)])
    assert run.ops_on("d0")[0].errno_text == "Input/output error"
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..block.data import CHUNK, GUEST_WRITES, IMAGE_SIZE, ORIGINAL, UNTOUCHED
from ..block.faults import NO_FAULT, Fault
from ..block.images import Images
from ..block.topology import Layout, Topology, guest_device
from ..errors import ConfigError, HarnessError, QEMUDied, WaitTimeout
from ..qemu.builds import QemuBuild
from ..qemu.machine import Machine, launcher
from ..qemu.qemu_io import QemuIoResult
from .console import (
    IO_ERROR,
    GuestError,
    GuestOp,
    GuestReport,
    KernelMessage,
    Op,
    Read,
    guest_cmdline,
    parse_console,
    qemu_guest_args,
)
from .initramfs import DISK_MODULES, build_initramfs
from .kernel import GuestKernel, busybox_static, provision_kernel

# Time limits (s), generous for TCG on a loaded two-core machine; a boot takes ~2.5 s.
READY_TIMEOUT = 40.0
END_TIMEOUT = 60.0
GUEST_MEMORY = "256M"
DISK_KINDS = tuple(DISK_MODULES)  # virtio-blk, virtio-scsi, ahci
LAYOUTS = (Layout.BACKUP_SYNC_NONE, Layout.FLEECING)
ON_ERROR_POLICIES = ("report", "ignore", "enospc", "stop", "auto")
_READY = "CBW-READY"
_END = "CBW-DONE|Kernel panic - not syncing"


# ------------------------------------------------------------------- the guest's image

@dataclass
class GuestImage:
    """A kernel and a busybox, and per set of disk kinds the initramfs that drives them.

    Each initramfs is built once (and cached on disk by its inputs).  A kernel given
    without modules (``kernel.modules_dir is None``) must have its disk drivers built in.
    """

    kernel: GuestKernel
    busybox: Path
    _initramfs: dict[tuple[str, ...], Path] = field(default_factory=dict, repr=False)

    @classmethod
    def provision(cls) -> GuestImage:
        """Debian's kernel and busybox, fetched once and cached."""
        return cls(provision_kernel(), busybox_static())

    @classmethod
    def from_user(cls, vmlinuz: Path | str, modules_dir: Path | str | None = None
                  ) -> GuestImage:
        """Your own kernel (see :meth:`GuestKernel.from_user`) with Debian's busybox."""
        return cls(GuestKernel.from_user(vmlinuz, modules_dir), busybox_static())

    def initramfs(self, kinds: Iterable[str]) -> Path:
        """The initramfs loading the modules for disks of ``kinds``.

        :class:`ConfigError` names the kernel version and the module it lacks.
        """
        kinds = sorted(set(kinds))
        for kind in kinds:
            _check_choice("disk kind", kind, DISK_KINDS)
        modules: tuple[str, ...] = ()
        if self.kernel.modules_dir is not None:
            modules = tuple(dict.fromkeys(m for kind in kinds for m in DISK_MODULES[kind]))
        if modules not in self._initramfs:
            self._initramfs[modules] = build_initramfs(self.kernel, self.busybox, modules)
        return self._initramfs[modules]


# ----------------------------------------------------------------------- the disks

@dataclass(frozen=True)
class GuestDisk:
    """One guest disk: its own source and target images under its own CBW filter.

    ``name`` names everything of the disk: its qdev id, its nodes
    (``<name>-source``, ``-target``, ``-cbw``, ``-snapshot``), its job (``<name>-job``)
    and its images.  ``werror``/``rerror``: the device's policy (None: its default,
    ``enospc``, which reports an EIO).  ``on_cbw_error``: None leaves the option out.
    ``stop_retries``: at a ``stop`` pause of this disk, ``cont`` this many times with
    the fault in place; at the next pause cancel its backup job (which drops the
    filter) and ``cont``.
    """

    name: str
    kind: str = "virtio-blk"
    werror: str | None = None
    rerror: str | None = None
    on_cbw_error: str | None = None
    fault: Fault = NO_FAULT
    layout: Layout = Layout.BACKUP_SYNC_NONE
    stop_retries: int = 1

    def __post_init__(self) -> None:
        if not self.name.replace("-", "").isalnum():
            raise ConfigError(f"guest disk name {self.name!r}: use letters, digits and '-'")
        _check_choice("disk kind", self.kind, DISK_KINDS)
        _check_choice("layout", self.layout, LAYOUTS)
        for policy in (self.werror, self.rerror):
            if policy is not None:
                _check_choice("werror/rerror policy", policy, ON_ERROR_POLICIES)
        if self.layout is Layout.FLEECING and self.fault.injects and not self.fault.once \
                and "stop" in (self.werror, self.rerror):
            raise ConfigError(f"disk {self.name}: a persistent fault under werror/rerror=stop "
                              "never ends without a job to cancel: use a one-shot fault or "
                              "the backup layout")

    def topology(self, folder: Path) -> Topology:
        """This disk's block graph, every node-name and image starting with its name."""
        return Topology(self.layout, folder, on_cbw_error=self.on_cbw_error, fault=self.fault,
                        prefix=f"{self.name}-", job=self.job)

    def node(self, role: str) -> str:
        """The node-name of this disk's ``source``, ``target``, ``cbw`` or ``snapshot``."""
        return f"{self.name}-{role}"

    @property
    def job(self) -> str:
        return f"{self.name}-job"

    @property
    def qom_path(self) -> str:
        """The QOM path BLOCK_IO_ERROR names for this disk's device."""
        base = f"/machine/peripheral/{self.name}"
        return base + "/virtio-backend" if self.kind == "virtio-blk" else base


def guest_devices(disks: Sequence[GuestDisk]) -> dict[str, str]:
    """Each disk's path in the guest, by name: ``/dev/vda``, ``/dev/vdb``... in order.

    virtio-blk disks are named in PCI order; SCSI and ATA disks share ``sd`` names
    given in probe order, which is not fixed: at most one such disk per guest.
    """
    sd = [d.name for d in disks if d.kind != "virtio-blk"]
    if len(sd) > 1:
        raise ConfigError(f"disks {', '.join(sd)} would all be /dev/sd*, named in an order "
                          "that is not fixed: give the guest at most one SCSI or AHCI disk")
    if len({d.name for d in disks}) != len(disks):
        raise ConfigError(f"guest disk names repeat: {[d.name for d in disks]}")
    paths, vd = {}, 0
    for d in disks:
        if d.kind == "virtio-blk":
            paths[d.name] = "/dev/vd" + chr(ord("a") + vd)
            vd += 1
        else:
            paths[d.name] = "/dev/sda"
    return paths


def _check_choice(what: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {what} {value!r}: use one of "
                          f"{', '.join(str(getattr(c, 'value', c)) for c in choices)}")


# ---------------------------------------------------------------------- the result

@dataclass(frozen=True)
class IoStop:
    """One pause on a werror/rerror=stop error, and how the harness answered it."""

    disk: str
    error: dict[str, Any]   # the BLOCK_IO_ERROR's data (action stop); a STOP followed it
    status: str             # query-status while paused (io-error)
    answer: str             # "cont", or "cancel-job+cont" (the copy-before-write ended)


@dataclass
class DiskRun:
    """What one disk saw."""

    disk: GuestDisk
    device: str                       # the disk's path in the guest
    source: Path
    target: Path
    io_errors: list[dict[str, Any]] = field(default_factory=list)  # BLOCK_IO_ERROR data
    stops: list[IoStop] = field(default_factory=list)
    snapshot_reads: dict[int, QemuIoResult] = field(default_factory=dict)  # fleecing only
    job_status: str | None = None     # backup layout: query-jobs status after the guest's end

    @property
    def filter_node(self) -> str:
        """The node the device writes to, which BLOCK_IO_ERROR names."""
        return self.disk.node("cbw")


@dataclass
class GuestRun:
    """One boot of the guest: its report, and what QMP said meanwhile."""

    report: GuestReport
    disks: dict[str, DiskRun]
    events: list[dict[str, Any]]      # BLOCK_IO_ERROR, STOP, RESUME, SHUTDOWN, job ends, in order
    shutdown: dict[str, Any]          # the SHUTDOWN event's data
    final_status: str                 # query-status after the guest's end
    boot_seconds: float               # launch to CBW-READY (wall clock)
    seconds: float                    # launch to the guest's end (wall clock)

    def disk(self, name: str) -> DiskRun:
        return self.disks[name]

    def ops_on(self, name: str) -> list[GuestOp]:
        """The guest's operations on disk ``name``, in plan order."""
        return [op for op in self.report.ops if op.device == self.disks[name].device]

    def io_errors_during(self, op: GuestOp) -> list[KernelMessage]:
        """The guest kernel's block I/O error messages logged while ``op`` ran."""
        return [m for m in self.report.kmsg_during(op) if IO_ERROR.search(m.text)]

    @property
    def stops(self) -> list[IoStop]:
        return [s for d in self.disks.values() for s in d.stops]

    def event_names(self) -> list[str]:
        return [e["event"] for e in self.events]


# --------------------------------------------------------------------- the session

_KEPT_EVENTS = ("BLOCK_IO_ERROR", "STOP", "RESUME", "SHUTDOWN", "BLOCK_JOB_CANCELLED",
                "BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR")


class _Session:
    def __init__(self, launch_vm: Callable[..., Machine], images: Images, image: GuestImage,
                 disks: Sequence[GuestDisk], plan: Sequence[Op], *, name: str,
                 kernel_args: Sequence[str], ready_timeout: float, end_timeout: float):
        self.launch_vm = launch_vm
        self.images = images
        self.image = image
        self.disks = list(disks)
        self.plan = list(plan)
        self.name = name
        self.kernel_args = list(kernel_args)
        self.ready_timeout = ready_timeout
        self.end_timeout = end_timeout
        paths = guest_devices(self.disks)
        self.topologies = {d.name: d.topology(images.folder) for d in self.disks}
        self.runs = {d.name: DiskRun(d, paths[d.name], self.topologies[d.name].image("source"),
                                     self.topologies[d.name].image("target"))
                     for d in self.disks}
        self.vm: Machine | None = None

    # ------------------------------------------------------------------ set-up
    def _make_images(self) -> None:
        for run in self.runs.values():
            self.images.create(run.source.name, IMAGE_SIZE, "raw")
            self.images.write(run.source, ORIGINAL, 0, IMAGE_SIZE, "raw")
            self.images.create(run.target.name, IMAGE_SIZE, "raw")

    def _devices(self) -> list[dict[str, Any]]:
        """Controllers first, then one device per disk, in the order of guest_devices()."""
        controllers: list[dict[str, Any]] = []
        devices: list[dict[str, Any]] = []
        for disk in self.disks:
            controller, dev = guest_device(disk.kind, disk.name,
                                           self.topologies[disk.name].device_node,
                                           werror=disk.werror, rerror=disk.rerror)
            if controller is not None:
                controllers.append(controller)
            devices.append(dev)
        return controllers + devices

    def _args(self) -> list[str]:
        initrd = self.image.initramfs({d.kind for d in self.disks})
        cmdline = guest_cmdline(self.plan, extra=self.kernel_args)
        # Machine(console=True) gives the serial line its own socket: no -serial here.
        boot = qemu_guest_args(self.image.kernel, initrd, cmdline, serial=None)
        # -S: the backup jobs start before the guest runs.
        args = ["-S", "-m", GUEST_MEMORY, *boot, "-action", "shutdown=pause"]
        for topology in self.topologies.values():
            for node in topology.image_nodes() + topology.filter_nodes():
                args += ["-blockdev", json.dumps(node)]
        for dev in self._devices():
            args += ["-device", json.dumps(dev)]
        return args

    def _start_backups(self) -> None:
        assert self.vm is not None
        for topology in self.topologies.values():
            args = topology.backup_args()
            if args is not None:
                self.vm.cmd("blockdev-backup", args)

    # ------------------------------------------------------------------ driving
    def _wait_ready(self, deadline: float) -> None:
        """Until the guest prints CBW-READY; a guest that ends or stalls first fails."""
        vm = self.vm
        assert vm is not None

        def ready_or_ended() -> str | None:
            if _READY in vm.console_text:
                return "ready"
            return "ended" if vm.events_named("SHUTDOWN") else None
        try:
            state = vm.wait_for(ready_or_ended, "the guest's CBW-READY line",
                                timeout=max(deadline - time.monotonic(), 0.001))
        except QEMUDied as exc:
            raise GuestError(f"QEMU exited before the guest was ready (CBW-READY): "
                             f"{exc.message}; its last output:\n{vm.log_tail()}",
                             vm.console_text) from None
        except WaitTimeout:
            raise GuestError(f"the guest was not ready (CBW-READY) within "
                             f"{self.ready_timeout:g} s", vm.console_text) from None
        if state == "ended":
            raise GuestError("the guest ended before it was ready (CBW-READY)",
                             vm.console_text)

    def _wait_end(self, deadline: float) -> dict[str, Any]:
        """Answer stop pauses until the guest ends; returns the SHUTDOWN event."""
        vm = self.vm
        assert vm is not None
        wanted: list[tuple[str, Mapping[str, Any] | None]] = [
            ("SHUTDOWN", None), ("BLOCK_IO_ERROR", {"action": "stop"})]
        while True:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise WaitTimeout("no time left")
                event = vm.wait_any_event(wanted, timeout=left)
            except WaitTimeout:
                raise GuestError(f"the guest did not finish its plan within "
                                 f"{self.end_timeout:g} s (QEMU status "
                                 f"{vm.cmd('query-status')['status']})", vm.console_text) from None
            if event["event"] == "SHUTDOWN":
                return event
            self._answer_stop(event)

    def _answer_stop(self, error: dict[str, Any]) -> None:
        assert self.vm is not None
        run = self._run_of(error)
        self.vm.wait_event("STOP", after=error)
        status = self.vm.cmd("query-status")["status"]
        answer = "cont"
        if len(run.stops) >= run.disk.stop_retries:
            if run.disk.layout is not Layout.BACKUP_SYNC_NONE or \
                    any(s.answer != "cont" for s in run.stops):
                raise HarnessError(f"disk {run.disk.name}: still stopping after {len(run.stops)} "
                                   f"resumes, with no copy-before-write left to end: "
                                   f"{error['data']}")
            self.vm.cmd("block-job-cancel", {"device": run.disk.job, "force": True})
            self.vm.wait_event("BLOCK_JOB_CANCELLED", {"device": run.disk.job})
            answer = "cancel-job+cont"
        run.stops.append(IoStop(run.disk.name, error["data"], status, answer))
        self.vm.cmd("cont")

    def _run_of(self, event: Mapping[str, Any]) -> DiskRun:
        """The disk a BLOCK_IO_ERROR is about: by qom-path, or where the event lacks it
        (QEMU 7.2) by the node the device wrote to."""
        data = event["data"]
        for run in self.runs.values():
            if "qom-path" in data:
                if data["qom-path"] == run.disk.qom_path:
                    return run
            elif data.get("node-name") in (run.disk.node("cbw"), run.disk.node("source")):
                return run
        raise HarnessError(f"BLOCK_IO_ERROR of an unknown device: {data}")

    def _checked(self, report: GuestReport) -> GuestReport:
        kernel = self.image.kernel
        if report.missing_devices and kernel.modules_dir is None:
            kinds = ", ".join(sorted({d.kind for d in self.disks}))
            raise GuestError(f"guest disks never appeared: {' '.join(report.missing_devices)}: "
                             f"kernel {kernel.version} was given without modules, so it needs "
                             f"its {kinds} drivers built in: give its modules directory "
                             "(--guest-modules)", report.log)
        return report.check()

    def _after_end(self) -> str:
        """Read what QMP can still tell once the guest is over; returns the run status."""
        assert self.vm is not None
        status = str(self.vm.cmd("query-status")["status"])
        jobs = {j["id"]: j["status"] for j in self.vm.cmd("query-jobs")}
        for run in self.runs.values():
            run.job_status = jobs.get(run.disk.job)
            if run.disk.layout is Layout.FLEECING:
                for off in GUEST_WRITES + UNTOUCHED:
                    run.snapshot_reads[off] = self.vm.qemu_io(
                        self.topologies[run.disk.name].snapshot_node,
                        f"read -P {ORIGINAL:#x} {off} {CHUNK}",
                        device=False)
        return status

    def run(self) -> GuestRun:
        self._make_images()
        args = self._args()
        t0 = time.monotonic()
        self.vm = vm = self.launch_vm(args, name=self.name, console=True)
        try:
            self._start_backups()
            vm.cmd("cont")
            self._wait_ready(t0 + self.ready_timeout)
            ready = time.monotonic()
            shutdown = self._wait_end(ready + self.end_timeout)
            end = time.monotonic()
            try:  # the last lines may still be in the console socket
                vm.wait_console(_END, timeout=2.0)
            except WaitTimeout:
                pass
            report = self._checked(parse_console(vm.console_text))
            status = self._after_end()
            for event in vm.events_named("BLOCK_IO_ERROR"):
                self._run_of(event).io_errors.append(event["data"])
            events = [e for e in vm.events if e["event"] in _KEPT_EVENTS]
        finally:
            vm.shutdown()  # the images are read offline next
        return GuestRun(report, self.runs, events, shutdown.get("data", {}), status,
                        ready - t0, end - t0)


def run_guest(launch_vm: Callable[..., Machine], images: Images, image: GuestImage,
              disks: Sequence[GuestDisk], plan: Sequence[Op], *, name: str = "guest",
              kernel_args: Sequence[str] = (), ready_timeout: float = READY_TIMEOUT,
              end_timeout: float = END_TIMEOUT) -> GuestRun:
    """Boot the guest on ``disks``, run ``plan``, and return what it and QMP saw.

    ``launch_vm`` is the pytest fixture (or any factory taking ``args, name=,
    console=``); QEMU is shut down on return, so the images can be read.
    ``kernel_args`` are added to the guest kernel's command line.  Raises
    :class:`GuestError` (with the console log) if the guest is not ready within
    ``ready_timeout`` s, does not end its plan within ``end_timeout`` s after that,
    panics, or prints something that is not the protocol.
    """
    return _Session(launch_vm, images, image, disks, plan, name=name, kernel_args=kernel_args,
                    ready_timeout=ready_timeout, end_timeout=end_timeout).run()


# ------------------------------------------------------------------------- bench

_bench_image: GuestImage | None = None


def bench_boot(build: QemuBuild, folder: Path) -> GuestRun:
    """Boot the guest once on one virtio-blk disk under a sync=none backup filter, with a
    one-read plan; returns when the guest is done (for ``bench/run.py``)."""
    global _bench_image
    if _bench_image is None:
        _bench_image = GuestImage.provision()
    disk = GuestDisk("bench")
    with launcher(build, folder) as launch:
        return run_guest(launch, Images(build, folder), _bench_image, [disk],
                         [Read(guest_devices([disk])["bench"], 0, CHUNK)], name="bench")
