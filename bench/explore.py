#!/usr/bin/env python3
"""Benchmark of the scenario explorer: examples per second on one QEMU.

    python bench/explore.py [--examples N] [--qemu-release R]

Runs N derandomised explorer examples (fleecing and backup sync=none, up to 10 steps
each, a fresh graph per example) on one QEMU and prints examples/s and steps/s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.explore.explorer import Tally
from harness.explore.rig import ExploreSession
from harness.explore.run import explorer_settings, run_examples
from harness.qemu import builds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=300)
    parser.add_argument("--qemu-release", default=builds.DEFAULT_RELEASE)
    args = parser.parse_args()
    build = builds.select(release=args.qemu_release)
    with tempfile.TemporaryDirectory(prefix="bench-explore-") as tmp:
        session = ExploreSession(build, Path(tmp))
        tally = Tally()
        start = time.perf_counter()
        try:
            run_examples(session, explorer_settings(args.examples, derandomize=True,
                                                    database=None), tally)
        finally:
            session.close()
        seconds = time.perf_counter() - start
    print(f"explorer on {build.qemu_system}: {tally.examples} examples, {tally.steps} steps "
          f"in {seconds:.1f}s: {tally.examples / seconds:.1f} examples/s, "
          f"{tally.steps / seconds:.0f} steps/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
