"""python -m harness.explore [--budget 600] [--qemu-build DIR | --qemu-release R | ...]

Explores copy-before-write sequences against a real QEMU for a time budget, printing
a progress line per batch, and ends with the findings: each with its reproducer
(``replay.py`` case) and the known departure it matches, if any.  Exit status: 0 if
nothing new was found, 1 if something was, 2 on a usage or set-up error.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..errors import HarnessError
from ..qemu import builds
from ..qemu.cache import cache_root
from .run import Report, default_database, explore


def budget_seconds(text: str) -> float:
    """``600``, ``600s``, ``10m``: the budget in seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([sm]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"budget {text!r}: use seconds (600, 600s) or "
                                         f"minutes (10m)")
    return float(m.group(1)) * (60 if m.group(2) == "m" else 1)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m harness.explore", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=budget_seconds, default=600.0,
                        help="how long to explore (600, 600s, 10m; default 600s)")
    parser.add_argument("--qemu-build", help="a QEMU build directory")
    parser.add_argument("--qemu-prog", help="a qemu-system-x86_64 binary")
    parser.add_argument("--qemu-img-prog")
    parser.add_argument("--qemu-io-prog")
    parser.add_argument("--qemu-release", help="a provisioned release (11.1, 10.0, 7.2)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where findings go (default artifacts/explore/<time>)")
    parser.add_argument("--no-database", action="store_true",
                        help="neither replay nor keep examples in <cache>/explore-db")
    return parser.parse_args(argv)


def print_report(report: Report) -> None:
    print(f"\n{report.examples} examples ({report.steps} steps) in {report.seconds:.0f}s: "
          f"{report.rate:.1f} examples/s")
    if report.unknown:
        print(f"{report.unknown} examples stopped being checked where the model cannot tell "
              f"(QEMU's order of concurrent requests)")
    for name, count in sorted(report.known.items()):
        print(f"known departure met {count}x: {name}")
    if not report.findings:
        print("no new finding")
    for number, finding in enumerate(report.findings, 1):
        known = finding.known_departure
        print(f"\nfinding {number} ({f'known departure {known}' if known else 'new'}):")
        print("  " + finding.message.replace("\n", "\n  "))
        if finding.reproducer is not None:
            print(f"  reproducer: python3 {finding.reproducer.parent / 'replay.py'} "
                  f"QEMU-SYSTEM --case {finding.reproducer.name}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or Path("artifacts/explore") / time.strftime("%Y%m%d-%H%M%S")
    try:
        build = builds.select(qemu_build=args.qemu_build, qemu_prog=args.qemu_prog,
                              qemu_img_prog=args.qemu_img_prog, qemu_io_prog=args.qemu_io_prog,
                              release=args.qemu_release)
        database = None if args.no_database else default_database(cache_root())
        print(f"exploring {build.qemu_system} for {args.budget:.0f}s; findings in {out}",
              flush=True)
        report = explore(build, out.absolute(), budget=args.budget, database=database,
                         progress=lambda line: print(line, flush=True))
    except HarnessError as exc:
        print(f"python -m harness.explore: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print_report(report)
    return 1 if any(f.known_departure is None for f in report.findings) else 0


if __name__ == "__main__":
    sys.exit(main())
