"""Simulated QEMU builds: a real build behind the QMP-rewriting proxy.

``python -m harness.simulate build OUTDIR --fix NAME ...`` writes a build directory
whose ``qemu-system-x86_64`` runs the real one behind :mod:`harness.qemu.qmp_proxy`
with the named rules; ``qemu-img`` and ``qemu-io`` run the real ones.  Point the
suite at it like at any build (``--qemu-build OUTDIR``), a build matrix, or a
bisect script.  ``--fix all`` fixes every recorded departure;
``--regression regression-swap-on-cbw-error`` makes a build that breaks.
``python -m harness.simulate rules`` lists the rules.
"""

from __future__ import annotations

import argparse
import json
import shlex
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import HarnessError
from .qemu import builds
from .qemu.qmp_proxy import RULES
from .scenarios.departures import DEPARTURES

REPO = Path(__file__).resolve().parents[1]
CONFIG = "cbw-proxy.json"
REGRESSIONS = tuple(name for name in RULES if name.startswith("regression-"))


def fix_rules(names: Sequence[str]) -> list[str]:
    """The proxy rules that fix these departures (``all``: every recorded one)."""
    wanted = [d.name for d in DEPARTURES] if "all" in names else list(names)
    for name in wanted:
        if name not in RULES or name in REGRESSIONS:
            raise HarnessError(f"--fix {name}: no such departure; choose from "
                               f"{', '.join(d.name for d in DEPARTURES)} or all")
    return wanted


def _script(path: Path, text: str) -> None:
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def make_build(outdir: Path | str, real: builds.QemuBuild, rules: Sequence[str]) -> Path:
    """Write the simulated build directory; returns it."""
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        raise HarnessError(f"unknown proxy rules {unknown}; known: {', '.join(RULES)}")
    out = Path(outdir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    config = out / CONFIG
    config.write_text(json.dumps({"qemu": str(real.qemu_system), "rules": list(rules)},
                                 indent=1) + "\n")
    # A wrapper script, not a symlink: Debian's wrappers find their prefix from $0.
    for tool, path in (("qemu-img", real.qemu_img), ("qemu-io", real.qemu_io)):
        _script(out / tool, f'exec {shlex.quote(str(path))} "$@"\n')
    _script(out / "qemu-system-x86_64",
            f"# {real.qemu_system} behind the QMP proxy, rules: {', '.join(rules) or 'none'}\n"
            f'PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}} '
            f'exec {shlex.quote(sys.executable)} -m harness.qemu.qmp_proxy '
            f'{shlex.quote(str(config))} -- "$@"\n')
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.simulate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("rules", help="list the proxy's rules")
    b = sub.add_parser("build", help="write a simulated build directory")
    b.add_argument("outdir", type=Path)
    b.add_argument("--fix", action="append", default=[], metavar="DEPARTURE",
                   help="make QEMU behave as documented where it departs ('all': every one)")
    b.add_argument("--regression", action="append", default=[], choices=REGRESSIONS,
                   help="break QEMU on purpose")
    b.add_argument("--qemu-build", metavar="DIR", help="the real build (default: as the "
                   "suite chooses: QEMU_PROG, --qemu-release, the default release)")
    b.add_argument("--qemu-prog", metavar="PATH")
    b.add_argument("--qemu-release", metavar="NAME")
    args = parser.parse_args(argv)
    if args.command == "rules":
        for name, rule in RULES.items():
            print(f"{name}: {(rule.__doc__ or '').split(chr(10))[0]}")
        return 0
    try:
        real = builds.select(qemu_build=args.qemu_build, qemu_prog=args.qemu_prog,
                             release=args.qemu_release)
        out = make_build(args.outdir, real, fix_rules(args.fix) + args.regression)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
