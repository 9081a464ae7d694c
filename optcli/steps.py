"""The output folder and its steps: refusal to clobber, the lock, step records and the --resume cache.

out/
  .optcli.lock         pid of the run holding the folder
  .optcli-output.json  what optcli wrote here: all that --overwrite deletes (owned.py)
  steps/<n>-<type>/    each step's artifact + step.json (its key: input bytes + config + model + data + seed)
  model.onnx|.pt2      the final artifact, copied in last
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from optcli import owned
from optcli.artifact import artifact_files
from optcli.errors import BadInput, writing
from optcli.model import Model
from optcli.owned import LOCK
from optcli.report.write import atomic_path, atomic_write_text


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    for f in artifact_files(path) if path.suffix == ".onnx" or path.is_dir() else [path]:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def atomic_copy(src: Path, dst: Path) -> None:
    with writing(dst), atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


class OutputFolder:
    """The run's output folder: refuses to clobber, locks against a concurrent run, cleans up temp files.

    --overwrite deletes only what optcli wrote there (owned.py keeps the list); a folder optcli did not write
    is refused, and one holding only an interrupted run's leftovers counts as empty.
    """

    def __init__(self, root: Path, overwrite: bool, resume: bool, inputs: Sequence[Path] = ()):
        # Absolute: libraries run in a temp working directory (ORT's quantizer writes relative to it), and the
        # paths steps hand them must still point here.
        self.root = root.absolute()
        self.lock = self.root / LOCK
        self.created = not root.exists()
        if root.exists() and not root.is_dir():
            raise BadInput(f"output {root} is a file; give a folder")
        for path in inputs:  # the final copy or a report could land on it
            if inside(path, root):
                raise BadInput(f"output folder {root} holds the input {path}; choose an output folder of its own")
        if self.lock.exists():
            self._in_use()
        if owned.check_reusable(root) and not (overwrite or resume):
            earlier = (
                "holds an earlier optcli run"
                if (root / "report.json").is_file()
                else "holds an earlier run's finished steps"
            )
            raise BadInput(
                f"output folder {root} {earlier}; pass --overwrite to replace it, --resume to reuse its finished "
                "steps, or choose another -o"
            )
        with writing(self.lock):
            root.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                self._in_use()
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
        try:  # the lock is ours from here: a signal or error before the run's own try must still release it
            with writing(self.root / owned.MARKER):
                if overwrite and not resume:
                    owned.remove_owned(self.root)
                owned.begin(self.root, "run", "steps")
            (root / "steps").mkdir(exist_ok=True)
        except BaseException:
            self.close()
            raise

    def record(self, *names: str) -> None:
        """List top-level names as optcli's before writing them (what a later --overwrite may delete)."""
        with writing(self.root / owned.MARKER):
            owned.record(self.root, *names)

    def _in_use(self):
        try:
            pid = self.lock.read_text().strip()
        except OSError:
            pid = ""
        raise BadInput(
            f"output folder {self.root} is in use by another optcli run (pid {pid or '?'}); wait for it, "
            f"or delete {self.lock} if that run is gone"
        ) from None

    def step_tmp(self, name: str) -> Path:
        tmp = self.root / "steps" / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        with writing(tmp):
            tmp.mkdir(parents=True)
        return tmp

    def finish_step(self, tmp: Path, name: str) -> Path:
        final = self.root / "steps" / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        return final

    def close(self) -> None:
        try:
            for tmp in (self.root / "steps").glob(".*.tmp-*"):
                shutil.rmtree(tmp, ignore_errors=True)
            owned.drop_leftovers(self.root)  # a run that finished nothing leaves nothing that blocks the same command
        finally:
            self.lock.unlink(missing_ok=True)
        if self.created:
            owned.rmdir_if_empty(self.root)


def step_key(previous: str, config) -> str:
    return hashlib.sha256((previous + json.dumps(config.model_dump(mode="json"), sort_keys=True)).encode()).hexdigest()


def finished_step(done: Path, key: str) -> dict | None:
    """The record of a finished step with this key whose artifact is intact on disk, else None (run it again)."""
    try:
        record = json.loads(done.read_text())
        if record.get("key") != key:
            return None
        artifact = done.parent / record["artifact"]
        return record if sha256_file(artifact) == record["sha256"] else None
    except Exception:  # half-written, edited (a broken ONNX raises DecodeError) or from an older optcli: not trusted
        return None


