"""``git bisect run python -m harness bisect-step`` on a synthetic history, for real.

Each commit's build command materialises a build directory whose binaries run a real
provisioned QEMU: 11.1 or 7.2, switching at one commit.  The selected test is the
suite's ``cbw-timeout`` 10 s case: it passes on 11.1 and fails on 7.2 (whose timeout
wraps to 1.41 s) once departures count as failures.  A fixed-QEMU build directory
(a QMP-rewriting proxy in front of a real QEMU) drops in the same way.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.qemu import builds

pytestmark = pytest.mark.selftest

# A cheap real test whose verdict differs: 7.2 departs (snapshot-read-leaving-copied-cluster),
# 11.1 behaves as documented.
TEST_ID = "test_snapshot_read_leaving_a_copied_cluster[omitted-larger-than-a-cluster]"
SELECTION = [f"iotests/test_request_shapes.py::{TEST_ID}"]
COMMITS = 12
FIRST_CHANGED = 8    # the commit that switches QEMU
BROKEN_BUILDS = range(5, 7)   # around the first midpoint git bisect tests: builds fail

# The build command of every commit: wrappers that exec the real QEMU the commit names.
# $FLAKE_ONCE: the first QEMU start of the whole bisect fails, as a flaky host would.
MKBUILD = r"""#!/bin/sh
set -e
release=$(cat RELEASE)
if [ "$release" = broken ]; then
    echo "block/copy-before-write.c:42: error: expected ';' before '}' token" >&2
    exit 1
fi
rm -rf build && mkdir build
for tool in qemu-system-x86_64 qemu-img qemu-io; do
    real="$CACHE/$release/bin/$tool"
    {
        echo '#!/bin/sh'
        if [ "$tool" = qemu-system-x86_64 ]; then
            echo "if [ ! -e '$FLAKE_ONCE' ]; then : > '$FLAKE_ONCE'"
            echo "  echo 'qemu: cannot allocate memory (flaky host)' >&2; exit 1; fi"
        fi
        echo "exec '$real' \"\$@\""
    } > build/$tool
    chmod +x build/$tool
done
"""


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True,
                          text=True).stdout


def history(repo: Path, before: str, after: str) -> list[str]:
    """COMMITS commits, QEMU ``before`` up to FIRST_CHANGED, ``after`` from it on; the
    builds of BROKEN_BUILDS fail.  Returns the commit ids, oldest first."""
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "mkbuild.sh").write_text(MKBUILD)
    (repo / ".gitignore").write_text("build/\nartifacts/\n")
    ids = []
    for i in range(COMMITS):
        release = "broken" if i in BROKEN_BUILDS else before if i < FIRST_CHANGED else after
        (repo / "RELEASE").write_text(release + "\n")
        (repo / "block.c").write_text(f"/* revision {i} */\n")
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", f"commit {i}: QEMU {release}")
        ids.append(git(repo, "rev-parse", "HEAD").strip())
    return ids


def bisect(repo: Path, tmp: Path, ids: list[str], *terms: str, find_fix: bool = False
           ) -> subprocess.CompletedProcess[str]:
    old, new = ("broken", "fixed") if find_fix else ("good", "bad")
    git(repo, "bisect", "start", *terms)
    git(repo, "bisect", new, ids[-1])
    git(repo, "bisect", old, ids[0])
    env = {**os.environ, "CACHE": str(builds.release_dir("x").parent),
           "FLAKE_ONCE": str(tmp / "flaked")}
    cmd = [sys.executable, "-m", "harness", "bisect-step", "--build-cmd", "sh mkbuild.sh",
           "--build-dir", "build", *(["--find-fix"] if find_fix else []), "--", *SELECTION]
    return subprocess.run(["git", "bisect", "run", *cmd], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def releases_present():
    for name in ("7.2", "11.1"):
        builds.provision(name)


@pytest.mark.slow  # a whole git bisect run: a dozen suite runs
@pytest.mark.parametrize("find_fix", [False, True], ids=["regression", "fix"])
def test_git_bisect_run_lands_on_the_commit_that_changed_qemu(tmp_path, releases_present,
                                                               find_fix):
    repo = tmp_path / "qemu"
    before, after = ("7.2", "11.1") if find_fix else ("11.1", "7.2")
    ids = history(repo, before, after)
    terms = ["--term-old=broken", "--term-new=fixed"] if find_fix else []
    result = bisect(repo, tmp_path, ids, *terms, find_fix=find_fix)
    out = result.stdout + result.stderr
    word = "fixed" if find_fix else "bad"
    assert result.returncode == 0, out
    assert f"{ids[FIRST_CHANGED]} is the first {word} commit" in out, out
    # The broken build was skipped, not judged.
    log = git(repo, "bisect", "log")
    skipped = [i for i in BROKEN_BUILDS if f"git bisect skip {ids[i]}" in log]
    assert skipped, log + out
    assert "build failed (exit 1" in out and "verdict skip (125)" in out, out
    # The flaky start was retried, and that commit still got its real verdict.
    assert "infrastructure" in out and "retrying (1/1)" in out, out
    steps = [ln for ln in out.splitlines() if ln.startswith("bisect-step ")]
    verdicts = [ln for ln in steps if " verdict " in ln]
    assert all(" verdict skip " not in ln or "build failed" in ln for ln in verdicts), steps
    # Each step says why, on one line: the failing test and its first failure line.
    failing = [ln for ln in verdicts if TEST_ID in ln]
    assert failing and all("differs from the point-in-time data" in ln for ln in failing), steps
    # The boundary, side by side: the last good commit's run beside the first bad one's.
    side = subprocess.run([sys.executable, "-m", "harness", "bisect-diff"], cwd=repo,
                          capture_output=True, text=True, timeout=60)
    assert side.returncode == 1, side.stdout + side.stderr
    first_line = side.stdout.splitlines()[0]
    assert ids[FIRST_CHANGED][:12] in first_line and ids[FIRST_CHANGED - 1][:12] in first_line
    pair = ("passed -> failed") if not find_fix else ("failed -> passed")
    assert f"{TEST_ID}: {pair}" in side.stdout, side.stdout


def test_bisect_step_exit_codes_for_bad_options_and_empty_selections(tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "harness", "bisect-step", *args],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)

    bad_option = run("--retries", "x", "--", "iotests")
    assert bad_option.returncode == 128, bad_option.stderr
    assert "invalid int value" in bad_option.stderr
    no_selection = run("--build-dir", str(tmp_path))
    assert no_selection.returncode == 128 and "no tests selected" in no_selection.stderr
    # A build directory without QEMU (the build produced nothing): skip.
    empty = run("--build-dir", str(tmp_path), "--", *SELECTION)
    assert empty.returncode == 125, empty.stdout + empty.stderr
    assert "has no qemu-system-x86_64; verdict skip (125)" in empty.stdout


def test_bisect_step_skips_when_nothing_selected_runs(tmp_path, releases_present):
    build = tmp_path / "build"
    build.mkdir()
    # Scripts, not symlinks: the provisioned wrappers find their prefix from their own path.
    for tool in builds.TOOLS:
        (build / tool).write_text(textwrap.dedent(f"""\
            #!/bin/sh
            exec '{builds.release_dir("11.1") / "bin" / tool}' "$@"
            """))
        (build / tool).chmod(0o755)
    result = subprocess.run([sys.executable, "-m", "harness", "bisect-step", "--build-dir",
                             str(build), "--", "iotests/test_cbw_timeout.py", "-k",
                             "no-such-test"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 125, result.stdout + result.stderr
    assert "nothing selected ran" in result.stdout
