"""The matrix report: ``report.json`` (the contract), ``report.md``, ``report.html`` and
one JUnit XML per build, from the runs of one matrix."""

from __future__ import annotations

import datetime
import html
import json
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..plugin.results import OUTCOMES, harness_version
from .runs import Run

BUILD_KEYS = ("name", "version", "package", "origin")


def build_report(runs: Sequence[Run], selection: Sequence[str]) -> dict[str, Any]:
    """``{"builds": [...], "tests": {nodeid: {build: {"outcome", "reason"}}}}`` and more.

    A build that could not run gets an error cell, with its one-line reason, for every
    test the others ran."""
    nodeids: list[str] = []
    for run in runs:
        nodeids += [n for n in run.tests if n not in nodeids]
    tests: dict[str, dict[str, dict[str, str]]] = {n: {} for n in sorted(nodeids)}
    for run in runs:
        for nodeid, cells in tests.items():
            if run.results is None:
                cells[run.name] = {"outcome": "error", "reason": f"build could not run: "
                                                                 f"{run.failure}"}
            elif nodeid in run.tests:
                t = run.tests[nodeid]
                cells[run.name] = {"outcome": t["outcome"], "reason": t.get("reason", "")}
    builds = []
    for run in runs:
        entry = {k: run.build.get(k) for k in BUILD_KEYS}
        entry["name"] = run.name
        entry["seconds"] = round(run.seconds, 1)
        entry["counts"] = (run.results or {}).get("counts", {})
        if run.results is None:
            entry["error"] = run.failure
        builds.append(entry)
    return {"builds": builds, "tests": tests, "harness_version": harness_version(),
            "selection": list(selection),
            "written": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def differing(report: dict[str, Any]) -> list[str]:
    """Tests whose outcome is not the same on every build that ran."""
    ran = {b["name"] for b in report["builds"] if not b.get("error")}
    return [n for n, cells in report["tests"].items()
            if len({c["outcome"] for b, c in cells.items() if b in ran}) > 1]


def _md_cell(cell: dict[str, str] | None) -> str:
    if cell is None:
        return "-"
    reason = cell["reason"].replace("|", "\\|")
    return cell["outcome"] + (f": {reason[:80]}" if reason and cell["outcome"] != "passed"
                              else "")


def render_md(report: dict[str, Any]) -> str:
    names = [b["name"] for b in report["builds"]]
    out = ["# cbw-harness matrix", "", "| build | QEMU | package | origin | " +
           " | ".join(OUTCOMES) + " |", "|---" * (4 + len(OUTCOMES)) + "|"]
    for b in report["builds"]:
        counts = b.get("counts") or {}
        if b.get("error"):
            out.append(f"| {b['name']} | - | - | {b['origin']} | could not run: "
                       f"{b['error']} |" + " |" * (len(OUTCOMES) - 1))
        else:
            out.append(f"| {b['name']} | {b['version']} | {b['package']} | {b['origin']} | "
                       + " | ".join(str(counts.get(k, 0)) for k in OUTCOMES) + " |")
    diff = differing(report)
    out += ["", f"## Tests whose outcome differs across builds ({len(diff)})", ""]
    if diff:
        out += ["| test | " + " | ".join(names) + " |", "|---" * (1 + len(names)) + "|"]
        out += [f"| `{n}` | " + " | ".join(_md_cell(report["tests"][n].get(b))
                                           for b in names) + " |" for n in diff]
    else:
        out.append("None: every test has the same outcome on every build.")
    out += ["", f"## All tests ({len(report['tests'])})", "", "<details>", "",
            "| test | " + " | ".join(names) + " |", "|---" * (1 + len(names)) + "|"]
    out += [f"| `{n}` | " + " | ".join(_md_cell(cells.get(b)) for b in names) + " |"
            for n, cells in report["tests"].items()]
    out += ["", "</details>", ""]
    return "\n".join(out)


_HTML_STYLE = """
body{font-family:sans-serif;font-size:13px} table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:2px 6px;vertical-align:top} td.t{font-family:monospace}
.passed{background:#cfc}.failed{background:#f99}.error{background:#f6a}
.skipped{background:#eee}.xfailed{background:#fd8}.xpassed{background:#9cf}
"""
_HTML_SCRIPT = """
function apply(){var want={};document.querySelectorAll('input.o').forEach(function(c){
 want[c.value]=c.checked});var only=document.getElementById('diff').checked;
 document.querySelectorAll('tr.row').forEach(function(r){var os=r.dataset.o.split(' ');
 var show=os.some(function(o){return want[o]});if(only&&r.dataset.d!=='1')show=false;
 r.style.display=show?'':'none'})}
document.querySelectorAll('input').forEach(function(c){c.onchange=apply});
"""


def render_html(report: dict[str, Any]) -> str:
    """One static page, no network: a grid of tests x builds, filterable by outcome."""
    e = html.escape
    names = [b["name"] for b in report["builds"]]
    diff = set(differing(report))
    head = "".join(f"<tr><td>{e(b['name'])}</td><td>{e(str(b.get('version')))}</td>"
                   f"<td>{e(str(b.get('package')))}</td><td>{e(str(b.get('origin')))}</td>"
                   f"<td>{e(b.get('error') or json.dumps(b.get('counts')))}</td></tr>"
                   for b in report["builds"])
    filters = "".join(f'<label><input type="checkbox" class="o" value="{o}" checked> {o}'
                      f"</label> " for o in OUTCOMES)
    rows = []
    for nodeid, cells in report["tests"].items():
        outcomes = " ".join(sorted({c["outcome"] for c in cells.values()}))
        tds = "".join(
            f'<td class="{e(c["outcome"])}" title="{e(c["reason"])}">{e(c["outcome"])}'
            + (f"<br><small>{e(c['reason'][:120])}</small>" if c["reason"]
               and c["outcome"] != "passed" else "") + "</td>"
            if (c := cells.get(b)) else "<td>-</td>" for b in names)
        rows.append(f'<tr class="row" data-o="{outcomes}" data-d="{int(nodeid in diff)}">'
                    f'<td class="t">{e(nodeid)}</td>{tds}</tr>')
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>cbw-harness matrix"
            f"</title><style>{_HTML_STYLE}</style></head><body><h1>cbw-harness matrix</h1>"
            f"<table><tr><th>build</th><th>QEMU</th><th>package</th><th>origin</th>"
            f"<th>result</th></tr>{head}</table><p>Show: {filters} <label><input "
            f"type='checkbox' id='diff'> only tests that differ ({len(diff)})</label></p>"
            f"<table><tr><th>test</th>{''.join(f'<th>{e(n)}</th>' for n in names)}</tr>"
            f"{''.join(rows)}</table><script>{_HTML_SCRIPT}</script></body></html>")


