"""One atomic write for every file optcli hands to people: all of a set lands, or none of it changes.

Standard library only, and no import of the rest of optcli, so any module can use it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path


def atomic_write_texts(folder: Path, texts: Mapping[str, str]) -> list[Path]:
    """Write {name: text} into folder so that no final file is ever half-written; return the paths.

    Every text goes to a fresh temp file in folder first, fsynced; only when all are on disk is
    each os.replace()d onto its name. On any error the temp files are removed and the error
    propagates, so a write that fails (a full disk) leaves the previous files as they were.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    temps: dict[str, Path] = {}
    try:
        for name, text in texts.items():
            with _signals_held():
                temps[name] = _write_temp(folder, name, text)
        for name in texts:
            os.replace(temps[name], folder / name)
            del temps[name]
    finally:
        for tmp in temps.values():
            _unlink(tmp)
    _fsync_dir(folder)
    return [folder / name for name in texts]


def atomic_write_text(path: Path, text: str) -> Path:
    """Write text to path atomically (see atomic_write_texts); the folder is created if missing."""
    path = Path(path)
    return atomic_write_texts(path.parent, {path.name: text})[0]


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temp path beside path for a library to write to (torch.save, shutil.copyfile); on success it is
    fsynced and replaces path, on any error it is removed and path is left as it was.

        with atomic_path(out / "model.pt") as tmp:
            torch.save(state, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp: Path | None = None
    try:
        with _signals_held():
            fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            tmp = Path(name)
        yield tmp
        _fsync_file(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if tmp is not None:
            _unlink(tmp)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C (SIGINT) and SIGTERM wait while a temp file is made and recorded for cleanup: Python raises
    KeyboardInterrupt between any two bytecodes, and one landing after the file exists but before its name is kept
    left the temp behind (a sweep worker stopped as its run wrote .optcli-output.json). Held, the signal lands once
    the name is kept, and the caller's cleanup removes the file."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield  # Python runs its signal handlers in the main thread only: nothing to hold elsewhere
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_temp(folder: Path, name: str, text: str) -> Path:
    """Write text to a fresh temp file next to name, fsynced; remove it on failure."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
    except BaseException:
        _unlink(Path(tmp))
        raise
    return Path(tmp)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _fsync_dir(path: Path) -> None:
    # The renames themselves are durable only once the folder's entry table is on disk.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
