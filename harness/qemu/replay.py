#!/usr/bin/env python3
"""Replay a recorded QEMU test case and check that it ends the same way.

    python3 replay.py /path/to/qemu-system-x86_64 [--qemu-img PATH] [--case NAME.replay.json]

Needs Python 3.9+ and nothing else.  The case file beside this script holds the QEMU
command line, how to recreate the disk images as they were before QEMU started,
the QMP commands in the order the test sent them, the events it waited for, and what
it observed.  The script recreates the images in a temporary folder, starts QEMU
with QMP on a socketpair, sends the same commands, waits (bounded) for the same
events, and compares what it observes with the recording: each command's reply
(ok, or the error), each HMP command's qemu-io error line, each awaited event's
name and key data, how QEMU exited, and a guest's result line for each of its I/O
operations.

Exit status: 1 if the recorded outcome shows again (the bug reproduces),
0 if it does not (the differences are printed), 2 if the replay could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

QUIT_TIMEOUT = 3.0
MAX_EVENTS_PER_NAME = 10_000  # a job that retries an error forever floods events
# Event data that identify what happened; the rest (offsets, lengths, times) varies.
KEY_DATA = ("device", "id", "node-name", "qom-path", "status", "operation", "action",
            "error", "reason", "nospace", "type")
DIR = "@DIR@"  # the test's folder in the recorded command line and messages


# ------------------------------------------------------------ what is compared
def qemu_io_error(output: str) -> str | None:
    """The error of the first failed qemu-io command in ``output`` (None: all ok)."""
    if "failed" not in output and "qemu-io:" not in output:
        return None  # the common case, and a read -v dump's thousands of lines
    for line in output.splitlines():
        m = re.search(r"\b(?:read|write|writev|readv|aio_\w+|flush|discard|"
                      r"write_zeroes|pwrite|pread)\S* failed: (.+)$", line)
        if m:
            return m.group(1).strip()
        if "Pattern verification failed" in line or "qemu-io:" in line:
            return line.strip()
    return None


def command_line(command: dict[str, Any], reply: dict[str, Any] | None,
                 hmp_output: str | None = None) -> str:
    """One line saying how QEMU answered ``command``."""
    name = command["execute"]
    if name == "human-monitor-command":
        name = f"hmp {command['arguments']['command-line']}"
    if reply is None:
        return f"{name} -> no reply"
    if "error" in reply:
        return f"{name} -> error {reply['error']['class']}: {reply['error']['desc']}"
    if hmp_output is not None:
        return f"{name} -> {qemu_io_error(hmp_output) or 'ok'}"
    return f"{name} -> ok"


def event_line(event: dict[str, Any]) -> str:
    data = event.get("data", {})
    key = {k: data[k] for k in KEY_DATA if k in data}
    return f"{event['event']} {json.dumps(key, sort_keys=True)}"


def wait_line(wanted: list[dict[str, Any]], got: dict[str, Any] | None) -> str:
    names = " or ".join(w["event"] for w in wanted)
    return f"wait {names} -> {event_line(got) if got else 'did not come'}"


def guest_lines(console: str) -> list[str]:
    """The result line the test's guest printed for each of its I/O operations, without
    times (``CBW-RESULT i=0 op=write dev=/dev/vda ... rc=1 err="Input/output error"``)."""
    return ["guest " + re.sub(r" t[01]=[\d.]+", "", line.strip().split(" ", 1)[1])
            for line in console.splitlines() if line.strip().startswith("CBW-RESULT ")]


def exit_line(code: int | None, killed: bool) -> str:
    if killed:
        return "QEMU exit: killed (it did not exit after quit, or stopped answering)"
    if code is None:
        return "QEMU exit: still running"
    if code < 0:
        return f"QEMU exit: killed by signal {-code} ({signal.Signals(-code).name})"
    return f"QEMU exit: exit status {code}"


# ------------------------------------------------------------------- the images
def make_images(case: dict[str, Any], here: Path, folder: Path, qemu_img: str | None) -> None:
    """Recreate the images as they were when QEMU started."""
    saved = here / case["images"] if case.get("images") else None
    if saved is not None and saved.is_dir():
        for src in saved.rglob("*"):
            if src.is_file():
                dest = folder / src.relative_to(saved)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dest)
        return
    formats: dict[str, str] = {}
    for op in case.get("recipe", []):
        if op["op"] == "copy":
            (folder / op["to"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / op["from"], folder / op["to"])
            formats[op["to"]] = formats.get(op["from"], "raw")
            continue
        path = folder / op["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        if op["op"] == "create":
            formats[op["path"]] = op.get("format", "raw")
        raw = formats.get(op["path"], "raw") == "raw"
        if op["op"] == "create" and raw:
            with open(path, "wb") as f:
                f.truncate(op["size"])
        elif op["op"] == "create":
            opts = [x for o in op.get("options", []) for x in ("-o", o)]
            tool(qemu_img, "qemu-img", ["create", "-q", "-f", op["format"], *opts,
                                        str(path), str(op["size"])])
        elif op["op"] == "fill" and raw:
            with open(path, "r+b") as f:
                f.seek(op["offset"])
                f.write(bytes([op["pattern"]]) * op["length"])
        elif op["op"] == "fill-seeded":  # Images.fill_seeded (raw only)
            with open(path, "r+b") as f:
                f.seek(op["offset"])
                f.write(random.Random(op["seed"]).randbytes(op["length"]))
        elif op["op"] == "fill":
            qemu_io = str(Path(qemu_img or "qemu-img").with_name("qemu-io"))
            tool(qemu_io, "qemu-io", ["-f", formats[op["path"]], "-c",
                                      f"write -P {op['pattern']} {op['offset']} {op['length']}",
                                      str(path)])


def tool(path: str | None, name: str, args: list[str]) -> None:
    if path is None:
        sys.exit(f"this case has qcow2 images: give --qemu-img (and a {name} beside it)")
    subprocess.run([path, *args], check=True, timeout=60, stdin=subprocess.DEVNULL)


# --------------------------------------------------------------------- QEMU
class Monitor:
    """QMP over a socket: commands with a time limit, events kept in order."""

    def __init__(self, sock: socket.socket, proc: subprocess.Popen[bytes]):
        self.sock, self.proc = sock, proc
        self.buffer = b""
        self.events: list[dict[str, Any]] = []
        self.per_name: dict[str, int] = {}
        self.consumed: set[int] = set()
        self.closed = False
        self.next_id = 0

    def receive(self, deadline: float) -> dict[str, Any] | None:
        """The next message, or None at the deadline or when QEMU closed QMP."""
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if self.closed or left <= 0 or not select.select([self.sock], [], [], left)[0]:
                return None
            data = self.sock.recv(1 << 16)
            if not data:
                self.closed = True
                return None
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        if "event" in message:
            count = self.per_name.get(message["event"], 0)
            if count < MAX_EVENTS_PER_NAME:
                self.per_name[message["event"]] = count + 1
                self.events.append(message)
        return message

    def execute(self, command: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        self.next_id += 1
        msg_id = f"replay-{self.next_id}"
        try:
            self.sock.sendall(json.dumps({**command, "id": msg_id}).encode() + b"\n")
        except OSError:
            self.closed = True
            return None
        deadline = time.monotonic() + timeout
        while (msg := self.receive(deadline)) is not None:
            if msg.get("id") == msg_id:
                return msg
        return None

    def wait(self, wanted: list[dict[str, Any]], timeout: float, start: int) -> int | None:
        """Index of the earliest event not returned before, from ``start``, that
        matches one of ``wanted`` (name and at least that data)."""
        deadline = time.monotonic() + timeout
        scanned = start
        while True:
            for i in range(scanned, len(self.events)):
                if i not in self.consumed and any(matches(self.events[i], w) for w in wanted):
                    self.consumed.add(i)
                    return i
            scanned = len(self.events)
            if self.receive(deadline) is None and (self.closed or time.monotonic() >= deadline):
                return None


def matches(event: dict[str, Any], wanted: dict[str, Any]) -> bool:
    def contains(actual: Any, want: Any) -> bool:
        if isinstance(want, dict):
            return isinstance(actual, dict) and all(
                k in actual and contains(actual[k], v) for k, v in want.items())
        return bool(actual == want)
    return event["event"] == wanted["event"] and contains(event.get("data", {}),
                                                          wanted.get("data", {}))


def replay(case: dict[str, Any], qemu_system: str, folder: Path) -> list[str]:
    """Run the case on QEMU in ``folder``; returns what was observed, a line a step."""
    ours, theirs = socket.socketpair()
    argv = [qemu_system] + [a.replace(DIR, str(folder)).replace("@QMP_FD@", str(theirs.fileno()))
                            for a in case["argv"][1:]]
    print("$ " + shlex.join(argv))
    stdout = open(folder / "qemu.stdout", "w+b")  # noqa: SIM115 (QEMU's, read as it goes)
    with open(folder / "qemu.stderr", "wb") as stderr:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                cwd=folder, pass_fds=[theirs.fileno()], start_new_session=True)
    theirs.close()
    qmp = Monitor(ours, proc)
    observed: list[str] = []
    killed = False
    try:
        qmp.receive(time.monotonic() + 30)  # the greeting
        qmp.execute({"execute": "qmp_capabilities"}, 30)
        returned: dict[int, int] = {}  # wait number -> index of the event it returned
        for step in case["steps"]:
            if "qmp" in step:
                printed = stdout.seek(0, os.SEEK_END)
                reply = qmp.execute(step["qmp"], case["command_timeout"])
                hmp = None
                if reply and "return" in reply and \
                        step["qmp"]["execute"] == "human-monitor-command":
                    stdout.seek(printed)
                    hmp = str(reply["return"]) + stdout.read().decode(errors="replace")
                observed.append(command_line(step["qmp"], reply, hmp).replace(str(folder), DIR))
                if reply is None:
                    break  # QEMU is dead or stopped answering: nothing more to send
            elif "wait" in step:
                after = step.get("after-wait")
                start = returned[after] + 1 if after in returned else 0
                index = qmp.wait(step["wait"], step["timeout"], start)
                if index is not None:
                    returned[step["number"]] = index
                observed.append(wait_line(step["wait"], None if index is None
                                          else qmp.events[index]))
        sent_quit = any(s.get("qmp", {}).get("execute") == "quit" for s in case["steps"])
        try:  # QEMU exits by itself after quit; the test killed it otherwise
            proc.wait(QUIT_TIMEOUT if sent_quit or qmp.closed else 0.01)
        except subprocess.TimeoutExpired:
            pass
    finally:
        if proc.poll() is None:
            killed = True
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        ours.close()
        stdout.close()
    observed.append(exit_line(proc.returncode, killed))
    console = folder / "console.log"
    if console.exists():
        observed += guest_lines(console.read_text(errors="replace"))
    err = (folder / "qemu.stderr").read_text(errors="replace").strip()
    if err:
        print("QEMU's stderr (tail):\n  " + "\n  ".join(err.splitlines()[-10:]))
    return observed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("qemu_system", help="the qemu-system-x86_64 to run")
    ap.add_argument("--qemu-img", help="qemu-img, to recreate qcow2 images")
    ap.add_argument("--case", help="the case file (default: the only *.replay.json here)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    here = Path(__file__).resolve().parent
    cases = [Path(args.case)] if args.case else sorted(here.glob("*.replay.json"))
    if len(cases) != 1:
        sys.exit(f"{len(cases)} case files here: choose one with --case")
    case_path = cases[0] if cases[0].is_absolute() else here / cases[0]
    case = json.loads(case_path.read_text())
    print(f"replaying {case_path.name}: {case['test']}")
    folder = Path(tempfile.mkdtemp(prefix="replay-"))
    try:
        make_images(case, case_path.parent, folder, args.qemu_img)
        observed = replay(case, args.qemu_system, folder)
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    print("observed:\n  " + "\n  ".join(observed))
    expected = case["observed"]
    if observed == expected:
        print(f"REPRODUCED: the run ended as the test's did; the test said:\n  {case['failure']}")
        return 1
    print("NOT REPRODUCED: this run differs from the recorded one:")
    for i in range(max(len(observed), len(expected))):
        was = expected[i] if i < len(expected) else "(nothing)"
        now = observed[i] if i < len(observed) else "(nothing)"
        if was != now:
            print(f"  step {i + 1}: recorded {was}\n  {' ' * len(str(i + 1))}       now {now}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
