"""What every command body shares: errors mapped to exit codes in one stderr line, and results where CI reads them
(--json on stdout, --junit XML, the GitHub Actions job summary)."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import typer

from optcli.errors import EXIT_INTERRUPTED, EXIT_PASS_FAILED


def err(message: str) -> None:
    # One line always: library messages can carry newlines and terminal colour codes (torch's do).
    message = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", message).split())
    sys.stderr.write(message + "\n")


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def guarded(fn: Callable[[], int | None], debug: bool, on_error: Callable[[str, str, int], None] | None = None) -> None:
    """Run a command body; map errors to exit codes with one line on stderr (traceback with --debug).

    on_error(message, kind, exit_code) reports an error where CI reads results too (--json, --junit)."""
    from optcli.errors import DISK_FULL, OptcliError, first_line

    def _sigterm(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _sigterm)
    debug = debug or os.environ.get("OPTCLI_DEBUG") == "1"
    try:
        code = fn() or 0
    except OptcliError as e:
        if debug:
            import traceback

            traceback.print_exc()
        err(f"error: {e}")
        code = e.exit_code
        _report_error(on_error, str(e), type(e).__name__, code)
    except KeyboardInterrupt:
        err("interrupted: nothing half-written was left at the output paths")
        code = EXIT_INTERRUPTED
    except Exception as e:  # a bug: still one line unless --debug
        if debug:
            import traceback

            traceback.print_exc()
        if isinstance(e, OSError) and e.errno in DISK_FULL:  # a write no writing() block named
            err(f"error: disk full while writing {e.filename or 'output'}: free some space and rerun")
        else:
            err(
                f"error: internal error: {type(e).__name__}: {first_line(e, 1000)} (rerun with --debug for the traceback)"
            )
        code = EXIT_PASS_FAILED
        _report_error(on_error, f"internal error: {type(e).__name__}: {first_line(e, 1000)}", "InternalError", code)
    finally:
        signal.signal(signal.SIGTERM, previous)
    raise typer.Exit(code)


def _report_error(on_error, message: str, kind: str, code: int) -> None:
    if on_error is None:
        return
    try:
        on_error(" ".join(message.split()), kind, code)
    except Exception as e:  # the error already printed is the one to see; this one is said after it
        err(f"error: could not report the error for CI: {type(e).__name__}: {e}")


def ci_error(command: str, json_out: bool, junit: Path | None) -> Callable[[str, str, int], None]:
    """--json gets {"error", "exit_code"} on stdout, --junit one <error> test case: a CI job that reads either
    sees why the run stopped instead of nothing."""

    def report(message: str, kind: str, code: int) -> None:
        if json_out:
            print_json({"error": message, "exit_code": code})
        if junit is not None:
            from optcli.report.ci import junit_error_xml
            from optcli.report.write import atomic_write_text

            atomic_write_text(junit, junit_error_xml(command, message, kind))

    return report


def ci_results(junit: Path | None, suites: list, markdown: Path) -> None:
    """--junit PATH gets the gates as JUnit XML; a GitHub Actions job summary gets the Markdown report."""
    from optcli.errors import writing
    from optcli.report.ci import append_step_summary, write_junit

    if junit is not None:
        if junit.absolute().parent == markdown.absolute().parent:  # in OUT: optcli's, so --overwrite replaces it
            from optcli import owned

            with writing(markdown.parent / owned.MARKER):
                owned.record(markdown.parent, junit.name)
        with writing(junit):
            write_junit(junit, suites)
    with writing(os.environ.get("GITHUB_STEP_SUMMARY") or "$GITHUB_STEP_SUMMARY"):
        append_step_summary(markdown.read_text(encoding="utf-8"))
