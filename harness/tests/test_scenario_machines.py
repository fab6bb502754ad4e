"""The scenarios' two machines for a guest disk, ``pc`` (virtio-scsi-pci) and ``microvm``
(virtio-scsi-device on virtio-mmio, where the build has it: the suite's choice for
speed), against real QEMU: the same scenario gives the same observation on both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from harness.block.images import Images
from harness.scenarios.cbw import Fault, Layout, Scenario, ScenarioSpec, run

pytestmark = pytest.mark.selftest


def observed(launch_vm: Any, build: Any, folder: Path, microvm: bool) -> tuple[str, Any]:
    """(the machine type QEMU ran, the verdicts of what the scenario saw)."""
    folder.mkdir()
    spec = ScenarioSpec(Layout.BACKUP_SYNC_NONE, on_cbw_error="break-guest-write",
                        fault=Fault("target-write", once=True))
    s = Scenario(launch_vm, Images(build, folder), spec, microvm=microvm,
                 name="microvm" if microvm else "pc")
    obs = run(s)
    assert s.vm is not None
    machine = s.vm.cmdline[s.vm.cmdline.index("-machine") + 1]
    job = obs.ended_job
    return machine, {
        "guest writes": {o: r.error for o, r in obs.guest_writes.items()},
        "job": (job.end, job.error, [e.get("operation") for e in job.errors]),
        "source new": obs.source_holds_new, "source old": obs.source_holds_original,
        "backup old": obs.backup_holds_original,
        "point in time": obs.backup_is_point_in_time}


def test_microvm_and_pc_see_the_same(launch_vm, qemu_build, build_info, workdir):
    if not build_info.has("machine.microvm"):
        pytest.skip("build lacks capability 'machine.microvm'")
    pc, on_pc = observed(launch_vm, qemu_build, workdir / "pc", microvm=False)
    micro, on_microvm = observed(launch_vm, qemu_build, workdir / "microvm", microvm=True)
    assert (pc, micro) == ("pc", "microvm")
    assert "Input/output error" in on_pc["guest writes"].values(), on_pc  # the fault met
    assert on_pc == on_microvm
