"""What optcli wrote in an output folder, so that --overwrite deletes that and nothing else.

OUT/.optcli-output.json   {"optcli_version", "kind": "run" | "sweep", "wrote": [top-level names optcli wrote]}

A name is listed before its file is written, so a run stopped mid-write leaves nothing unlisted. Inside steps/
and cache/ optcli owns only the entries it names (<n>-<type>..., their .tmp twins); a file a user puts there, or
anywhere else in the folder, is kept. A folder without the marker is no optcli output, unless it is one from
before the marker: report.json (or sweep.json) written by optcli, whose known names are then optcli's (steps/,
report.*, the artifact report.json names with its external data; cache/, best, sweep.*, the variant folders).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from optcli.errors import BadInput
from optcli.report.write import atomic_write_text

MARKER = ".optcli-output.json"
LOCK = ".optcli.lock"
INNER = ("steps", "cache")  # optcli's own folders; it owns the entries it names in them
_STEP_ENTRY = re.compile(r"^\.?\d+-")  # steps/<n>-<type>, cache/<n>-<type>-<key>[.lock], their .tmp-PID twins
_TEMP = re.compile(r"^\.(.+?)\.(?:[^.]*\.tmp|tmp-\d+)$")  # .<name>.<random>.tmp (atomic writes), .<name>.tmp-PID


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _legacy_names(root: Path) -> set[str]:
    """The names an optcli from before the marker wrote in root (empty when root shows none)."""
    names: set[str] = set()
    steps = root / "steps"
    if steps.is_dir() and not steps.is_symlink() and all(_STEP_ENTRY.match(p.name) for p in steps.iterdir()):
        names.add("steps")  # also an interrupted run's empty steps/
    report = _read_json(root / "report.json")
    if report is not None and "optcli_version" in report:
        names |= {"steps", "report.json", "report.md", "report.html"}
        final = Path(str((report.get("output") or {}).get("path") or ""))
        if final.name and (root / final.name).exists():
            names.add(final.name)
            if final.suffix == ".onnx":
                names |= {f.name for f in _external_data(root / final.name)}
    sweep = _read_json(root / "sweep.json")
    if sweep is not None and "optcli_version" in sweep:
        names |= {"cache", "best", "sweep.json", "sweep.md", "sweep.html"}
        names |= {str(r.get("folder")) for r in sweep.get("variants") or [] if isinstance(r, dict) and r.get("folder")}
    return {n for n in names if n and "/" not in n and n not in (".", "..")}


def _external_data(model: Path) -> list[Path]:
    from optcli.artifact import artifact_files

    try:
        return [f for f in artifact_files(model)[1:] if f.parent == model.parent]
    except Exception:  # a damaged model: its data files are not known, so they are kept
        return []


def is_output(root: Path) -> bool:
    """Whether root carries optcli's marker or is an optcli output from before the marker."""
    if (root / MARKER).is_file():
        return True
    report, sweep = _read_json(root / "report.json"), _read_json(root / "sweep.json")
    return any(d is not None and "optcli_version" in d for d in (report, sweep))


def owned_names(root: Path) -> set[str]:
    """The top-level names in root that optcli wrote (the marker and lock included)."""
    marker = _read_json(root / MARKER) or {}
    listed = {str(n) for n in marker.get("wrote") or [] if isinstance(n, str) and "/" not in n}
    return {MARKER, LOCK} | listed | _legacy_names(root)


def _owns(name: str, owned: set[str]) -> bool:
    temp = _TEMP.match(name)
    return name in owned or (temp is not None and temp[1] in owned)


def foreign(root: Path) -> list[str]:
    """Top-level entries of root that optcli did not write, sorted."""
    owned = owned_names(root)
    return sorted(p.name for p in root.iterdir() if not _owns(p.name, owned))


