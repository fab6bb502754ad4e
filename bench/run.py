#!/usr/bin/env python3
"""Benchmarks: what QEMU costs, and what the harness adds on top.

    python bench/run.py [--repeat N] [--only NAME ...] [--qemu-release R | --qemu-prog P]
                        [--make-check [--jobs N ...] [--speed quick|slow]]

Measures, in one run, each as median / min / max of N repeats:
  qemu-bare        QEMU start + QMP handshake + quit, plain qemu.qmp, no harness
  harness-machine  the same through harness.machine.Machine (log, pidfd, teardown)
  refused-command  one command QEMU refuses (an error reply), through Machine.cmd
  pytest-per-test  wall time per test of a pytest run of trivial launch_vm tests,
                   minus pytest's own start-up, i.e. the harness's per-test cost
  scenario:<name>  one copy-before-write scenario, images to verdicts (guest writes,
                   snapshot reads, job to its end, data verdicts)
  guest-boot       a tiny Linux guest from launch to its ready line and power-off
  make-check-jN    (with --make-check [--jobs N ...]) one `make check` per JOBS value
                   (guest tests included): wall time, CPU time of all it ran, exit;
                   --speed slow times `make check SPEED=slow` (both tiers, as CI)
Results go to stdout as a table and to bench/results.json (a run of some entries
updates those only).  On a loaded machine compare medians, not single runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.qemu import builds
from harness.qemu.machine import Machine, launcher, supports_monitor_object


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def qemu_bare(build: builds.QemuBuild, machine: str = "pc") -> None:
    """QEMU + QMP with no harness: the floor every test pays."""
    from qemu.qmp import QMPClient

    ours, theirs = socket.socketpair()
    monitor = (["-object", "monitor-qmp,id=m,chardev=qmp"]
               if supports_monitor_object(str(build.qemu_system))
               else ["-mon", "chardev=qmp,mode=control"])
    proc = subprocess.Popen([str(build.qemu_system), "-nodefaults", "-display", "none",
                             "-machine", machine, "-accel", "tcg", "-chardev",
                             f"socket,id=qmp,fd={theirs.fileno()}", *monitor],
                            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
    theirs.close()

    async def talk() -> None:
        client = QMPClient("bench")
        await client.connect(ours)
        await client.execute("query-status")
        await client.execute("quit")
        try:
            await client.disconnect()
        except EOFError:
            pass
    try:
        asyncio.run(talk())
        proc.wait(timeout=10)
    finally:
        proc.kill()
        proc.wait()


def iotest_like(build: builds.QemuBuild, folder: Path) -> None:
    """What QEMU's own copy-before-write iotest case costs: two qemu-img, one QEMU
    (-machine none, a node, HMP qemu-io on it), one qemu-io offline."""
    img = [str(build.qemu_img), "create", "-q", "-f", "qcow2"]
    for name in ("a.qcow2", "b.qcow2"):
        subprocess.run([*img, str(folder / name), "4M"], check=True)
    node = json.dumps({"driver": "qcow2", "node-name": "a",
                       "file": {"driver": "file", "filename": str(folder / "a.qcow2")}})
    with Machine(build, folder, machine_type="none", args=["-blockdev", node]) as vm:
        vm.qemu_io("a", "write -P 0x55 0 64k", device=False)
    subprocess.run([str(build.qemu_io), "-c", "read -P 0x55 0 64k", str(folder / "a.qcow2")],
                   check=True, stdout=subprocess.DEVNULL)


def harness_machine(build: builds.QemuBuild, folder: Path) -> None:
    with Machine(build, folder) as vm:
        vm.cmd("query-status")


def refused_command(vm: Machine) -> Callable[[], object]:
    """A refused command is an answer, not a sign of a dying QEMU: it must cost a round
    trip, not a wait for the process to exit (it once cost 1 s per refusal)."""
    def once() -> None:
        reply = vm.qmp("blockdev-del", {"node-name": "no-such-node"})
        assert "error" in reply, reply
    return once


def pytest_per_test(build: builds.QemuBuild, tests: int) -> tuple[float, float]:
    """(seconds per test with QEMU, seconds per test without) in one pytest process."""
    with tempfile.TemporaryDirectory() as tmp:
        source = textwrap.dedent(f"""
            import pytest
            @pytest.mark.parametrize("i", range({tests}))
            def test_vm(launch_vm, i):
                assert launch_vm().cmd("query-status")["running"]
            @pytest.mark.parametrize("i", range({tests}))
            def test_empty(i):
                assert i >= 0
        """)
        Path(tmp, "test_bench.py").write_text(source)
        env = {**os.environ, **build.as_env()}
        per = {}
        for k in ("test_vm", "test_empty"):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "harness.plugin",
                            "-p", "no:cacheprovider", "--rootdir", tmp, "-k", k,
                            str(Path(tmp, "test_bench.py"))], cwd=tmp, env=env, check=True,
                           stdout=subprocess.DEVNULL)
            per[k] = (time.perf_counter() - t) / tests
        return per["test_vm"], per["test_empty"]


def scenario_runner(build: builds.QemuBuild, folder: Path, name: str) -> Callable[[], None]:
    """One scenario with a one-shot fault under break-guest-write, as the suite runs it."""
    from harness.block.images import Images
    from harness.qemu import probe
    from harness.scenarios import cbw

    spec = cbw.ScenarioSpec(cbw.Layout(name), on_cbw_error="break-guest-write",
                            fault=cbw.Fault("target-write", once=True))
    microvm = probe.probe(build).has("machine.microvm")  # as the suite's fixture picks

    def once() -> None:
        try:
            with launcher(build, folder) as launch:
                cbw.run(cbw.Scenario(launch, Images(build, folder), spec, microvm=microvm))
        finally:
            (folder / "images.jsonl").unlink(missing_ok=True)
    return once


def guest_boot(build: builds.QemuBuild, folder: Path) -> Callable[[], object]:
    from harness.guest import bench_boot
    return lambda: bench_boot(build, folder)


def make_check(jobs: int, speed: str = "quick") -> dict[str, float]:
    """One ``make check`` with ``JOBS=jobs`` (the setup steps are instant once done): its
    wall time, and the CPU time of everything it ran (which a loaded machine inflates
    far less than wall time), and its exit status: a failing run measures nothing."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    done = subprocess.run(["make", "-C", str(ROOT), "check", f"JOBS={jobs}", f"SPEED={speed}"],
                          check=False,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"median_ms": round(wall * 1000, 1), "cpu_s": round(cpu, 1), "n": 1,
            "jobs": jobs, "exit": done.returncode}


