"""``bisect-step``: one step of ``git bisect run``, with exit codes bisect understands.

0 good, 1 bad, 125 skip (the build failed; the build lacks a capability the selected
tests need; nothing selected ran; an infrastructure failure that persisted after the
retries), 128 only for a misconfigured harness.  Departures count as failures
(``--runxfail``); ``--find-fix`` swaps good and bad.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..plugin.results import RESULTS_FILE
from .buildspec import QEMU_SYSTEM, BuildSpec
from .runs import Run, finish, start

GOOD, BAD, SKIP, MISCONFIGURED = 0, 1, 125, 128


@dataclass
class Verdict:
    code: int
    outcomes: str
    why: str


def commit_id(cwd: Path) -> str:
    proc = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=cwd,
                          capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "not-a-git-tree"


def build(cmd: str | None, cwd: Path) -> tuple[bool, str]:
    """Run the build command; (succeeded, one line)."""
    if cmd is None:
        return True, "build: not asked"
    t0 = time.monotonic()
    proc = subprocess.run(cmd, shell=True, cwd=cwd, capture_output=True, text=True)
    secs = time.monotonic() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        return False, (f"build failed (exit {proc.returncode}, {secs:.0f} s): "
                       f"{tail[-1] if tail else 'no output'}")
    return True, f"build ok ({secs:.0f} s)"


def judge(run: Run, find_fix: bool) -> Verdict:
    """The verdict of one run; ``code`` None-free: infrastructure trouble is SKIP with
    ``why`` starting 'infrastructure'."""
    if run.results is None:
        return Verdict(SKIP, "no results", f"infrastructure: {run.failure}")
    tests = run.results["tests"]
    counts = run.results["counts"]
    outcomes = ", ".join(f"{n} {k}" for k, n in counts.items() if n) or "nothing ran"
    errors = [(n, t) for n, t in tests.items() if t["outcome"] == "error"]
    if errors:
        return Verdict(SKIP, outcomes, f"infrastructure: {errors[0][0]}: {errors[0][1]['reason']}")
    failed = [(n, t) for n, t in tests.items() if t["outcome"] in ("failed", "xpassed")]
    if failed:
        nodeid, t = failed[0]
        code = GOOD if find_fix else BAD
        word = "still broken" if find_fix else "bad"
        return Verdict(code, outcomes, f"{word}: {nodeid}: {t['reason']}")
    passed = [n for n, t in tests.items() if t["outcome"] in ("passed", "xfailed")]
    if not passed:
        skips = [t["reason"] for t in tests.values() if t["outcome"] == "skipped"]
        lacking = [r for r in skips if "lacks capability" in r]
        if lacking:
            return Verdict(SKIP, outcomes, f"skip: {lacking[0]}")
        return Verdict(SKIP, outcomes, "skip: nothing selected ran"
                       + (f" ({skips[0]})" if skips else ""))
    code = BAD if find_fix else GOOD
    word = "fixed" if find_fix else "good"
    return Verdict(code, outcomes, f"{word}: {len(passed)} selected tests pass")


def step(*, build_cmd: str | None, build_dir: Path, find_fix: bool, retries: int,
         pytest_args: Sequence[str], artifacts: Path, cwd: Path) -> int:
    commit = commit_id(cwd)

    def say(msg: str) -> None:
        print(f"bisect-step {commit}: {msg}", flush=True)

    ok, build_line = build(build_cmd, cwd)
    if not ok:
        say(f"{build_line}; verdict skip (125)")
        return SKIP
    qemu = next((p for p in (build_dir / QEMU_SYSTEM, build_dir / "bin" / QEMU_SYSTEM)
                 if p.is_file()), None)
    if qemu is None:
        say(f"{build_line}, but {build_dir} has no {QEMU_SYSTEM}; verdict skip (125)")
        return SKIP
    spec = BuildSpec(commit, "dir", str(build_dir.resolve()))
    verdict = Verdict(SKIP, "", "")
    for attempt in range(retries + 1):
        folder = artifacts / commit
        proc, t0 = start(spec, folder, pytest_args, workers=1, extra=("--runxfail",))
        verdict = judge(finish(spec, folder, proc, t0), find_fix)
        if not verdict.why.startswith("infrastructure"):
            break
        if attempt < retries:
            say(f"{build_line}; {verdict.why}; retrying ({attempt + 1}/{retries})")
    names = {GOOD: "good", BAD: "bad", SKIP: "skip"}
    if find_fix:
        names = {GOOD: "good (old: broken)", BAD: "bad (new: fixed)", SKIP: "skip"}
    say(f"{build_line}; {verdict.outcomes}; verdict {names[verdict.code]} ({verdict.code}): "
        f"{verdict.why}" + ("" if verdict.code == SKIP else
                           f"; results in {artifacts / commit}"))
    return verdict.code


def boundary(repo: Path, artifacts: Path) -> tuple[Path, Path]:
    """The saved runs of the last good and the first bad commit of a finished bisect
    (in --find-fix terms: the last broken and the first fixed)."""
    proc = subprocess.run(["git", "bisect", "log"], cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConfigError(f"no bisect in progress in {repo}: run git bisect run first")
    first = re.search(r"^# first (\S+) commit: \[([0-9a-f]+)\]", proc.stdout, re.M)
    if first is None:
        raise ConfigError("git bisect log names no first bad commit yet: let the bisect finish")
    new_term, first_bad = first.group(1), first.group(2)
    marks = re.findall(r"^git bisect (\S+) ([0-9a-f]+)$", proc.stdout, re.M)
    olds = [sha for term, sha in marks if term not in (new_term, "skip", "start")]
    steps = {p.name: p for p in artifacts.glob("*") if (p / RESULTS_FILE).exists()}

    def found(sha: str) -> Path | None:
        return next((p for name, p in steps.items() if sha.startswith(name)), None)

    bad = found(first_bad)
    good = next((p for sha in reversed(olds) if (p := found(sha)) is not None), None)
    if bad is None or good is None:
        raise ConfigError(f"no saved runs of both sides of the boundary in {artifacts}: "
                          "pass bisect-step's --artifacts folder")
    return good, bad


def main_error(message: str) -> int:
    print(f"bisect-step: {message}", file=sys.stderr)
    return MISCONFIGURED