def holds_results(root: Path) -> bool:
    """Whether root holds anything of optcli's worth keeping: a finished step, an artifact, a report, a variant.
    An interrupted run's leftovers (the marker, an empty steps/, temp files) are not."""
    owned = owned_names(root)
    for p in root.iterdir():
        if p.name in (MARKER, LOCK) or _TEMP.match(p.name) or not _owns(p.name, owned):
            continue
        if p.name in INNER and p.is_dir() and not p.is_symlink():
            if any((e / "step.json").is_file() for e in p.iterdir() if _STEP_ENTRY.match(e.name)):
                return True
        elif p.is_dir() and not p.is_symlink() and is_output(p):  # a sweep's variant folder
            if holds_results(p):
                return True
        else:
            return True
    return False


def begin(root: Path, kind: str, *names: str) -> None:
    """Mark root as an optcli output, keeping the names optcli wrote there before that still exist."""
    from optcli import __version__

    kept = {n for n in owned_names(root) - {MARKER, LOCK} if (root / n).exists() or (root / n).is_symlink()}
    _write(root, {"optcli_version": __version__, "kind": kind, "wrote": sorted(kept | set(names))})


def record(root: Path, *names: str) -> None:
    """List names as optcli's before they are written (root must carry the marker)."""
    marker = _read_json(root / MARKER)
    if marker is None:
        return
    wrote = set(marker.get("wrote") or [])
    if not set(names) <= wrote:
        _write(root, {**marker, "wrote": sorted(wrote | set(names))})


def _write(root: Path, marker: dict) -> None:
    atomic_write_text(root / MARKER, json.dumps(marker, indent=2) + "\n")


def remove_owned(root: Path) -> None:
    """Delete what optcli wrote in root (the marker and lock stay: the run holding the folder rewrites them)."""
    owned = owned_names(root)
    for p in list(root.iterdir()):
        if p.name in (MARKER, LOCK) or not _owns(p.name, owned):
            continue
        if p.is_symlink() or not p.is_dir():
            p.unlink()
        elif p.name in INNER:
            for entry in p.iterdir():
                # A fine-tune's epoch checkpoints (<n>-finetune.ckpt/) are what --resume continues from: kept.
                if _STEP_ENTRY.match(entry.name) and not entry.name.endswith(".ckpt"):
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            rmdir_if_empty(p)
        elif is_output(p):  # a sweep's variant: its own list says what is optcli's (a user's notes in it stay)
            remove_owned(p)
            drop_leftovers(p)
            rmdir_if_empty(p)
        else:
            shutil.rmtree(p)


def drop_leftovers(root: Path) -> None:
    """When root holds no result, remove optcli's leftovers there (empty steps/ and cache/, the marker): a run
    that finished nothing leaves nothing behind (the caller removes the lock, then root if it made it)."""
    if not root.is_dir() or holds_results(root):
        return
    owned = owned_names(root)
    for p in list(root.iterdir()):
        if p.name in INNER and p.is_dir() and not p.is_symlink() and _owns(p.name, owned):
            for entry in p.iterdir():
                # A fine-tune's epoch checkpoints (<n>-finetune.ckpt/) are what --resume continues from: kept.
                if _STEP_ENTRY.match(entry.name) and not entry.name.endswith(".ckpt"):
                    shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            rmdir_if_empty(p)
    if all(p.name in (MARKER, LOCK) for p in root.iterdir()):
        (root / MARKER).unlink(missing_ok=True)


def check_reusable(root: Path) -> bool:
    """Whether root holds an earlier optcli result (--overwrite or --resume needed). A folder that optcli did not
    write is refused whatever the flags (--overwrite would delete the user's files); one holding only optcli's
    leftovers (an interrupted run's empty steps/) counts as empty."""
    if not root.is_dir() or not any(p.name != LOCK for p in root.iterdir()):
        return False
    if not is_output(root):
        strangers = foreign(root)
        if strangers:
            raise BadInput(
                f"output folder {root} holds {strangers[0]}, which optcli did not write (--overwrite replaces only "
                "optcli's own output); choose another -o or remove it yourself"
            )
        return False
    return holds_results(root)


def rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass
