"""`optcli sweep` as an Optuna study on the digits CNN: workers (processes here, machines elsewhere) sharing one
study in a journal file or PostgreSQL find the front one worker finds; a killed or interrupted worker's trial is
failed and retried, never its half-written folder taken as finished; resuming is the same command again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import EXPORT, digits_recipe, write_recipe

from optcli.verbs.study import StudyOptions, run_study

FAST = {"latency": {"batch_sizes": [1], "warmup": 0, "runs": 3, "threads": 1}}
PASSES = [EXPORT, {"type": "quantize", "mode": "dynamic"}]
# Four grid points; metric and size only: both are deterministic, so every run of the study finds the same front
GRID_SPACE = {"passes.1.per_channel": [True, False], "passes.1.reduce_range": [False, True]}


# --------------------------------------------------------------------------- studies on the digits CNN


@pytest.fixture
def study_recipe(digits, tmp_path):
    return write_recipe(tmp_path, digits_recipe(digits, PASSES, report=FAST, gates={"max_accuracy_drop": 0.05}))


def grid_file(tmp_path: Path) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(json.dumps(GRID_SPACE))  # JSON is YAML
    return path


def fronts(out: Path) -> tuple[set, dict]:
    """The front as the set of trial values, and every finished trial's (metric, size) by its values."""
    sweep = json.loads((out / "sweep.json").read_text())
    key = lambda r: json.dumps(r["values"], sort_keys=True)  # noqa: E731
    done = {key(r): (r["metric"], r["size_bytes"]) for r in sweep["variants"] if r["state"] == "complete"}
    return {key(r) for r in sweep["variants"] if r["pareto"]}, done


@pytest.fixture(scope="module")
def one_worker_front(digits, tmp_path_factory):
    """The reference: the grid study run by one worker in this process (once for the module)."""
    folder = tmp_path_factory.mktemp("one-worker")
    recipe = write_recipe(folder, digits_recipe(digits, PASSES, report=FAST, gates={"max_accuracy_drop": 0.05}))
    out = folder / "one"
    sweep = run_study(recipe, StudyOptions(out=out, space=grid_file(folder), objectives=["metric", "size"]))
    assert sweep["study"]["counts"]["complete"] == 4 and sweep["study"]["sampler"] == "grid"
    return fronts(out)


def check_study_folder(out: Path, trials: int) -> dict:
    """Every trial once, each a complete run in its own folder, the export computed once for all."""
    sweep = json.loads((out / "sweep.json").read_text())
    rows = sweep["variants"]
    assert [r["state"] for r in rows] == ["complete"] * trials, rows
    assert len({json.dumps(r["values"], sort_keys=True) for r in rows}) == trials  # no grid point run twice
    for r in rows:
        report = json.loads((out / r["folder"] / "report.json").read_text())
        assert report["steps"][-1]["size_bytes"] == r["size_bytes"] == (out / r["folder"] / "model.onnx").stat().st_size
        quant = report["recipe"]["passes"][1]
        assert quant["per_channel"] == r["values"]["passes.1.per_channel"]
    assert sum("1-export" in r["ran_steps"] for r in rows) == 1, rows  # the step cache shared it between workers
    assert len(list((out / "cache").glob("1-export-*/model.onnx"))) == 1
    if sweep["best"]:
        assert (out / "best").resolve() == (out / sweep["best"]).resolve()
    return sweep


