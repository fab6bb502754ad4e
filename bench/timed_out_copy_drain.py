#!/usr/bin/env python3
"""What waits for a copy-before-write copy that outlived its ``cbw-timeout``.

    python bench/timed_out_copy_drain.py [--qemu-release R ...]

On the suite's cbw-timeout layout (fleecing, target behind a throttle, ``cbw-timeout=2``,
``on-cbw-error=break-snapshot``, a SCSI disk, QEMU paused with ``-S``) a guest write
whose copy needs ~6 s returns at the 2 s timeout and the copy goes on in the
background.  Then it times ``query-status`` (the monitor: answers at once) and
``system_reset``: resetting the disk drains it, and the drain waits for the timed-out
copy to finish, with the main loop (and the BQL) held.  A guest that resets or
otherwise drains its disk then would stall its vCPU and QMP as long.

Measured on 2 cores (Nov 2026), 11.1.3, 10.0.13 and 7.2.22 alike: the write returns
after 2.0 s, ``query-status`` after 1 ms, ``system_reset`` after 4.2 s (the rest of
the 6.2 s copy).  This is how the suite's cbw-timeout cases flaked until they ran
under ``-S``: SeaBIOS, running, reset the disk late under CPU load and stalled a
later write or command by ~5 s.  Nothing documents what a drain does with a
timed-out copy, so it is not recorded as a departure.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.block.images import Images
from harness.qemu import builds
from harness.qemu.machine import launcher
from harness.scenarios.cbw_timeout import REGION_B, TimeoutFleecing, TimeoutPlan


def measure(build: builds.QemuBuild) -> str:
    with tempfile.TemporaryDirectory(prefix="cbw-drain-") as tmp, \
            launcher(build, Path(tmp)) as launch:
        plan = TimeoutPlan(2)
        f = TimeoutFleecing(launch, Images(build, Path(tmp)), plan=plan,
                            on_cbw_error="break-snapshot", cbw_timeout=2)
        vm = f.start()
        over = f.write("B", REGION_B, plan.over_size)
        timed = {}
        for command in ("query-status", "system_reset"):
            t = time.monotonic()
            vm.cmd(command)
            timed[command] = time.monotonic() - t
    return (f"write {over.seconds:.2f} s (its copy needs "
            f"{plan.copy_seconds(plan.over_size):.1f} s); query-status "
            f"{timed['query-status']:.3f} s; system_reset {timed['system_reset']:.2f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qemu-release", nargs="+", default=[builds.DEFAULT_RELEASE])
    args = ap.parse_args()
    for release in args.qemu_release:
        build = builds.select(release=release)
        print(f"{release}: {measure(build)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
