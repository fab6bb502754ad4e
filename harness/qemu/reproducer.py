"""A replayable case from a machine's QMP log: what ``replay.py`` needs, nothing else.

:func:`write_replay` turns ``<vm>.qmp.log`` (commands, replies, the notes of every
wait and HMP output, QEMU's end) into ``<vm>.replay.json`` beside it, and puts the
standalone ``replay.py`` in the same folder.  Paths of the test's folder become
``@DIR@`` and the QMP file descriptor ``@QMP_FD@``, so the case runs anywhere.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from . import replay

SCRIPT = Path(replay.__file__)


def images_folder(name: str) -> str:
    """Where a machine keeps its images as they were at launch (relative to its folder)."""
    return f"{name}.images"


def _relocatable(argv: list[str], workdir: str) -> list[str]:
    out = []
    for arg in argv:
        arg = arg.replace(workdir, replay.DIR)
        arg = re.sub(r"^socket,id=qmp,fd=\d+$", "socket,id=qmp,fd=@QMP_FD@", arg)
        arg = re.sub(r"^socket,id=console,fd=\d+$",
                     f"file,id=console,path={replay.DIR}/console.log", arg)
        out.append(arg)
    return out


def build_case(qmp_log: Path, test: str, failure: str) -> dict[str, Any]:
    """The case of one machine from its log; ``failure`` is the test's failure line."""
    name = qmp_log.name.removesuffix(".qmp.log")
    case: dict[str, Any] = {"test": test, "failure": failure, "argv": [], "steps": [],
                            "observed": [], "command_timeout": 20.0}
    workdir = ""
    pending: dict[str, dict[str, Any]] = {}   # QMP id -> its step, until the reply comes
    exit_info: dict[str, Any] = {}
    waits = 0
    for line in qmp_log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        msg = entry["msg"]
        if entry["dir"] == ">" and msg.get("execute") != "qmp_capabilities":
            step = {"qmp": {k: v for k, v in msg.items() if k in ("execute", "arguments")}}
            case["steps"].append(step)
            pending[msg.get("id", "")] = step
        elif entry["dir"] == "<" and "id" in msg and msg["id"] in pending:
            pending.pop(msg["id"])["reply"] = msg
        elif entry["dir"] == "#" and isinstance(msg, dict):
            if "launch" in msg:
                workdir = msg["workdir"]
                case["argv"] = _relocatable(msg["launch"], workdir)
                case["command_timeout"] = msg.get("command-timeout", 20.0)
                case["images"] = msg.get("images")
            elif "hmp-output" in msg:
                hmp = [s for s in case["steps"] if "qmp" in s]
                if hmp:
                    hmp[-1]["hmp-output"] = msg["hmp-output"]
            elif "wait" in msg:
                waits += 1
                case["steps"].append({"wait": msg["wait"], "timeout": msg["timeout"],
                                      "after-wait": msg["after-wait"], "number": waits,
                                      "got": msg["got"]})
            elif "exit" in msg:
                exit_info = msg
    if (Path(qmp_log.parent) / "images.jsonl").exists() and not case.get("images"):
        case["recipe"] = [json.loads(x) for x in
                          (qmp_log.parent / "images.jsonl").read_text().splitlines() if x]
    # What the test observed, in the words replay.py uses; it stops where QEMU did.
    for step in case["steps"]:
        if "qmp" in step:
            reply = step.pop("reply", None)
            line = replay.command_line(step["qmp"], reply, step.pop("hmp-output", None))
            case["observed"].append(line.replace(workdir, replay.DIR) if workdir else line)
            if reply is None:
                break
        else:
            case["observed"].append(replay.wait_line(step["wait"], step.pop("got")))
    for step in case["steps"]:
        step.pop("got", None)
        step.pop("reply", None)
        step.pop("hmp-output", None)
    case["observed"].append(replay.exit_line(exit_info.get("exit"),
                                             bool(exit_info.get("killed-by-harness"))))
    console = qmp_log.parent / f"{name}.console.log"
    if console.exists():
        case["observed"] += replay.guest_lines(console.read_text(errors="replace"))
    case["name"] = name
    return case


def write_replay(folder: Path, test: str, failure: str) -> list[Path]:
    """``<vm>.replay.json`` for each machine's log in ``folder``, and ``replay.py``."""
    written = []
    for log in sorted(folder.glob("*.qmp.log")):
        case = build_case(log, test, failure)
        if not case["argv"]:
            continue  # QEMU never started
        path = folder / log.name.replace(".qmp.log", ".replay.json")
        path.write_text(json.dumps(case, indent=1) + "\n")
        written.append(path)
    if written:
        shutil.copyfile(SCRIPT, folder / "replay.py")
        (folder / "replay.py").chmod(0o755)
    return written
