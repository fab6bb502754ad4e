"""``python -m harness matrix|diff|bisect-step|releases``: the command lines across builds."""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from ..errors import HarnessError
from ..plugin.results import RESULTS_FILE
from . import bisect, diff, report
from .buildspec import parse_all
from .runs import Run, fresh_folder, load_saved, run_all

DEFAULT_SELECTION = ("iotests",)
TROUBLE = 2


def _absolute(path: str) -> Path:
    return Path(path).expanduser().resolve()


def _split(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Our arguments, and pytest's after ``--``."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def _workers(n_builds: int) -> int:
    """xdist workers per build: builds run side by side, sharing the cores (the suite
    mostly waits on throttled I/O and timeouts, so two per core keep them busy)."""
    return max(1, -(-2 * (os.cpu_count() or 1) // max(1, n_builds)))


def _matrix(args: argparse.Namespace, selection: list[str]) -> int:
    if args.first_change and not args.builds:
        from ..qemu import releases
        args.builds = releases.ordered_names(releases.discover())
    specs = parse_all(args.builds)
    out = fresh_folder(Path(args.out), args.overwrite)
    at_once = args.at_once or len(specs)
    workers = args.workers or _workers(at_once)
    runs = run_all(specs, out, selection, workers, at_once)
    rep = report.write_all(runs, selection, out)
    print(f"matrix of {len(runs)} builds x {len(rep['tests'])} tests: {out}/report.md, "
          f"report.html, report.json, junit-<build>.xml")
    for run in runs:
        print(f"  {run.name}: " + (f"QEMU {run.build['version']}, " +
              ", ".join(f"{n} {k}" for k, n in run.results["counts"].items() if n)
              if run.results else f"could not run: {run.failure}"))
    print(f"  tests whose outcome differs across builds: {len(report.differing(rep))}")
    if args.first_change:
        return _first_change(runs)
    return 0


def _first_change(runs: list[Run]) -> int:
    """The first build, in the given order, that behaves differently from the one before."""
    usable = [r for r in runs if r.results is not None]
    for before, after in itertools.pairwise(usable):
        d = diff.compare(before, after)
        if not d.empty:
            print(f"\nfirst change: {after.name} behaves differently from {before.name}\n")
            print(diff.render(d))
            return 1
    print(f"\nno change across {', '.join(r.name for r in usable)}")
    return 0


def _saved_run(text: str) -> Run | None:
    """The saved run ``text`` names (a run folder or its JSON), or None for a build."""
    p = Path(text).expanduser()
    if p.is_file() or (p.is_dir() and (p / RESULTS_FILE).exists()):
        return load_saved(p)
    return None


def _diff(args: argparse.Namespace, selection: list[str]) -> int:
    out = Path(args.out)
    saved = {t: _saved_run(t) for t in (args.a, args.b)}
    to_run = [t for t, r in saved.items() if r is None]
    runs: dict[str, Run] = {t: r for t, r in saved.items() if r is not None}
    if to_run:
        specs = parse_all(to_run)
        folder = fresh_folder(out, args.overwrite)
        for spec, run in zip(specs, run_all(specs, folder, selection or list(
                DEFAULT_SELECTION), _workers(len(specs)), len(specs))):
            if run.results is None:
                raise HarnessError(f"build {spec.name} could not run: {run.failure}")
            runs[to_run[specs.index(spec)]] = run
    d = diff.compare(runs[args.a], runs[args.b])
    print(diff.render(d))
    return 0 if d.empty else 1


class _BisectParser(argparse.ArgumentParser):
    """Bad options exit 128: git bisect run aborts instead of marking the commit."""

    def error(self, message: str) -> NoReturn:
        sys.exit(bisect.main_error(message))


def _report(args: argparse.Namespace) -> int:
    merged: dict[str, Run] = {}
    for text in args.runs:
        run = load_saved(Path(text))
        if run.name in merged:  # another part of the same build's suite
            into = merged[run.name]
            assert into.results is not None and run.results is not None
            into.results["tests"].update(run.results["tests"])
            for k, n in run.results["counts"].items():
                into.results["counts"][k] = into.results["counts"].get(k, 0) + n
        else:
            merged[run.name] = run
    out = fresh_folder(args.out, args.overwrite)
    rep = report.write_all(list(merged.values()), [], out)
    print(f"report of {len(merged)} builds x {len(rep['tests'])} tests: {out}/report.md")
    return 0


def _bisect(argv: Sequence[str]) -> int:
    ours, pytest_args = _split(argv)
    parser = _BisectParser(prog="python -m harness bisect-step",
                                     description=bisect.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build-cmd", metavar="CMD", help="shell command that builds")
    parser.add_argument("--build-dir", metavar="DIR", default="build",
                        help="the build directory to test (default: ./build)")
    parser.add_argument("--find-fix", action="store_true",
                        help="look for the fix: failing is 'old', passing is 'new'")
    parser.add_argument("--retries", type=int, default=1, metavar="N",
                        help="re-runs after an infrastructure failure (default 1)")
    parser.add_argument("--artifacts", default="artifacts/bisect", metavar="DIR",
                        help="each step's results, in a folder per commit")
    args = parser.parse_args(ours)
    if args.retries < 0:
        return bisect.main_error("--retries must be 0 or more")
    if not pytest_args:
        return bisect.main_error("no tests selected: add -- and the pytest selection "
                                 "(e.g. -- iotests/test_fleecing.py -k break-snapshot)")
    return bisect.step(build_cmd=args.build_cmd, build_dir=Path(args.build_dir),
                       find_fix=args.find_fix, retries=args.retries, pytest_args=pytest_args,
                       artifacts=Path(args.artifacts).resolve(), cwd=Path.cwd())


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    # Unwinds like Ctrl-C, so that the runs' pytest processes are ended too.
    sys.exit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if argv[:1] == ["bisect-step"]:
        try:
            return _bisect(argv[1:])
        except HarnessError as exc:
            return bisect.main_error(str(exc))
    ours, selection = _split(argv)
    parser = argparse.ArgumentParser(prog="python -m harness")
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("matrix", help="run the suite (or a selection) against each build")
    m.add_argument("builds", nargs="*", help="release names, build directories, qemu-system "
                   "paths, or NAME=any of those")
    m.add_argument("--out", default="artifacts/matrix", type=_absolute, help="report folder")
    m.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run there (default: move it aside)")
    m.add_argument("--workers", type=int, help="xdist workers per build")
    m.add_argument("--at-once", type=int, help="builds run side by side (default: all)")
    m.add_argument("--first-change", action="store_true",
                   help="which build, in the given order (default: every release the "
                        "archive serves, oldest first), first behaves differently")
    d = sub.add_parser("diff", help="what behaves differently between two builds or runs")
    d.add_argument("a", help="a build (as for matrix) or a saved run (folder or results.json)")
    d.add_argument("b")
    d.add_argument("--out", default="artifacts/diff", type=_absolute,
                   help="where runs of builds go")
    d.add_argument("--overwrite", action="store_true")
    r = sub.add_parser("report", help="one matrix report from saved runs (CI jobs' parts "
                       "of the suite merge per build)")
    r.add_argument("runs", nargs="+", help="run folders or their results.json")
    r.add_argument("--out", default="artifacts/matrix", type=_absolute)
    r.add_argument("--overwrite", action="store_true")
    bd = sub.add_parser("bisect-diff", help="after git bisect run: the first bad commit's "
                        "run beside the last good one's")
    bd.add_argument("--artifacts", default="artifacts/bisect", type=_absolute,
                    help="where bisect-step kept each step's results")
    sub.add_parser("releases", help="the QEMU releases Debian's archive serves")
    sub.add_parser("bisect-step", help="one step of git bisect run (see bisect-step -h)")
    args = parser.parse_args(ours)
    try:
        if args.command == "matrix":
            return _matrix(args, selection or list(DEFAULT_SELECTION))
        if args.command == "diff":
            return _diff(args, selection)
        if args.command == "report":
            return _report(args)
        if args.command == "bisect-diff":
            last_good, first_bad = bisect.boundary(Path.cwd(), args.artifacts)
            change = diff.compare(load_saved(last_good), load_saved(first_bad))
            print(f"last good: {last_good.name}, first bad: {first_bad.name}")
            print(diff.render(change))
            return 0 if change.empty else 1
        from ..qemu import releases
        print(releases.describe(releases.discover()))
        return 0
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return TROUBLE
