"""The GitLab CI template (ci/gitlab-ci.yml), run here by gitlab-ci-local in shell mode.

gitlab-ci-local comes from ``make ci-tools`` (pinned, in .ci-tools); the template's
matrix jobs run a small selection against the provisioned 11.1, split in two parts by
pytest-split, and the report job merges them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness.qemu import builds
from harness.qemu.cache import cache_root

# The template run through gitlab-ci-local (Node, rsync, a suite run per job): slow tier.
pytestmark = [pytest.mark.selftest, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / ".ci-tools/node_modules/.bin/gitlab-ci-local"
SELECTION = "iotests/test_backup_sync_none.py -k control"


@pytest.fixture(scope="module")
def gitlab_ci_local() -> Path:
    if not TOOL.exists():
        made = subprocess.run(["make", "-C", str(ROOT), "ci-tools"], capture_output=True,
                              text=True, timeout=600)
        if made.returncode != 0:
            why = (made.stderr or made.stdout).strip().splitlines()[-1:]
            if shutil.which("npm") is None:
                pytest.skip(f"npm is absent and make ci-tools could not provide it: {why}")
            pytest.fail(f"make ci-tools failed: {why}")
    return TOOL


def checkout_copy(dest: Path) -> Path:
    """The harness's files as they are now (tracked and new), as a git repository:
    gitlab-ci-local reads tracked files only."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True, text=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org", "HOME": str(dest)}
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "snapshot"]):
        subprocess.run(["git", *cmd], cwd=dest, check=True, capture_output=True, env=env)
    return dest


def run_jobs(tool: Path, repo: Path, *jobs: str) -> subprocess.CompletedProcess[str]:
    variables = {"CBW_PYTHON": sys.executable, "CBW_PYTEST_ARGS": SELECTION,
                 "CBW_CACHE_DIR": str(cache_root())}
    argv = [str(tool), *jobs]
    for k, v in variables.items():
        argv += ["--variable", f"{k}={v}"]
    return subprocess.run(argv, cwd=repo, capture_output=True, text=True, timeout=600)


def test_template_lists_one_job_per_build_and_part(gitlab_ci_local, tmp_path):
    repo = checkout_copy(tmp_path)
    listed = subprocess.run([str(gitlab_ci_local), "--list"], cwd=repo, capture_output=True,
                            text=True, timeout=120)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    for build in ("7.2", "10.0", "11.1"):
        for part in ("1", "2"):
            assert f"cbw-matrix: [{build},{part}]" in listed.stdout, listed.stdout
    assert "cbw-matrix-report" in listed.stdout


def test_matrix_jobs_split_the_suite_and_report_junit(gitlab_ci_local, tmp_path):
    builds.provision("11.1")
    repo = checkout_copy(tmp_path)
    jobs = run_jobs(gitlab_ci_local, repo, "cbw-matrix: [11.1,1]", "cbw-matrix: [11.1,2]")
    out = jobs.stdout + jobs.stderr
    assert jobs.returncode == 0, out
    assert "PASS  cbw-matrix: [11.1,1]" in out and "PASS  cbw-matrix: [11.1,2]" in out, out
    # JUnit as GitLab collects it (artifacts:reports:junit): one suite per job, named
    # after the build and its QEMU version; the two parts hold the selection once.
    # Shell jobs share the folder, so each job's artifacts may hold the other's too.
    found = (repo / ".gitlab-ci-local/artifacts").glob("cbw-matrix*/cbw-results/*/"
                                                       "junit-11.1.xml")
    junits = list({j.parent.name: j for j in found}.values())
    assert len(junits) == 2, out
    cases: list[str] = []
    for junit in junits:
        suite = next(ET.parse(junit).getroot().iter("testsuite"))
        assert suite.get("name", "").startswith("cbw-harness QEMU 11.1 (11.1."), suite.attrib
        assert suite.get("failures") == "0" and suite.get("errors") == "0"
        cases += [c.get("name", "") for c in suite.iter("testcase")]
    assert sorted(cases) == sorted(f"test_control_without_fault[{v}]" for v in
                                   ("omitted", "break-guest-write", "break-snapshot")), cases
    merged = run_jobs(gitlab_ci_local, repo, "cbw-matrix-report")
    assert merged.returncode == 0, merged.stdout + merged.stderr
    report = json.loads((repo / "cbw-report/report.json").read_text())
    assert [b["name"] for b in report["builds"]] == ["11.1"]
    assert len(report["tests"]) == 3
    assert {c["11.1"]["outcome"] for c in report["tests"].values()} == {"passed"}
