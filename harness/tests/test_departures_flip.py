"""A fixed QEMU flips every recorded departure: proof by simulation.

For each departure, a few of the suite's own tests that declare it run (an inner
pytest) against a build whose QEMU sits behind the proxy rule that makes it behave as
documented: each must fail as ``[XPASS(strict)] departure fixed: <name>``, while a
control test beside it still passes.  Against the real build the same tests XFAIL.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harness.qemu import builds, probe
from harness.simulate import make_build

pytestmark = pytest.mark.selftest

REPO = Path(__file__).resolve().parents[2]
CBW_BACKUP = "blockdev-backup.on-cbw-error"


@dataclass(frozen=True)
class Flip:
    departure: str
    tests: tuple[str, ...]      # tests declaring the departure
    controls: tuple[str, ...]   # tests beside them that must still pass when it is fixed
    real_release: str | None = None  # where it is seen, if not on the build under test
    slow: bool = False  # its fixed run waits out real timeouts or boots a guest: slow tier
    variant: str = ""   # tells apart two flips of one departure

    @property
    def id(self) -> str:
        return f"{self.departure}-{self.variant}" if self.variant else self.departure


FLIPS = (
    Flip("sync-full-broken-snapshot-completes",
         ("iotests/test_backup_sync_full.py::test_one_shot_fault[break-snapshot-target-write]",),
         ("iotests/test_backup_sync_full.py::test_control_without_fault[break-snapshot]",)),
    Flip("sync-none-broken-snapshot-runs-on",
         ("iotests/test_backup_sync_none.py::test_fault[break-snapshot-source-read-once]",),
         ("iotests/test_backup_sync_none.py::test_control_without_fault[break-snapshot]",)),
    Flip("sync-none-broken-snapshot-runs-on",
         ("iotests/test_guest_delivery.py::test_break_snapshot_ends_the_backup_job",), (),
         slow=True, variant="guest"),
    Flip("ignore-on-broken-snapshot-livelocks",
         ("iotests/test_livelock.py::test_ignored_read_error_on_broken_snapshot[full-speed]",),
         ("iotests/test_livelock.py::test_ignored_read_error_on_broken_snapshot"
          "[speed-limit]",)),
    Flip("cbw-timeout-wraps",
         ("iotests/test_cbw_timeout.py::test_timeout_boundary[omitted-5s]",), (),
         real_release="7.2", slow=True),
    Flip("snapshot-read-leaving-copied-cluster",
         ("iotests/test_request_shapes.py::test_snapshot_read_leaving_a_copied_cluster"
          "[omitted-unaligned-spanning-copied-and-not]",),
         ("iotests/test_request_shapes.py::test_snapshot_read_shape"
          "[omitted-no-fault-unaligned-from-uncopied-into-copied]",),
         real_release="7.2"),
    Flip("snapshot-discard-unaligned-aborts",
         ("iotests/test_snapshot_readers.py::test_discard_on_the_snapshot[unaligned]",),
         ("iotests/test_snapshot_readers.py::test_discard_on_the_snapshot[aligned]",),
         real_release="7.2"),
    Flip("fleecing-export-follows-backup-filter",
         ("iotests/test_job_interplay.py::test_fleecing_export_and_backup_job_on_one_disk"
          "[backup-on-the-fleecing-filter-no-fault]",),
         ("iotests/test_job_interplay.py::test_fleecing_export_and_backup_job_on_one_disk"
          "[backup-below-the-fleecing-filter-no-fault]",)),
)


def run_suite(tmp: Path, build: Path | builds.QemuBuild, tests: tuple[str, ...], *args: str
              ) -> subprocess.CompletedProcess[str]:
    """The suite's ``tests`` against a build directory or a chosen build, in a new pytest."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTEST_XDIST_WORKER", "PYTEST_ADDOPTS", "QEMU_PROG", "QEMU_IMG_PROG",
                        "QEMU_IO_PROG")}
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rxXf",
            "--artifacts", str(tmp / "artifacts"), *_build_args(build), *args, *tests]
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _build_args(build: Path | builds.QemuBuild) -> list[str]:
    if isinstance(build, Path):
        return ["--qemu-build", str(build)]
    return ["--qemu-prog", str(build.qemu_system), "--qemu-img-prog", str(build.qemu_img),
            "--qemu-io-prog", str(build.qemu_io)]