def input_key(recipe) -> str:
    """What every step depends on besides its own config: the model file, the data files, the seed."""
    parts = [
        sha256_file(recipe.model.path),
        json.dumps(recipe.model.model_dump(mode="json"), sort_keys=True),
        json.dumps(recipe.data.model_dump(mode="json"), sort_keys=True),
        str(recipe.seed),
    ]
    for name in ("calibration", "eval", "train"):
        source = getattr(recipe.data, name)
        if source is not None and source.path is not None:
            parts.append(sha256_file(source.path))
        if source is not None and source.text is not None:  # text: its bytes and the tokenizer that reads them
            parts += [sha256_file(source.text)] + ([sha256_file(source.tokenizer)] if source.tokenizer else [])
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def reload_step(step_dir: Path, record: dict, model: Model) -> Model:
    path = step_dir / record["artifact"]
    if path.suffix == ".onnx":
        return model.with_(format="onnx", module=None, path=path)
    if path.is_dir():
        from optcli.measure import reload_folder

        return model.with_(format="torch", module=reload_folder(path, model.task).module, path=path)
    import torch

    return model.with_(format="torch", module=torch.export.load(str(path)).module(), path=path)


def write_final(model: Model, folder: OutputFolder) -> dict:
    src, root = model.path, folder.root
    assert src is not None, "the final model is always a step's artifact or the user's file, both on disk"
    files = artifact_files(src)
    folder.record(*([src.name] if src.is_dir() else [f.name for f in files]))
    if src.is_dir():  # a Hugging Face folder keeps its layout (sentence-transformers modules in subfolders)
        for f in files:
            (root / src.name / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            atomic_copy(f, root / src.name / f.relative_to(src))
    # The model file is always model.<ext>, whatever the step (or, with every pass skipped, the user) named it;
    # external data keeps its name, which the model file records.
    final = root / (src.name if src.is_dir() else "model" + src.suffix.lower())
    for f in [] if src.is_dir() else files[1:]:  # external data first: never a model pointing at nothing
        atomic_copy(f, root / f.name)
    if not src.is_dir():
        atomic_copy(src, final)
    return {"path": str(final), "format": model.format, "sha256": sha256_file(final)}


def write_record(step_dir: Path, record: dict) -> None:
    """step.json goes in before the step folder is renamed into place, so a finished step always has it, whole."""
    with writing(step_dir / "step.json"):
        atomic_write_text(step_dir / "step.json", json.dumps(record, indent=2, default=str))


class StepCache:
    """Finished steps shared between runs (a sweep's variants), keyed like --resume: input bytes + config + data.

    cache/<name>-<key>/ holds a copy of the step folder. A run claims a key before computing the step (an flock,
    so parallel variants wait for the one computing it instead of computing it again) and stores it after.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.held: dict[str, int] = {}

    def _entry(self, name: str, key: str) -> Path:
        return self.root / f"{name}-{key[:32]}"

    def claim(self, name: str, key: str, dest: Path) -> dict | None:
        """Wait while another run computes this step; return its record (copied to dest) if finished, else hold
        the claim until store() or release()."""
        import fcntl

        with writing(self.root):
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._entry(name, key).with_suffix(".lock"), os.O_CREAT | os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self.held[key] = fd
        entry = self._entry(name, key)
        record = finished_step(entry / "step.json", key)
        if record is None:
            return None
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        with writing(dest):
            shutil.copytree(entry, tmp, copy_function=_link_or_copy)
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)
        self.release(key)
        return record

    def store(self, name: str, key: str, step_dir: Path) -> None:
        entry = self._entry(name, key)
        tmp = entry.with_name(f".{entry.name}.tmp-{os.getpid()}")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            with writing(entry):
                shutil.copytree(step_dir, tmp, copy_function=_link_or_copy)
                shutil.rmtree(entry, ignore_errors=True)
                os.replace(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            self.release(key)

    def release(self, key: str | None = None) -> None:
        for k in [key] if key is not None else list(self.held):
            fd = self.held.pop(k, None)
            if fd is not None:
                os.close(fd)  # closing the descriptor drops the flock


def _link_or_copy(src: str, dst: str) -> None:
    # Hard links: a shared export costs its bytes once however many variants hold it; steps never edit files in place.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