# Four workers on the 2-core CI machine take minutes: in the slow tier (pytest -m slow)
@pytest.mark.parametrize("workers", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_workers_sharing_a_journal_file_find_the_same_front_as_one_worker(
    study_recipe, tmp_path, workers, one_worker_front
):
    out = tmp_path / f"jobs{workers}"
    run_study(
        study_recipe,
        StudyOptions(out=out, space=grid_file(tmp_path), objectives=["metric", "size"], jobs=workers),
    )
    check_study_folder(out, 4)
    assert fronts(out) == one_worker_front
    ops = [json.loads(line) for line in (out / "study.journal").read_text().splitlines()]
    assert len({op["worker_id"] for op in ops}) >= workers  # Optuna's journal: one JSON operation per line, per worker
    for row in json.loads((out / "sweep.json").read_text())["variants"]:  # the cores shared, not oversubscribed
        env = json.loads((out / row["folder"] / "report.json").read_text())["environment"]
        assert env["torch_threads"] == max(1, (os.cpu_count() or 1) // workers)


def sweep_args(recipe: Path, out: Path, space: Path, *extra: str) -> list[str]:
    return [
        "sweep",
        str(recipe),
        "-o",
        str(out),
        "--space",
        str(space),
        "--objective",
        "metric",
        "--objective",
        "size",
        *extra,
    ]


def start_worker(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "optcli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def wait_for_trial(proc: subprocess.Popen, out: Path) -> Path:
    """Read the worker's progress until it starts a trial; return that trial's folder once its run holds it."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if " trial " in f" {line}" and ": t0" in line:
            folder = out / line.split(": ", 1)[1].split()[0].strip()
            deadline = time.time() + 120
            while not (folder / ".optcli.lock").exists() and time.time() < deadline:
                time.sleep(0.05)
            return folder
    pytest.fail("the worker started no trial:\n" + "".join(seen))


@pytest.mark.system
def test_a_worker_killed_mid_trial_has_its_trial_retried_and_its_folder_never_taken_as_finished(study_recipe, tmp_path):
    from conftest import run_cli

    out, space = tmp_path / "study", grid_file(tmp_path)
    proc = start_worker(*sweep_args(study_recipe, out, space, "--worker"))
    try:
        killed = wait_for_trial(proc, out)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (killed / "report.json").exists()  # killed mid-trial: its folder is half-written
    status = run_cli("sweep", "--status", out, "--json")
    assert status.exit_code == 0, status.stderr
    assert json.loads(status.stdout)["study"]["counts"]["running"] == 1  # nobody told the study yet

    # Another worker (same host: the dead pid is seen at once) fails the trial, runs it again, then the rest
    again = run_cli(*sweep_args(study_recipe, out, space, "--worker"))
    assert again.exit_code == 0, again.stderr
    sweep = json.loads((out / "sweep.json").read_text())
    rows = {r["trial"]: r for r in sweep["variants"]}
    dead = next(r for r in rows.values() if r["folder"] == killed.name)
    assert dead["state"] == "failed" and dead["retried_as"] is not None and not dead["pareto"] and not dead["best"]
    retry = rows[dead["retried_as"]]
    assert retry["state"] == "complete" and retry["values"] == dead["values"] and retry["folder"] != killed.name
    assert (out / retry["folder"] / "report.json").is_file() and not (killed / "report.json").exists()
    complete = [r for r in rows.values() if r["state"] == "complete"]
    assert len(complete) == 4 and len({json.dumps(r["values"], sort_keys=True) for r in complete}) == 4
    assert sweep["errors"] == [] and sweep["study"]["counts"]["retried"] == 1
    assert "killed" in dead["error"] or "stopped" in dead["error"]


@pytest.mark.system
def test_ctrl_c_on_one_worker_leaves_the_other_running_and_its_trial_done_by_the_other(study_recipe, tmp_path):
    out, space = tmp_path / "study", grid_file(tmp_path)
    first = start_worker(*sweep_args(study_recipe, out, space, "--worker"))
    try:
        wait_for_trial(first, out)
        second = start_worker(*sweep_args(study_recipe, out, space, "--worker"))
        try:
            first.send_signal(signal.SIGINT)
            assert first.wait(timeout=120) == 130
            rest = second.communicate(timeout=600)[1]
            assert second.returncode == 0, rest
        finally:
            if second.poll() is None:
                second.kill()
    finally:
        if first.poll() is None:
            first.kill()
    sweep = json.loads((out / "sweep.json").read_text())
    interrupted = [r for r in sweep["variants"] if r.get("error") == "interrupted"]
    assert len(interrupted) == 1 and interrupted[0]["retried_as"] is not None
    complete = [r for r in sweep["variants"] if r["state"] == "complete"]
    assert len(complete) == 4 and len({json.dumps(r["values"], sort_keys=True) for r in complete}) == 4
    assert not any(r["state"] == "running" for r in sweep["variants"])


def test_a_study_resumes_by_running_the_same_command_and_refuses_another_space(study_recipe, tmp_path):
    from conftest import run_cli

    out, space = tmp_path / "study", grid_file(tmp_path)
    first = run_cli(*sweep_args(study_recipe, out, space, "--trials", "2"))
    assert first.exit_code == 0, first.stderr
    assert json.loads((out / "sweep.json").read_text())["study"]["counts"]["complete"] == 2
    again = run_cli(*sweep_args(study_recipe, out, space, "--trials", "3"))
    assert again.exit_code == 0, again.stderr
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["study"]["counts"]["complete"] == 3 and [r["trial"] for r in sweep["variants"]] == [0, 1, 2]
    other = tmp_path / "other.yaml"
    other.write_text("passes.1.per_channel: [true]\n")
    refused = run_cli(*sweep_args(study_recipe, out, other))
    assert refused.exit_code == 2 and "another" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    html = (out / "sweep.html").read_text()
    for chart in ("pareto", "history"):
        assert f'data-chart="{chart}"' in html
    assert "<script" not in html and "http" not in html  # renders offline
    assert "The chosen variant, and why" in html


def test_bad_space_is_refused_before_any_work(study_recipe, tmp_path):
    from conftest import run_cli

    out = tmp_path / "study"
    bad = tmp_path / "bad.yaml"
    bad.write_text("passes.1.mode: [dynamic, sideways]\n")
    result = run_cli("sweep", study_recipe, "-o", out, "--space", bad)
    assert result.exit_code == 2 and "passes.1.mode=sideways" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()
    result = run_cli("sweep", study_recipe, "-o", out, "--space", bad, "--sampler", "annealing")
    assert result.exit_code == 2 and not out.exists()


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """A PostgreSQL server of its own on a free localhost port, stopped after the module; skips where it cannot."""
    import glob
    import shutil
    import socket
    import tempfile

    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed (pip install 'optcli[postgres]')")
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    initdb = shutil.which("initdb") or (bins[-1] if bins else None)
    if initdb is None:
        pytest.skip("no PostgreSQL server here (apt-get install postgresql)")
    pg_ctl = str(Path(initdb).with_name("pg_ctl"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as Debian's postgres user
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL")
        as_user = ["runuser", "-u", "postgres", "--"]
    folder = Path(tempfile.mkdtemp(prefix="optcli-pg-"))
    if as_user:
        shutil.chown(folder, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = folder / "data"
    run = lambda *a: subprocess.run([*as_user, *map(str, a)], capture_output=True, text=True, timeout=120)  # noqa: E731
    made = run(initdb, "-D", data, "-A", "trust", "-U", "optcli", "--no-sync")
    if made.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"initdb failed: {made.stderr.strip().splitlines()[-1:]}")
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    started = run(pg_ctl, "-D", data, "-o", options, "-l", folder / "log", "-w", "start")
    if started.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"PostgreSQL did not start: {started.stderr.strip() or started.stdout.strip()}")
    try:
        yield f"postgresql://optcli@127.0.0.1:{port}/postgres"
    finally:
        run(pg_ctl, "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.system
@pytest.mark.parametrize("workers", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_workers_sharing_a_postgresql_study_find_the_same_front_as_one_worker(
    postgres, study_recipe, tmp_path, workers, one_worker_front
):
    from conftest import run_cli

    out = tmp_path / f"pg{workers}"
    name = f"digits-{workers}"
    result = run_cli(
        *sweep_args(
            study_recipe, out, grid_file(tmp_path), "--storage", postgres, "--study", name, "--jobs", str(workers)
        )
    )
    assert result.exit_code == 0, result.stderr
    check_study_folder(out, 4)
    assert fronts(out) == one_worker_front
    assert not (out / "study.journal").exists()
    status = run_cli("sweep", "--status", out, "--json")  # study.json names the database: --status finds it
    assert status.exit_code == 0, status.stderr
    assert json.loads(status.stdout)["study"]["counts"]["complete"] == 4
