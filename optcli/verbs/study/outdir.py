"""OUT for a study: many workers, on several machines, write into it at once.

OUT/
  .optcli-output.json   what optcli wrote here (owned.py): updated under the flock of .sweep.lock
  .sweep.lock           serializes those updates and the summary writes between workers
  study.json            where the study lives (storage, its name): `optcli sweep --status OUT` reads it
  study.journal         the default storage (Optuna's journal file; .lock beside it while a worker writes)
  cache/                finished steps shared by the trials (steps.StepCache)
  t<NNN>-<values>/      one trial: a complete run (report.json|md|html, steps/, model)
  best -> t<NNN>-...    the trial chosen under the recipe's gates
  sweep.json|md|html    the study's summary

There is no folder-wide .optcli.lock (workers share OUT); each trial's run locks its own folder as `optcli run`
does, and a trial folder belongs to one trial number, so a killed worker's half-written folder is never
finished by another: its trial is retried under a new number, in a new folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

from optcli import owned
from optcli.errors import BadInput, writing
from optcli.report.write import atomic_write_text

LOCK = ".sweep.lock"
STUDY_FILE = "study.json"
NAMES = (
    LOCK,
    STUDY_FILE,
    "study.journal",
    "study.journal.lock",
    "cache",
    "best",
    "sweep.json",
    "sweep.md",
    "sweep.html",
)


@contextlib.contextmanager
def locked(out: Path):
    """An exclusive flock on OUT/.sweep.lock: one worker at a time updates the marker or writes the summary."""
    with writing(Path(out) / LOCK):
        fd = os.open(Path(out) / LOCK, os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def record(out: Path, *names: str) -> None:
    """List names as optcli's before they are written (what a later --overwrite may delete)."""
    with locked(out), writing(Path(out) / owned.MARKER):
        owned.record(Path(out), *names)


def read_study_file(out: Path) -> dict | None:
    try:
        data = json.loads((Path(out) / STUDY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def prepare(out: Path, overwrite: bool, worker: bool, study_file: dict) -> bool:
    """Make OUT ready for this study; return True when it already held it (a resumed or joined study).

    A folder holding another optcli output needs --overwrite (never with --worker: a worker joining others must
    not delete their work); a folder with files optcli did not write is refused whatever the flags."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BadInput(f"output {out} is a file; give a folder")
    if (out / owned.LOCK).exists():
        raise BadInput(f"output folder {out} is in use by an optcli run or grid sweep; wait for it")
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    with locked(out), writing(out / owned.MARKER):
        earlier = read_study_file(out)
        same = earlier is not None and all(earlier.get(k) == study_file.get(k) for k in ("storage", "study"))
        if overwrite or not same:
            reusable = _reusable(out)
            if reusable and not overwrite:
                raise BadInput(
                    f"output folder {out} holds an earlier optcli output"
                    + (f" (study {earlier.get('study')})" if earlier else "")
                    + (
                        "; a worker joins only the study started there"
                        if worker
                        else "; pass --overwrite to replace it"
                    )
                )
            if reusable:
                owned.remove_owned(out)
            same = False
        owned.begin(out, "sweep", *NAMES)
        atomic_write_text(out / STUDY_FILE, json.dumps(study_file, indent=2) + "\n")
    return same


def _reusable(out: Path) -> bool:
    """owned.check_reusable, with this module's own lock file (made before the marker) not taken for a stranger's."""
    if owned.is_output(out):
        return owned.holds_results(out)
    strangers = [n for n in owned.foreign(out) if n != LOCK]
    if strangers:
        raise BadInput(
            f"output folder {out} holds {strangers[0]}, which optcli did not write (--overwrite replaces only "
            "optcli's own output); choose another -o or remove it yourself"
        )
    return False