def stats(samples: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(samples) * 1000, 1),
            "min_ms": round(min(samples) * 1000, 1), "max_ms": round(max(samples) * 1000, 1),
            "n": len(samples)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--only", nargs="*", default=None, help="names (prefix match) to run")
    ap.add_argument("--qemu-release", default=None)
    ap.add_argument("--qemu-prog", default=None)
    ap.add_argument("--make-check", action="store_true",
                    help="also time one `make check` (minutes)")
    ap.add_argument("--jobs", type=int, nargs="+", default=[2],
                    help="make check's JOBS (default 2); several: one run each")
    ap.add_argument("--speed", choices=("quick", "slow"), default="quick",
                    help="make check's SPEED: quick (default) or slow (both tiers, as CI)")
    args = ap.parse_args()
    build = builds.select(qemu_prog=args.qemu_prog, release=args.qemu_release)
    only: list[str] | None = args.only

    def want(name: str) -> bool:
        return only is None or any(name.startswith(o) for o in only)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="cbw-bench-") as tmp:
        folder = Path(tmp)
        if want("qemu-bare"):
            results["qemu-bare"] = stats(timed(lambda: qemu_bare(build), args.repeat))
        if want("qemu-bare-none"):
            results["qemu-bare-none"] = stats(timed(lambda: qemu_bare(build, "none"),
                                                    args.repeat))
        if want("iotest-like"):
            results["iotest-like"] = stats(timed(lambda: iotest_like(build, folder),
                                                 args.repeat))
        if want("harness-machine"):
            results["harness-machine"] = stats(
                timed(lambda: harness_machine(build, folder), args.repeat))
        if want("refused-command"):
            with Machine(build, folder) as vm:
                results["refused-command"] = stats(timed(refused_command(vm), args.repeat))
        if want("pytest-per-test"):
            with_vm, empty = pytest_per_test(build, args.repeat * 2)
            results["pytest-per-test"] = {"median_ms": round(with_vm * 1000, 1),
                                          "pytest_alone_ms": round(empty * 1000, 1),
                                          "n": args.repeat * 2}
        from harness.scenarios.cbw import Layout
        for layout in Layout:
            name = f"scenario:{layout.value}"
            if want(name):
                run = scenario_runner(build, folder, layout.value)
                results[name] = stats(timed(run, max(3, args.repeat // 3)))
        if want("guest-boot"):
            results["guest-boot"] = stats(timed(guest_boot(build, folder),
                                                max(3, args.repeat // 5)))
    if args.make_check:
        for jobs in args.jobs:
            name = f"make-check-j{jobs}" + ("-slow" if args.speed == "slow" else "")
            results[name] = checked = make_check(jobs, args.speed)
            if checked["exit"]:
                print(f"make check JOBS={jobs} failed (exit {checked['exit']:g}): its time "
                      "measures nothing", file=sys.stderr)
    width = max(len(k) for k in results)
    print(f"QEMU {build.qemu_system}")
    for name, r in results.items():
        extra = ", ".join(f"{k}={v}" for k, v in r.items() if k != "median_ms")
        print(f"{name:<{width}}  median {r['median_ms']:8.1f} ms  ({extra})")
    if "qemu-bare" in results and "harness-machine" in results:
        overhead = results["harness-machine"]["median_ms"] - results["qemu-bare"]["median_ms"]
        print(f"harness overhead per machine: {overhead:+.1f} ms over bare QEMU")
    if "qemu-bare" in results and "pytest-per-test" in results:
        p = results["pytest-per-test"]
        fixture_cost = p["median_ms"] - p["pytest_alone_ms"] - results["qemu-bare"]["median_ms"]
        print(f"harness overhead per pytest test (folder, fixtures, teardown): "
              f"{fixture_cost:+.1f} ms over bare QEMU")
    # A run of some entries (--only) updates those and keeps the others' last figures.
    saved = ROOT / "bench" / "results.json"
    kept = json.loads(saved.read_text()) if saved.exists() else {}
    saved.write_text(json.dumps({**kept, **results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
