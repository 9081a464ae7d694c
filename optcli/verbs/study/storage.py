"""Where a study lives, and how a worker that died mid-trial is found out.

--storage takes a journal file (the default: OUT/study.journal; any path, or journal:PATH), a SQLAlchemy URL
(sqlite:///study.db, postgresql://user@host/db, mysql+pymysql://...). Every worker opens the same storage; Optuna
hands each trial to one worker only (a journal's RUNNING transition, a database row update).

A killed worker (SIGKILL, a lost machine) cannot mark its own trial. Databases use Optuna's heartbeat: the worker
records one every `interval` seconds, and any worker fails trials silent for `grace` seconds
(optuna.storages.fail_stale_trials) and re-queues them (RetryHeartbeatStaleTrialCallback). A journal file has no
heartbeat in Optuna, so optcli writes the same beat as a trial system attribute and fails stale trials the same
way. On the worker's own host a trial whose process is gone is failed at once, without waiting for the grace.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import warnings
from datetime import datetime
from pathlib import Path

from optcli.errors import BadInput

JOURNAL = "study.journal"
BEAT = "optcli:heartbeat"
MAX_RETRY = 2  # a trial that kills its worker twice more is left failed, not retried forever


def quiet_optuna() -> None:
    """Optuna logs each trial and warns that heartbeats are experimental: optcli prints its own progress."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=".*GridSampler.*re-evaluating.*")


def is_url(storage: str) -> bool:
    return "://" in storage and not storage.startswith("journal:")


def journal_path(storage: str | None, out: Path) -> Path | None:
    """The journal file a --storage value names (relative paths under OUT), or None for a database URL."""
    if storage is None:
        return Path(out) / JOURNAL
    if is_url(storage):
        return None
    path = Path(storage.removeprefix("journal:"))
    return path if path.is_absolute() else Path(out) / path


def shown_url(storage: str) -> str:
    """The URL without its password, for study.json, messages and reports."""
    if not is_url(storage):
        return storage
    try:
        from sqlalchemy.engine import make_url

        return make_url(storage).render_as_string(hide_password=True)
    except Exception:
        return storage.split("://", 1)[0] + "://…"


def open_storage(storage: str | None, out: Path, interval: int, grace: int):
    """The Optuna storage object; a database or driver that cannot be reached is bad input, said in one line."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

    quiet_optuna()
    path = journal_path(storage, out)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The open(O_EXCL) lock holds on NFSv3+ too, where flock may not: workers on several machines share OUT.
        return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    assert storage is not None, "journal_path names a file when no --storage is given"
    storage = _driver(storage)
    try:
        return RDBStorage(
            storage,
            heartbeat_interval=interval,
            grace_period=grace,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
            engine_kwargs={"pool_pre_ping": True},
        )
    except ModuleNotFoundError as e:
        raise BadInput(
            f"--storage {shown_url(storage)}: its database driver is not installed ({e.name}); "
            "pip install 'optcli[sweep]' (psycopg for PostgreSQL)"
        ) from None
    except (optuna.exceptions.StorageInternalError, Exception) as e:  # sqlalchemy's OperationalError and kin
        first = str(getattr(e, "orig", None) or e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(f"--storage {shown_url(storage)}: cannot open it ({first})") from None


def _driver(url: str) -> str:
    """postgresql:// means psycopg2 to SQLAlchemy; with only psycopg (3) installed, use that one."""
    import importlib.util

    find = importlib.util.find_spec
    if url.startswith("postgresql://") and find("psycopg2") is None and find("psycopg") is not None:
        return "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


def uses_optuna_heartbeat(storage) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(storage)


class Heartbeat:
    """Beats for one running trial from a thread, until stopped (a `with` block around the trial)."""

    def __init__(self, study, trial_id: int, interval: int):
        self.study, self.trial_id, self.interval = study, trial_id, interval
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="optcli-heartbeat")

    def beat(self) -> None:
        storage = self.study._storage
        if uses_optuna_heartbeat(storage):
            storage.record_heartbeat(self.trial_id)
        else:
            storage.set_trial_system_attr(self.trial_id, BEAT, time.time())

    def _run(self) -> None:
        while not self.stop_event.wait(self.interval):
            try:
                self.beat()
            except Exception:  # the trial finished meanwhile, or the storage blinked: the next beat tries again
                pass

    def __enter__(self):
        self.beat()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        self.thread.join()


def owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _process_gone(attrs: dict) -> bool:
    if attrs.get("host") != socket.gethostname() or not isinstance(attrs.get("pid"), int):
        return False
    try:
        os.kill(attrs["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _silent_for(trial, now: float) -> float:
    beat = trial.system_attrs.get(BEAT)
    if not isinstance(beat, (int, float)):
        start = trial.datetime_start or datetime.now()
        beat = start.timestamp()
    return now - beat


def fail_stale_trials(study, grace: int) -> list[int]:
    """Fail the running trials whose worker is gone, re-queue each once more (up to MAX_RETRY); return their
    numbers. Two workers doing this at once fail a trial once: the second one's update is refused."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
    from optuna.trial import TrialState

    storage = study._storage
    heartbeat = uses_optuna_heartbeat(storage)
    if heartbeat:
        fail_stale_trials(study)  # the database's own stale check (server time), its callback re-queues
    now = time.time()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        gone = _process_gone(t.user_attrs)
        if not gone and (heartbeat or _silent_for(t, now) < grace):
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, "error", "its worker stopped (killed or lost) mid-trial")
            if not storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker failed it first, or it finished after all
        failed.append(t.number)
        RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, storage.get_trial(t._trial_id))
    return failed
