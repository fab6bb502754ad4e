"""Run the explorer for a number of examples or a time budget; collect and write findings.

:func:`run_examples` is one Hypothesis run (a fixed, derandomised budget for the
self-tests).  :func:`explore` runs batches until the time budget is spent, one QEMU
per batch serving its examples (its folder is kept only if it found something), prints a
progress line per batch, and writes each finding as a standalone reproducer
(:func:`write_reproducer`): a ``replay.py`` case of the shrunk sequence, recorded on a
fresh QEMU, with a summary of the sequence and of documented vs observed.

Findings persist in Hypothesis' example database (``<cache>/explore-db``), so a rerun
tries them first.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, Phase, settings
from hypothesis.database import DirectoryBasedExampleDatabase, ExampleDatabase
from hypothesis.stateful import run_state_machine_as_test

from ..block.images import Images
from ..errors import HarnessError
from ..qemu.builds import QemuBuild
from ..qemu.machine import Machine
from ..qemu.reproducer import write_replay
from .explorer import CbwExplorer, Disagreement, Tally
from .rig import CbwRig, ExploreSession, example_topology, record_images

STEPS_PER_EXAMPLE = 10
BATCH = 50


@dataclass
class Finding:
    """A shrunk disagreement: what it says, and where its reproducer is."""

    message: str
    reproducer: Path | None = None
    known_departure: str | None = None


@dataclass
class Report:
    examples: int = 0
    steps: int = 0
    seconds: float = 0.0
    findings: list[Finding] = field(default_factory=list)
    known: Counter[str] = field(default_factory=Counter)

    @property
    def rate(self) -> float:
        return self.examples / self.seconds if self.seconds else 0.0


def explorer_settings(max_examples: int, *, derandomize: bool,
                      database: ExampleDatabase | None, reuse: bool = True,
                      steps: int = STEPS_PER_EXAMPLE) -> settings:
    phases = [p for p in Phase if reuse or p is not Phase.reuse]
    return settings(max_examples=max_examples, derandomize=derandomize, deadline=None,
                    stateful_step_count=steps, database=database, phases=phases,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
                    print_blob=False)


def run_examples(session: ExploreSession, hyp_settings: settings, tally: Tally) -> None:
    """One Hypothesis run of the explorer on ``session``'s QEMU; raises what it finds
    (shrunk): :class:`Disagreement`, or the harness's error if QEMU died or hung."""
    CbwExplorer.session = session
    CbwExplorer.tally = tally
    run_state_machine_as_test(CbwExplorer, settings=hyp_settings)


def write_reproducer(build: QemuBuild, folder: Path, found: Disagreement) -> Path:
    """Run ``found``'s sequence once more on a fresh QEMU in ``folder``, recorded, and
    write it as a ``replay.py`` case; returns the case file."""
    folder.mkdir(parents=True, exist_ok=True)
    topology = example_topology(folder, 1, found.on_cbw_error, found.layout)
    record_images(topology, Images(build, folder))
    summary = (f"explorer finding: {found.problem}\n"
               f"setting and steps:\n  " + str(found).split("sequence:\n  ", 1)[1])
    (folder / "SUMMARY.txt").write_text(summary + "\n\nreplay: python3 replay.py "
                                        "/path/to/qemu-system-x86_64\n")
    with Machine(build, folder, name="finding", machine_type="none") as vm:
        rig = CbwRig(vm, topology, found.fault, images_made=True)
        for step in found.steps:
            if step.kind == "write":
                assert step.pattern is not None
                rig.guest_write(step.offset, step.length, step.pattern)
            elif step.kind == "read":
                rig.snapshot_read(step.offset, step.length, step.pattern or 0)
            else:
                rig.cancel_job()
            if rig.job_running:  # as the explorer's invariant asks after every step
                rig.job_status()
        vm.shutdown()
    written = write_replay(folder, "explorer finding", summary)
    if not written:
        raise HarnessError(f"no reproducer written in {folder}: QEMU did not start")
    return written[0]


def explore(build: QemuBuild, workdir: Path, *, budget: float,
            database: ExampleDatabase | None,
            progress: Callable[[str], None] = print) -> Report:
    """Explore for ``budget`` seconds; findings' reproducers go to ``workdir``."""
    report = Report()
    tally = Tally()
    start = time.monotonic()
    seen: set[str] = set()
    batch = 0
    while time.monotonic() - start < budget:
        # A new QEMU per batch: its event list and log stay small, and a QEMU that a
        # finding hurt serves no later example.
        batch += 1
        folder = workdir / f"batch-{batch}"
        session = ExploreSession(build, folder)
        hyp = explorer_settings(BATCH, derandomize=False, database=database,
                                reuse=batch == 1)  # the first replays the database
        found: list[Exception] = []
        try:
            run_examples(session, hyp, tally)
        except (Disagreement, HarnessError) as exc:
            found.append(exc)
        try:
            session.close()
        except HarnessError as end:  # QEMU did not end cleanly: a finding too
            found.append(end)
        for problem in found:
            message = str(problem)
            if message not in seen:
                seen.add(message)
                report.findings.append(_record(build, workdir, problem, len(seen)))
                progress(f"finding {len(seen)}: {message.splitlines()[0]}")
        if not found:
            shutil.rmtree(folder, ignore_errors=True)  # nothing to look at
        elapsed = time.monotonic() - start
        progress(f"[{elapsed:5.0f}s] {tally.examples} examples, {tally.steps} steps, "
                 f"{tally.examples / elapsed:.1f} examples/s, "
                 f"{len(report.findings)} findings, {len(tally.known)} known departures met")
    report.examples, report.steps = tally.examples, tally.steps
    report.seconds = time.monotonic() - start
    report.known = Counter(k.departure for k in tally.known)
    return report


def _record(build: QemuBuild, workdir: Path, exc: Exception, number: int) -> Finding:
    finding = Finding(str(exc))
    if isinstance(exc, Disagreement):
        try:
            finding.reproducer = write_reproducer(build, workdir / f"finding-{number}", exc)
        except HarnessError as err:  # the finding stands; say why it has no reproducer
            finding.message += f"\n(no reproducer: {err})"
    return finding


def default_database(cache: Path) -> ExampleDatabase:
    return DirectoryBasedExampleDatabase(str(cache / "explore-db"))
