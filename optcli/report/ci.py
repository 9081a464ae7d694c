"""Results where CI shows them: gates as JUnit XML (GitLab, Jenkins and GitHub test reporters read it without glue),
and the Markdown report appended to GitHub's job summary ($GITHUB_STEP_SUMMARY).

Standard library only (ElementTree builds the XML).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

from optcli.report.write import atomic_write_text


def gate_message(gate: dict) -> str:
    interval = gate.get("interval")
    text = f"{gate['name']}: value {gate.get('value')}"
    if isinstance(interval, list) and len(interval) == 2:
        text += f" (95% interval {interval[0]} to {interval[1]})"
    text += f", limit {gate.get('limit')}"
    if gate.get("verdict") == "inconclusive":
        text += ", INCONCLUSIVE: the interval straddles the limit, counted as " + (
            "passed" if gate.get("passed") else "failed"
        )
    return text + (f" ({gate['note']})" if gate.get("note") else "")


def junit_xml(suites: list[tuple[str, list[dict], float | None]]) -> str:
    """One <testsuite> per run (a sweep: per variant), one <testcase> per gate; a failed gate is a <failure>.

    suites: (name, gates as in report.json {name, limit, value, passed, note?}, seconds) each."""
    root = ET.Element("testsuites", name="optcli")
    total = failed = 0
    for name, gates, seconds in suites:
        failures = sum(not g.get("passed") for g in gates)
        suite = ET.SubElement(
            root,
            "testsuite",
            name=name,
            tests=str(len(gates)),
            failures=str(failures),
            errors="0",
            skipped="0",
            time=f"{seconds or 0:.3f}",
        )
        for gate in gates:
            case = ET.SubElement(suite, "testcase", classname=f"optcli.{name}", name=str(gate["name"]), time="0")
            props = ET.SubElement(case, "properties")
            # A timing verdict adds its own properties; an inconclusive one that counts as passed stays a passed case
            # (its system-out says so): a skipped case would read as "not run" in CI reporters.
            for key in ("limit", "value", *(("verdict", "interval") if gate.get("verdict") else ())):
                ET.SubElement(props, "property", name=key, value=str(gate.get(key)))
            if gate.get("passed"):
                ET.SubElement(case, "system-out").text = gate_message(gate)
            else:
                ET.SubElement(case, "failure", message=gate_message(gate), type="GateFailed").text = gate_message(gate)
        total, failed = total + len(gates), failed + failures
    root.set("tests", str(total))
    root.set("failures", str(failed))
    root.set("errors", "0")
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def junit_error_xml(name: str, message: str, kind: str) -> str:
    """A run that stopped before any gate (bad input, a failed pass) as one <error> test case, so a CI test reporter
    shows the error instead of "no results"."""
    root = ET.Element("testsuites", name="optcli", tests="1", failures="0", errors="1")
    suite = ET.SubElement(root, "testsuite", name=name, tests="1", failures="0", errors="1", skipped="0", time="0")
    case = ET.SubElement(suite, "testcase", classname=f"optcli.{name}", name=name, time="0")
    ET.SubElement(case, "error", message=message, type=kind).text = message
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(path: Path, suites: list[tuple[str, list[dict], float | None]]) -> Path:
    """Written whole or not at all (the atomic write of every report)."""
    return atomic_write_text(Path(path), junit_xml(suites))


def append_step_summary(markdown: str) -> Path | None:
    """Append markdown to $GITHUB_STEP_SUMMARY when it is set (a GitHub Actions job); return its path."""
    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if not target:
        return None
    with open(target, "a", encoding="utf-8") as f:
        f.write(markdown.rstrip("\n") + "\n\n")
    return Path(target)