def _builds(flip: Flip, qemu_build: builds.QemuBuild, info: probe.BuildInfo
            ) -> tuple[builds.QemuBuild, Path | builds.QemuBuild]:
    """(the build to put behind the fix, the real build where the departure shows)."""
    if flip.real_release is not None:  # fixed upstream: a later release plays the fixed one
        later = builds.select(release=builds.DEFAULT_RELEASE)
        return later, builds.provision(flip.real_release)
    if not info.has(CBW_BACKUP) and flip.departure.startswith("sync-"):
        pytest.skip(f"build lacks capability {CBW_BACKUP!r}")
    return qemu_build, qemu_build


def _tiered(flip: Flip) -> Any:
    return pytest.param(flip, id=flip.id, marks=[pytest.mark.slow] if flip.slow else [])


@pytest.mark.parametrize("flip", [_tiered(f) for f in FLIPS])
def test_fixed_qemu_flips_the_departure(tmp_path, qemu_build, build_info, flip):
    base, _ = _builds(flip, qemu_build, build_info)
    fixed = make_build(tmp_path / "fixed", base, [flip.departure])
    result = run_suite(tmp_path, fixed, flip.tests + flip.controls)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    for test in flip.tests:
        assert f"FAILED {test}" in out, out
    assert out.count(f"[XPASS(strict)] departure fixed: {flip.departure}: ") >= len(flip.tests)
    tally = f"{len(flip.tests)} failed" + (f", {len(flip.controls)} passed"
                                           if flip.controls else "")
    assert f"= {tally} in " in out, out
    assert f"{flip.departure} on QEMU" in out and "FIXED (strict XPASS)" in out


# Each runs the release the departure is seen on (7.2), beside the build under test: the
# slow tier, with the matrix.  (The build under test's own departures show in the suite.)
@pytest.mark.slow
@pytest.mark.parametrize("flip", [f for f in FLIPS if f.real_release is not None],
                         ids=lambda f: f.id)
def test_real_qemu_shows_the_departure(tmp_path, qemu_build, build_info, flip):
    """The departures seen on another release show there.  (Those of the build under
    test show in the suite's own run beside this one: each is a strict xfail there.)"""
    _, real = _builds(flip, qemu_build, build_info)
    result = run_suite(tmp_path, real, flip.tests)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    for test in flip.tests:
        assert f"XFAIL {test} - departure {flip.departure}: " in out, out


def test_proxy_without_rules_changes_nothing(tmp_path, qemu_build, build_info):
    if not build_info.has(CBW_BACKUP):
        pytest.skip(f"build lacks capability {CBW_BACKUP!r}")
    plain = make_build(tmp_path / "plain", qemu_build, [])
    tests = ("iotests/test_backup_sync_full.py::test_control_without_fault[break-snapshot]",
             FLIPS[0].tests[0])
    result = run_suite(tmp_path, plain, tests)
    assert result.returncode == 0, result.stdout
    assert "= 1 passed, 1 xfailed in " in result.stdout, result.stdout


def test_regression_rule_fails_the_suite(tmp_path, qemu_build, build_info):
    if not build_info.has(CBW_BACKUP):
        pytest.skip(f"build lacks capability {CBW_BACKUP!r}")
    broken = make_build(tmp_path / "broken", qemu_build, ["regression-swap-on-cbw-error"])
    test = ("iotests/test_backup_sync_full.py::test_one_shot_fault"
            "[break-guest-write-target-write]")
    result = run_suite(tmp_path, broken, (test,))
    assert result.returncode == 1, result.stdout
    assert "guest write at 1048576: expected 'Input/output error'" in result.stdout


@pytest.mark.slow  # two runs that each wait out the 2 s of silence of a livelock
def test_runxfail_bisects_on_the_livelock_bounded(tmp_path, qemu_build):
    """--runxfail: the departure is a plain failure on the real build (the harness kills
    the livelocked QEMU in seconds) and a plain pass on the fixed one."""
    livelock = next(f for f in FLIPS if f.departure == "ignore-on-broken-snapshot-livelocks")
    test = livelock.tests
    start = time.monotonic()
    real = run_suite(tmp_path, qemu_build, test, "--runxfail")
    assert time.monotonic() - start < 60, "the livelocked QEMU was not ended in time"
    assert real.returncode == 1, real.stdout
    assert "QEMUUnresponsive" in real.stdout
    fixed = make_build(tmp_path / "fixed", qemu_build, [livelock.departure])
    good = run_suite(tmp_path, fixed, test, "--runxfail")
    assert good.returncode == 0, good.stdout
