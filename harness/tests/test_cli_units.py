"""Units of the cross-build commands: build names, verdicts, reports, the diff, releases.

No QEMU here: these feed the functions hand-made results.json content and check what a
user reads.  The commands against real QEMU are in test_matrix.py, test_bisect.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness.cli import bisect, buildspec, diff, report
from harness.cli.runs import Run, fresh_folder, load_saved, startup_failure
from harness.errors import ConfigError
from harness.plugin.results import RESULTS_FORMAT, harness_version, one_line
from harness.qemu import releases


def saved(tmp: Path, name: str, tests: dict[str, dict[str, Any]], version: str = "11.1.3") -> Path:
    folder = tmp / name
    folder.mkdir()
    counts = {o: sum(t["outcome"] == o for t in tests.values()) for o in
              ("passed", "failed", "skipped", "xfailed", "xpassed", "error")}
    (folder / "results.json").write_text(json.dumps({
        "format": RESULTS_FORMAT, "harness_version": harness_version(),
        "build": {"name": name, "version": version, "package": "p", "origin": "o"},
        "counts": counts, "tests": tests}))
    return folder


def run_of(tests: dict[str, dict[str, Any]], name: str = "b") -> Run:
    counts = {o: sum(t["outcome"] == o for t in tests.values()) for o in
              ("passed", "failed", "skipped", "xfailed", "xpassed", "error")}
    return Run(name, Path("."), results={"tests": tests, "counts": counts},
               build={"name": name, "version": "1.0"})


# ------------------------------------------------------------------ build names
def test_build_names_and_bad_input(tmp_path):
    build = tmp_path / "build"
    build.mkdir()
    with pytest.raises(ConfigError, match="has no qemu-system-x86_64: build it first"):
        buildspec.parse(str(build))
    (build / "qemu-system-x86_64").write_text("#!/bin/sh\n")
    assert buildspec.parse(str(build)) == buildspec.BuildSpec("build", "dir", str(build))
    assert buildspec.parse(f"mine={build}").name == "mine"
    assert buildspec.parse("11.1").pytest_args() == ["--qemu-release", "11.1"]
    # A path that does not exist is a build that cannot start, not bad input.
    assert buildspec.parse("/nonexistent/qemu-system-x86_64").kind == "prog"
    with pytest.raises(ConfigError, match="two builds named 'build'"):
        buildspec.parse_all([str(build), str(build)])
    with pytest.raises(ConfigError, match="no builds given"):
        buildspec.parse_all([])


def test_release_choice_from_the_archive_index():
    available = [releases.Available("11.1.3", "1:11.1.3+ds-1", "sid", "sid"),
                 releases.Available("11.1.2", "1:11.1.2+ds-3", "forky", "forky"),
                 releases.Available("10.0.13", "1:10.0.13+ds-0", "trixie", "trixie"),
                 releases.Available("10.0.2", "1:10.0.2+ds-2~bpo12+1", "bookworm-backports",
                                    "bookworm")]
    assert releases.choose("11.1", available).upstream == "11.1.3"   # newest of the series
    assert releases.choose("10.0", available).upstream == "10.0.13"
    exact = releases.choose("10.0.2", available)
    assert exact.to_suite().suites == ("bookworm", "bookworm-backports")
    assert exact.to_suite().target == "bookworm-backports"
    with pytest.raises(ConfigError, match=r"unknown QEMU release '9.9': Debian's archive "
                                          r"serves 11.1.3, 11.1.2, 10.0.13, 10.0.2"):
        releases.choose("9.9", available)
    assert releases.ordered_names(available) == ["10.0.2", "10.0.13", "11.1.2", "11.1.3"]
    assert releases.upstream_of("1:7.2+dfsg-7+deb12u18+b3") == "7.2"


# ------------------------------------------------------------------ verdicts
def test_bisect_verdicts_and_find_fix():
    failing = run_of({"t1": {"outcome": "failed", "reason": "AssertionError: job ended"},
                      "t2": {"outcome": "passed", "reason": ""}})
    assert bisect.judge(failing, find_fix=False).code == bisect.BAD
    assert "t1: AssertionError: job ended" in bisect.judge(failing, False).why
    assert bisect.judge(failing, find_fix=True).code == bisect.GOOD
    passing = run_of({"t2": {"outcome": "passed", "reason": ""}})
    assert bisect.judge(passing, False).code == bisect.GOOD
    assert bisect.judge(passing, True).code == bisect.BAD
    lacking = run_of({"t": {"outcome": "skipped", "reason": "build lacks capability 'x'"}})
    assert bisect.judge(lacking, False).code == bisect.SKIP
    assert "lacks capability 'x'" in bisect.judge(lacking, False).why
    assert "nothing selected ran" in bisect.judge(run_of({}), False).why
    error = run_of({"t": {"outcome": "error", "reason": "error in setup: QEMU died"}})
    assert bisect.judge(error, False).why.startswith("infrastructure")
    crashed = Run("b", Path("."), failure="qemu-system-x86_64 --version failed")
    assert bisect.judge(crashed, True).code == bisect.SKIP


# ------------------------------------------------------------------ reports
def test_report_contract_with_a_build_that_could_not_run():
    ok = run_of({"a::t[x]": {"outcome": "xfailed", "reason": "QEMU departs"},
                 "a::u": {"outcome": "skipped", "reason": "build lacks capability 'y'"}},
                "11.1")
    ok.build.update(package="Debian 1:11.1.3", origin="provisioned release 11.1")
    dead = Run("mine", Path("."), failure="--qemu-prog: /x does not exist",
               build={"name": "mine", "version": None, "package": None, "origin": "qemu"})
    rep = report.build_report([ok, dead], ["iotests"])
    assert [{k: b[k] for k in ("name", "version", "package", "origin")}
            for b in rep["builds"]] == [
        {"name": "11.1", "version": "1.0", "package": "Debian 1:11.1.3",
         "origin": "provisioned release 11.1"},
        {"name": "mine", "version": None, "package": None, "origin": "qemu"}]
    assert rep["tests"]["a::t[x]"] == {
        "11.1": {"outcome": "xfailed", "reason": "QEMU departs"},
        "mine": {"outcome": "error", "reason": "build could not run: --qemu-prog: /x does "
                                               "not exist"}}
    assert report.differing(rep) == []  # the dead column does not count as a difference
    md = report.render_md(rep)
    assert "could not run: --qemu-prog: /x does not exist" in md
    page = report.render_html(rep)
    assert 'class="xfailed" title="QEMU departs"' in page and "<script>" in page
    assert "http" not in page.replace("http-equiv", "")  # reads offline


def test_startup_failure_is_pytests_error_line():
    log = "some noise\nERROR: --qemu-build /x: not a directory; pass a QEMU build dir\n"
    assert startup_failure(log, 4) == "--qemu-build /x: not a directory; pass a QEMU build dir"
    assert startup_failure("", 3) == "pytest exited 3 without results: no output"
    assert one_line("\n  E   AssertionError: boom\nmore") == "AssertionError: boom"


# ------------------------------------------------------------------ the diff
def test_diff_lists_changed_observations_side_by_side_and_changed_outcomes():
    row = {"scenario": "fleecing / target-write-once-EIO", "on_cbw_error": "break-snapshot",
           "guest_write": "all ok", "job": "-", "data": "snapshot reads fail",
           "observation": {"job": {"end": "none"}, "snapshot_reads": ["EACCES"]}}
    changed = {**row, "data": "snapshot reads old data",
               "observation": {"job": {"end": "none"}, "snapshot_reads": ["ok"]}}
    a = run_of({"t1": {"outcome": "xfailed", "reason": "departs", "observations": [row]},
                "t2": {"outcome": "passed", "reason": "", "observations": [row]}}, "10.0")
    b = run_of({"t1": {"outcome": "passed", "reason": "", "observations": [changed]},
                "t2": {"outcome": "passed", "reason": "", "observations": [row]}}, "11.1")
    d = diff.compare(a, b)
    assert [c.nodeid for c in d.scenarios] == ["t1"]
    assert ("data", "snapshot reads fail", "snapshot reads old data") in d.scenarios[0].fields
    assert ("observation.snapshot_reads", "['EACCES']", "['ok']") in d.scenarios[0].fields
    text = diff.render(d)
    assert "* fleecing / target-write-once-EIO, on-cbw-error=break-snapshot" in text
    assert "* t1: xfailed -> passed" in text and "10.0: departs" in text
    assert diff.compare(a, a).empty


def test_saved_runs_of_another_harness_version_are_refused(tmp_path):
    folder = saved(tmp_path, "old", {})
    data = json.loads((folder / "results.json").read_text())
    data["harness_version"] = "0.0.1"
    (folder / "results.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"written by cbw-harness 0\.0\.1, this is"):
        load_saved(folder)
    with pytest.raises(ConfigError, match="no saved run there"):
        load_saved(tmp_path / "nothing")


def test_an_earlier_run_is_moved_aside_not_overwritten(tmp_path):
    out = tmp_path / "matrix"
    out.mkdir()
    (out / "report.json").write_text("earlier")
    fresh_folder(out, overwrite=False)
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("matrix.")]
    assert len(kept) == 1 and (kept[0] / "report.json").read_text() == "earlier"
    assert not any(out.iterdir())


# ------------------------------------------------------------------ command lines
def harness(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", ["unknown-release", "empty-build-dir", "same-name",
                                  "other-version"])
def test_bad_input_is_one_line_exit_2_and_nothing_overwritten(tmp_path, case):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("earlier")
    (tmp_path / "build").mkdir()
    other = saved(tmp_path, "old", {})
    data = json.loads((other / "results.json").read_text())
    (other / "results.json").write_text(json.dumps({**data, "harness_version": "0.0.1"}))
    args = {"unknown-release": ["matrix", "6.6", "--out", str(out)],
            "empty-build-dir": ["matrix", str(tmp_path / "build"), "--out", str(out)],
            "same-name": ["matrix", "11.1", "11.1", "--out", str(out)],
            "other-version": ["diff", str(other), str(other), "--out", str(out)]}[case]
    result = harness(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    # Progress lines of a first look-up in the archive's indexes may come first.
    lines = [ln for ln in result.stderr.strip().splitlines() if not ln.startswith("[provision]")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert (out / "report.json").read_text() == "earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build", "old", "out"]
