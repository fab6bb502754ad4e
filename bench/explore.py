#!/usr/bin/env python3
"""Benchmark of the scenario explorer: examples per second on one QEMU, per layout.

    python bench/explore.py [--examples N] [--qemu-release R] [--seed S]

For each layout the explorer draws (fleecing, push from the snapshot, backup sync=none,
backup sync=full), runs N examples (up to 10 steps each, a fresh graph per example,
random drawing with a fixed seed) on one QEMU and prints examples/s and steps/s, then
the same for all layouts drawn together.  Examples that livelock QEMU (the push backup's
recorded departure) cost the 2 s the explorer waits for a reply, and a new QEMU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.explore.explorer import Focus, Tally
from harness.explore.rig import LAYOUTS, ExploreSession
from harness.explore.run import explorer_settings, run_examples
from harness.qemu import builds


def measure(build: builds.QemuBuild, examples: int, seed: int, focus: Focus) -> str:
    with tempfile.TemporaryDirectory(prefix="bench-explore-") as tmp:
        session = ExploreSession(build, Path(tmp))
        tally = Tally()
        start = time.perf_counter()
        try:
            run_examples(session, explorer_settings(examples, derandomize=False,
                                                    database=None), tally,
                         focus=focus, seed=seed)
        finally:
            session.close()
        seconds = time.perf_counter() - start
    known = Counter(k.departure for k in tally.known)
    return (f"{tally.examples:4d} examples, {tally.steps:5d} steps in {seconds:5.1f}s: "
            f"{tally.examples / seconds:5.1f} examples/s, {tally.steps / seconds:4.0f} steps/s"
            f"; QEMU launches {session.launches}; known departures met: "
            f"{dict(known) or 'none'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--qemu-release", default=builds.DEFAULT_RELEASE)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    build = builds.select(release=args.qemu_release)
    print(f"explorer on {build.qemu_system}")
    for layout in LAYOUTS:
        line = measure(build, args.examples, args.seed, Focus((layout,)))
        print(f"{layout.value:20s} {line}", flush=True)
    print(f"{'all layouts':20s} {measure(build, args.examples, args.seed, Focus())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
