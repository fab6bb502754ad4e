#!/usr/bin/env python3
"""Benchmark: the matrix of three builds against one build, over the non-guest suite.

    python bench/matrix.py [--builds 7.2 10.0 11.1] [--out DIR] [-- SELECTION...]

The single build runs as ``make run`` does (pytest -n 2, the last build given); the
matrix runs every build side by side (``python -m harness matrix``).  The goal: the
matrix takes at most 2x the single build's wall time.  Results go to stdout and to
bench/matrix-results.json, with the load average (other work on the machine skews it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SELECTION = ["iotests", "-m", "not guest"]


def timed(argv: list[str]) -> tuple[float, int]:
    t0 = time.monotonic()
    code = subprocess.run(argv, cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode
    return time.monotonic() - t0, code


def main() -> int:
    argv = sys.argv[1:]
    selection = DEFAULT_SELECTION
    if "--" in argv:
        selection = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--builds", nargs="+", default=["7.2", "10.0", "11.1"])
    parser.add_argument("--out", default=None, help="keep the runs and the report here")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="cbw-bench-matrix-"))
    load_before = os.getloadavg()[0]
    single, single_code = timed([sys.executable, "-m", "pytest", "-q", "-n", "2",
                                 "--qemu-release", args.builds[-1], "--artifacts",
                                 str(out / "single"), *selection])
    matrix, matrix_code = timed([sys.executable, "-m", "harness", "matrix", *args.builds,
                                 "--out", str(out / "matrix"), "--overwrite", "--",
                                 *selection])
    load_after = os.getloadavg()[0]
    result = {"builds": args.builds, "selection": selection, "cores": os.cpu_count(),
              "single_build_s": round(single, 1), "single_exit": single_code,
              "matrix_s": round(matrix, 1), "matrix_exit": matrix_code,
              "ratio": round(matrix / single, 2), "goal_ratio": 2.0,
              "load_before": round(load_before, 2), "load_after": round(load_after, 2),
              "report": str(out / "matrix")}
    print(f"single build ({args.builds[-1]}, pytest -n 2): {single:.0f} s "
          f"(exit {single_code})")
    print(f"matrix of {len(args.builds)} builds side by side: {matrix:.0f} s "
          f"(exit {matrix_code}) = {matrix / single:.2f}x (goal <= 2x) on "
          f"{os.cpu_count()} cores, load average {load_before:.1f} -> {load_after:.1f}")
    (ROOT / "bench/matrix-results.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
