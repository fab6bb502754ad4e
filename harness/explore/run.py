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

import hypothesis
from hypothesis import HealthCheck, Phase, settings
from hypothesis.database import DirectoryBasedExampleDatabase, ExampleDatabase
from hypothesis.errors import Flaky, FlakyStrategyDefinition
from hypothesis.stateful import get_state_machine_test, run_state_machine_as_test

from ..block.images import Images
from ..errors import HarnessError
from ..qemu.builds import QemuBuild
from ..qemu.machine import QUIT_TIMEOUT
from ..qemu.reproducer import write_replay
from .explorer import (
    CbwExplorer,
    Disagreement,
    Example,
    Focus,
    GoalMet,
    KnownMet,
    Setting,
    Step,
    Tally,
)
from .rig import (
    CbwRig,
    ExploreSession,
    example_topology,
    launch_machine,
    probed_version,
    record_images,
)

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
    unknown: int = 0  # examples whose checks stopped where the model cannot tell

    @property
    def rate(self) -> float:
        return self.examples / self.seconds if self.seconds else 0.0


def explorer_settings(max_examples: int, *, derandomize: bool,
                      database: ExampleDatabase | None, reuse: bool = True,
                      steps: int = STEPS_PER_EXAMPLE, shrink: bool = True) -> settings:
    """``shrink=False``: a hunt for a known departure stops at the first meeting.
    Hypothesis' explain phase is left out: it reruns many examples to say which lines
    only failing ones ran, which says nothing about QEMU."""
    phases = [p for p in Phase if (reuse or p is not Phase.reuse) and p is not Phase.explain
              and (shrink or p is not Phase.shrink)]
    return settings(max_examples=max_examples, derandomize=derandomize, deadline=None,
                    stateful_step_count=steps, database=database, phases=phases,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
                    print_blob=False, report_multiple_bugs=False)


def run_examples(session: ExploreSession, hyp_settings: settings, tally: Tally, *,
                 focus: Focus | None = None, seed: int | None = None) -> None:
    """One Hypothesis run of the explorer on ``session``'s QEMU, drawing settings from
    ``focus`` (default: all), with a fixed ``seed`` if given; raises what it finds
    (shrunk): :class:`Disagreement`, or the harness's error if QEMU died."""
    CbwExplorer.session = session
    CbwExplorer.tally = tally
    CbwExplorer.focus = focus or Focus()
    CbwExplorer.goal_met = False
    try:
        if seed is None:
            run_state_machine_as_test(CbwExplorer, settings=hyp_settings)
            return
        # A fixed seed: random drawing, the same on every run.  (derandomize draws
        # from one fixed stream too, but starts from the simplest examples and mutates
        # them: a budget of a few hundred examples meets few of the deeper sequences.)
        hypothesis.seed(seed)(get_state_machine_test(CbwExplorer, settings=hyp_settings))()
    except GoalMet:
        pass  # a hunt met its departure
    except FlakyStrategyDefinition:
        # Hypothesis' second run of the example that met the goal stopped at once
        # (CbwExplorer._goal), drawing less than the first: the goal stands.
        if not CbwExplorer.goal_met:
            raise


def summary_text(problem: str, setting: Setting, steps: list[Step],
                 known: str | None) -> str:
    """The human-readable summary of a finding: what, in which setting, which steps."""
    lines = [f"explorer finding: {problem}",
             f"known departure: {known}" if known else "new: no recorded departure matches",
             f"setting: {setting.describe()}", "steps:"]
    lines += [f"  {n}. {s.describe()}" for n, s in enumerate(steps, 1)] or ["  (none)"]
    return "\n".join(lines)


def write_reproducer(build: QemuBuild, folder: Path, found: Disagreement | KnownMet
                     ) -> Path:
    """Run ``found``'s sequence once more on a fresh QEMU in ``folder``, recorded, and
    write it as a ``replay.py`` case, with a summary of the sequence at the head of
    ``replay.py`` and in ``SUMMARY.txt``; returns the case file."""
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(found, Disagreement):
        setting, steps, problem, known = found.setting, found.steps, found.problem, None
    else:
        setting, steps, known = found.setting, found.steps, found.departure
        problem = f"{found.step}: {found.problem}"
    topology = example_topology(folder, 1, setting.on_cbw_error, setting.layout)
    record_images(topology, Images(build, folder))
    summary = summary_text(problem, setting, steps, known)
    vm = launch_machine(build, folder, "finding")
    tally = Tally()
    shown = False
    rig: CbwRig | None = None
    try:
        rig = CbwRig(vm, topology, setting.fault, setting.job, images_made=True)
        example = Example(rig, setting, probed_version(build), tally)
        example.start()
        example.check_invariants()
        for step in steps:
            if rig.dead:
                break
            example.run(step)
            example.check_invariants()
    except Disagreement:
        shown = True
    finally:  # a QEMU that stopped answering is killed at once: it would not read quit
        vm.shutdown(quit_timeout=0 if rig is not None and rig.dead else QUIT_TIMEOUT)
    shown = shown or bool(tally.known)
    summary += ("\nrecording run: it showed again" if shown else
                "\nrecording run: it did NOT show again (timing?): the replay compares with "
                "that run")
    (folder / "SUMMARY.txt").write_text(summary + "\n\nreplay: python3 replay.py "
                                        "/path/to/qemu-system-x86_64\n")
    written = write_replay(folder, "explorer finding", summary.splitlines()[0])
    if not written:
        raise HarnessError(f"no reproducer written in {folder}: QEMU did not start")
    _head_with_summary(folder / "replay.py", summary)
    return written[0]


def _head_with_summary(script: Path, summary: str) -> None:
    """Put the finding's summary, as a comment block, right after the shebang line."""
    first, rest = script.read_text().split("\n", 1)
    block = "\n".join(f"# {line}".rstrip() for line in summary.splitlines())
    script.write_text(f"{first}\n{block}\n#\n{rest}")


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
        except (Disagreement, HarnessError, Flaky) as exc:
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
    report.examples, report.steps, report.unknown = tally.examples, tally.steps, tally.unknown
    report.seconds = time.monotonic() - start
    report.known = Counter(k.departure for k in tally.known)
    for met in shortest_known(tally):
        progress(f"known departure {met.departure}: writing its reproducer")
        report.findings.append(record_known(build, workdir / f"known-{met.departure}", met))
    return report


def shortest_known(tally: Tally) -> list[KnownMet]:
    """For each known departure met, the shortest sequence that met it."""
    best: dict[str, KnownMet] = {}
    for met in tally.known:
        if met.departure not in best or len(met.steps) < len(best[met.departure].steps):
            best[met.departure] = met
    return [best[name] for name in sorted(best)]


def record_known(build: QemuBuild, folder: Path, met: KnownMet) -> Finding:
    """A known departure met, with a reproducer of its shortest sequence."""
    finding = Finding(summary_text(f"{met.step}: {met.problem}", met.setting, met.steps,
                                   met.departure),
                      known_departure=met.departure)
    try:
        finding.reproducer = write_reproducer(build, folder, met)
    except HarnessError as err:
        finding.message += f"\n(no reproducer: {err})"
    return finding


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
