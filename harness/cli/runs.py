"""One pytest run per build, in a subprocess, and the results it leaves behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..plugin.results import RESULTS_FILE, RESULTS_FORMAT, harness_version
from .buildspec import BuildSpec, clean_env

LOG_FILE = "pytest.log"


@dataclass
class Run:
    """A finished run: its results, or why the build never got to run tests."""

    name: str
    folder: Path
    results: dict[str, Any] | None = None
    failure: str = ""          # one line, when results is None
    returncode: int = 0
    seconds: float = 0.0
    build: dict[str, Any] = field(default_factory=dict)

    @property
    def tests(self) -> dict[str, dict[str, Any]]:
        return dict(self.results["tests"]) if self.results else {}


def startup_failure(log: str, returncode: int) -> str:
    """The one line pytest printed about a build it could not use."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for line in reversed(lines):
        if line.startswith("ERROR:"):
            return line.removeprefix("ERROR:").strip()
        if line.startswith("! _pytest.outcomes.Exit:"):  # the plugin's pytest.exit()
            return line.removeprefix("! _pytest.outcomes.Exit:").strip(" !")
    tail = lines[-1] if lines else "no output"
    return f"pytest exited {returncode} without results: {tail}"


# Selections name the suite's files relative to the harness's checkout.
HARNESS_ROOT = Path(__file__).resolve().parents[2]


def start(spec: BuildSpec, folder: Path, selection: Sequence[str], workers: int,
          extra: Sequence[str] = ()) -> tuple[subprocess.Popen[bytes], float]:
    """Start pytest for ``spec`` in the harness's checkout; its artifacts, log and results
    go to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *spec.pytest_args(),
            "--build-name", spec.name, "--artifacts", str(folder),
            "--junitxml", str(folder / "junit.xml"), "-n", str(workers), *extra, *selection]
    log = open(folder / LOG_FILE, "wb")  # noqa: SIM115 (closed by the child's exit)
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=clean_env(),
                            stdin=subprocess.DEVNULL, cwd=HARNESS_ROOT)
    log.close()
    return proc, time.monotonic()


def finish(spec: BuildSpec, folder: Path, proc: subprocess.Popen[bytes], started: float
           ) -> Run:
    code = proc.wait()
    run = Run(spec.name, folder, returncode=code, seconds=time.monotonic() - started)
    results = folder / RESULTS_FILE
    saved = json.loads(results.read_text()) if results.exists() else None
    # A build that could not be set up (a usage error such as a binary that does not
    # start, an internal error, an interruption) ran nothing: no results to judge.
    if saved is not None and not (not saved["tests"] and saved.get("exitstatus") in (2, 3, 4)):
        run.results = saved
        run.build = dict(saved["build"])
    else:
        log = (folder / LOG_FILE).read_text(errors="replace")
        run.failure = startup_failure(log, code)
        run.build = {"name": spec.name, "version": None, "package": None,
                     "origin": spec.describe(), "error": run.failure}
    return run


def run_all(specs: Sequence[BuildSpec], out: Path, selection: Sequence[str], workers: int,
            at_once: int, extra: Sequence[str] = ()) -> list[Run]:
    """Run every build, ``at_once`` side by side; runs come back in ``specs``' order."""
    live: set[subprocess.Popen[bytes]] = set()
    lock = threading.Lock()

    def one(spec: BuildSpec) -> Run:
        proc, t0 = start(spec, out / spec.name, selection, workers, extra)
        with lock:
            live.add(proc)
        try:
            run = finish(spec, out / spec.name, proc, t0)
        finally:
            with lock:
                live.discard(proc)
        print(f"[matrix] {spec.name}: {summary_line(run)}", file=sys.stderr, flush=True)
        return run

    pool = ThreadPoolExecutor(max_workers=max(1, at_once))
    try:
        return list(pool.map(one, specs))
    finally:
        # Interrupted: no pytest (nor, through its plugin, any QEMU) is left running.
        pool.shutdown(wait=False, cancel_futures=True)
        with lock:
            for proc in live:
                proc.terminate()
        for proc in list(live):
            proc.wait()


def summary_line(run: Run) -> str:
    if run.results is None:
        return f"could not run: {run.failure}"
    counts = run.results["counts"]
    text = ", ".join(f"{n} {k}" for k, n in counts.items() if n) or "no tests"
    return f"QEMU {run.build.get('version')}: {text} in {run.seconds:.0f} s"


def load_saved(path: Path) -> Run:
    """A saved run (its folder or its results.json); refuses another harness version's."""
    file = path / RESULTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{path}: no saved run there (expected a run folder holding "
                          f"{RESULTS_FILE}, or the file itself)")
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{file}: not a readable run ({exc})") from None
    if not isinstance(data, dict) or "tests" not in data or "build" not in data:
        raise ConfigError(f"{file}: not a run's {RESULTS_FILE} (no build/tests keys)")
    theirs, ours = data.get("harness_version"), harness_version()
    if data.get("format") != RESULTS_FORMAT or theirs != ours:
        raise ConfigError(f"{file} was written by cbw-harness {theirs}, this is {ours}: "
                          "results differ between versions; re-run it with this version")
    return Run(str(data["build"].get("name")), file.parent, results=data,
               build=dict(data["build"]))


def fresh_folder(folder: Path, overwrite: bool) -> Path:
    """``folder``, emptied if asked; else an earlier run there is moved aside, kept."""
    if folder.exists():
        if overwrite:
            shutil.rmtree(folder)
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(folder.stat().st_mtime))
            aside = folder.with_name(f"{folder.name}.{stamp}")
            n = 1
            while aside.exists():
                aside, n = folder.with_name(f"{folder.name}.{stamp}-{n}"), n + 1
            folder.rename(aside)
            print(f"[matrix] the earlier run in {folder} is kept as {aside}", file=sys.stderr)
    folder.mkdir(parents=True)
    return folder
