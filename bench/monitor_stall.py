#!/usr/bin/env python3
"""How long QEMU's monitor takes to answer right after a copy-before-write timeout fired.

    python bench/monitor_stall.py [--rounds N] [--parallel P] [--load L] [--qemu-release R]

Each round builds the suite's cbw-timeout layout (fleecing, target behind a throttle,
``cbw-timeout=2``, ``on-cbw-error=break-snapshot``), writes a region whose copy needs
~30 % of the timeout, reads the snapshot, then writes one whose copy needs more than
three times the timeout: the timeout fires after 2 s and the copy goes on in the
background.  Then it times two ``query-status`` commands and one more guest write.

Seen with P=3 and L=2 on 2 cores (Nov 2026): on QEMU 11.1.3 in 2 and 4 rounds of 12
the first or second ``query-status`` took ~4.9 s (the rest of the background copy),
while normally it takes 1-25 ms; on 7.2.22 in 2 of 9 (not in 9 first answers on
10.0.13); the suite's cbw-timeout cases showed it as an HMP
``qemu-io`` answered ~5 s after a write that qemu-io timed at 0.01 s.  Without load it
does not show.  ``--load`` starts that many busy loops for the run's duration.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.block.images import Images
from harness.qemu import builds
from harness.qemu.machine import Machine
from harness.scenarios.cbw_timeout import (
    REGION_A,
    REGION_B,
    REGION_C,
    TimeoutFleecing,
    TimeoutPlan,
)


def one_round(build: builds.QemuBuild) -> str:
    with tempfile.TemporaryDirectory(prefix="cbw-stall-") as tmp:
        folder = Path(tmp)
        started: list[Machine] = []

        def launch(args: list[str], *, name: str = "vm", **kwargs: Any) -> Machine:
            vm = Machine(build, folder, name=name, args=args, **kwargs)
            started.append(vm)
            return vm.launch()
        plan = TimeoutPlan(2)
        f = TimeoutFleecing(launch, Images(build, folder), plan=plan,
                            on_cbw_error="break-snapshot", cbw_timeout=2)
        try:
            f.start()
            f.write("A", REGION_A, plan.under_size)
            f.read_snapshot("A", REGION_A, plan.under_size)
            over = f.write("B", REGION_B, plan.over_size)
            assert f.vm is not None
            answers = []
            for _ in range(2):
                t = time.monotonic()
                f.vm.cmd("query-status")
                answers.append(time.monotonic() - t)
            after = f.write("C", REGION_C, plan.over_size)
        finally:
            for vm in started:
                vm.shutdown()
    return (f"timed-out write {over.seconds:.2f} s; query-status {answers[0]:.3f} s, "
            f"{answers[1]:.3f} s; next write {after.seconds:.2f} s (qemu-io's own clock: "
            f"{after.result.elapsed})")


def busy(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4, help="rounds per parallel runner")
    ap.add_argument("--parallel", type=int, default=3, help="QEMUs running rounds at once")
    ap.add_argument("--load", type=int, default=2, help="busy loops beside them")
    ap.add_argument("--qemu-release", default=builds.DEFAULT_RELEASE)
    args = ap.parse_args()
    build = builds.select(release=args.qemu_release)
    print(f"QEMU {build.qemu_system}: {args.parallel} x {args.rounds} rounds, "
          f"{args.load} busy loops", flush=True)
    loads = [multiprocessing.Process(target=busy, args=(3600,), daemon=True)
             for _ in range(args.load)]
    for p in loads:
        p.start()
    try:
        with multiprocessing.Pool(args.parallel) as pool:
            for line in pool.imap_unordered(one_round, [build] * (args.rounds * args.parallel)):
                print(line, flush=True)
    finally:
        for p in loads:
            p.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