def write_junit(run: Run, dest: Path) -> Path:
    """The build's JUnit XML, its testsuite named after the build and its QEMU version."""
    label = f"cbw-harness QEMU {run.name} ({run.build.get('version') or 'did not start'})"
    src = run.folder / "junit.xml"
    if run.results is not None and src.exists() and src.resolve() != dest.resolve():
        tree = ET.parse(src)
        for suite in tree.getroot().iter("testsuite"):
            suite.set("name", label)
        tree.write(dest, encoding="utf-8", xml_declaration=True)
        return dest
    suites = ET.Element("testsuites")
    suite = ET.SubElement(suites, "testsuite", name=label, tests="1", errors="1",
                          failures="0", skipped="0")
    case = ET.SubElement(suite, "testcase", classname="cbw-harness", name="build starts")
    ET.SubElement(case, "error", message=run.failure or "no JUnit file").text = run.failure
    ET.ElementTree(suites).write(dest, encoding="utf-8", xml_declaration=True)
    return dest


def write_all(runs: Sequence[Run], selection: Sequence[str], out: Path) -> dict[str, Any]:
    report = build_report(runs, selection)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(render_md(report))
    (out / "report.html").write_text(render_html(report))
    for run in runs:
        write_junit(run, out / f"junit-{run.name}.xml")
    return report
