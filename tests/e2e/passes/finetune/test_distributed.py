"""Retraining on several workers through torch's elastic launcher, on CPU with gloo and 2 workers.

Every launch costs seconds of process start-up, so four runs carry the whole story: 2 workers match
1 worker, a killed worker fails the run (exit 3, its rank named), a restart resumes from the epoch
checkpoint, Ctrl-C leaves no process behind. The rest checks the selection logic without launching.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from conftest import REPO, TESTS, CliResult, run_cli, write_recipe

TRAIN_SAMPLES, GLOBAL_BATCH = 512, 32  # 16 global steps per epoch; 512 % 32 == 0, so no rank gets padded samples
STEPS_PER_EPOCH = TRAIN_SAMPLES // GLOBAL_BATCH


@pytest.fixture()
def mlp_recipe(tmp_path, digits) -> dict:
    """A BatchNorm-free MLP on digits (see tests/distributed_models.py for why no BatchNorm)."""
    from distributed_models import build_mlp

    torch.manual_seed(0)
    torch.save(build_mlp().state_dict(), tmp_path / "mlp.pt")
    with np.load(digits / "digits_train.npz") as z:
        np.savez(tmp_path / "train.npz", x=z["x"][:TRAIN_SAMPLES], y=z["y"][:TRAIN_SAMPLES])
    return {
        "model": {
            "path": str(tmp_path / "mlp.pt"),
            "factory": "distributed_models:build_mlp",
            "factory_kwargs": {},
            "inputs": [{"name": "x", "shape": [1, 1, 8, 8], "dtype": "float32"}],
        },
        "data": {
            "train": {"path": str(tmp_path / "train.npz"), "batch_size": GLOBAL_BATCH},
            "eval": {"path": str(digits / "digits_test.npz"), "labels": "y"},
        },
        "passes": [{"type": "finetune", "epochs": 3, "lr": 3e-3}],
        "report": {"latency": {"batch_sizes": [1], "warmup": 1, "runs": 3, "threads": 1}},
    }


def run_tagged(*args, timeout: int = 240) -> CliResult:
    """`python -m optcli ...` in a child process whose environment carries a tag its workers inherit;
    afterwards no process with that tag may be alive (psutil), whatever happened to the run."""
    tag = uuid.uuid4().hex
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "OPTCLI_TEST_TAG": tag,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "optcli", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert_no_survivors(tag)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def tagged(tag: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("OPTCLI_TEST_TAG") == tag and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:  # other users' processes, or one that just ended
            continue
    return found


def assert_no_survivors(tag: str, grace_s: float = 10.0) -> None:
    deadline = time.monotonic() + grace_s
    while (alive := tagged(tag)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive, f"processes of the run still alive: {[(p.pid, ' '.join(p.cmdline())[:120]) for p in alive]}"


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.export.load(str(path)).module().state_dict()


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def one_worker_run(tmp_path: Path, recipe: dict, name: str) -> tuple[Path, dict]:
    """The reference: one process, batch = the global batch of the 2-worker runs."""
    out = tmp_path / name
    r = run_cli("run", write_recipe(tmp_path, recipe, f"{name}.yaml"), "-o", out, "--json", "--quiet")
    assert r.exit_code == 0, r.stderr
    return out, r.json()


def training(report: dict) -> dict:
    return report["steps"][-1]["details"]["training"]


# --------------------------------------------------------------------------- launches (4 in the default run)


def test_two_workers_reach_the_weights_and_metric_of_one_worker_with_the_same_global_batch(tmp_path, mlp_recipe):
    out1, rep1 = one_worker_run(tmp_path, mlp_recipe, "one")
    two = write_recipe(
        tmp_path, {**mlp_recipe, "passes": [{**mlp_recipe["passes"][0], "batch_size": GLOBAL_BATCH // 2}]}, "two.yaml"
    )
    r = run_tagged("run", two, "-o", tmp_path / "two", "--json", "--quiet", "--nproc-per-node", "2")
    assert r.exit_code == 0, r.stderr
    rep2, out2 = r.json(), tmp_path / "two"

    w1, w2 = weights(out1 / "model.pt2"), weights(out2 / "model.pt2")
    assert max_abs_diff(w1, torch.load(mlp_recipe["model"]["path"], weights_only=True)) > 1e-3  # it trained
    assert max_abs_diff(w1, w2) <= 1e-5
    # The metric the runner measures on the written artifacts, and the loop's all-reduced eval metric per epoch.
    assert rep2["steps"][-1]["accuracy"]["value"] == pytest.approx(rep1["steps"][-1]["accuracy"]["value"], abs=1e-9)
    assert [e["metric"] for e in training(rep2)["epochs"]] == pytest.approx(
        [e["metric"] for e in training(rep1)["epochs"]], abs=1e-6
    )
    assert [e["loss"] for e in training(rep2)["epochs"]] == pytest.approx(
        [e["loss"] for e in training(rep1)["epochs"]], abs=1e-5
    )

    t1, t2 = training(rep1), training(rep2)
    assert (t1["world_size"], t1["batch_per_worker"], t1["global_batch"]) == (1, GLOBAL_BATCH, GLOBAL_BATCH)
    assert (t2["world_size"], t2["backend"], t2["batch_per_worker"], t2["global_batch"]) == (
        2,
        "gloo",
        GLOBAL_BATCH // 2,
        GLOBAL_BATCH,
    )
    assert len(t2["devices"]) == 2 and all(d.startswith("cpu") for d in t2["devices"])
    assert t2["samples_per_s_per_worker"] == pytest.approx(t2["samples_per_s"] / 2, rel=0.01)
    assert "2 workers (gloo) on cpu" in (out2 / "report.md").read_text()
    assert f"batch {GLOBAL_BATCH // 2} per worker, global batch {GLOBAL_BATCH}" in (out2 / "report.md").read_text()
    # Only rank 0 writes: the 2-worker output folder holds exactly what a 1-process run writes.
    assert files_under(out2) == files_under(out1)


@pytest.mark.system
def test_a_killed_worker_ends_the_run_with_exit_3_naming_its_rank(tmp_path, mlp_recipe):
    mlp_recipe["model"]["factory_kwargs"] = {"kill_rank": 1, "kill_step": STEPS_PER_EPOCH + 3}  # mid epoch 2
    mlp_recipe["passes"][0]["batch_size"] = GLOBAL_BATCH // 2
    r = run_tagged(
        "run", write_recipe(tmp_path, mlp_recipe), "-o", tmp_path / "out", "--quiet", "--nproc-per-node", "2"
    )
    assert r.exit_code == 3, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "1-finetune" in lines[0] and "worker rank 1" in lines[0] and "SIGKILL" in lines[0]
    assert not (tmp_path / "out" / "model.pt2").exists()


@pytest.mark.system
def test_max_restarts_resumes_from_the_epoch_checkpoint_and_finishes(tmp_path, mlp_recipe):
    plain = {**mlp_recipe, "passes": [dict(mlp_recipe["passes"][0])]}
    mlp_recipe["model"]["factory_kwargs"] = {"kill_rank": 1, "kill_step": STEPS_PER_EPOCH + 3}
    mlp_recipe["passes"][0].update(batch_size=GLOBAL_BATCH // 2, distributed={"max_restarts": 1})
    r = run_tagged(
        "run", write_recipe(tmp_path, mlp_recipe), "-o", tmp_path / "out", "--json", "--quiet", "--nproc-per-node", "2"
    )
    assert r.exit_code == 0, r.stderr
    assert training(r.json())["resumed_from_epoch"] == 1
    # Resuming lost nothing: the same weights as an uninterrupted run (one process, same global batch).
    out1, _ = one_worker_run(tmp_path, plain, "one")
    assert max_abs_diff(weights(out1 / "model.pt2"), weights(tmp_path / "out" / "model.pt2")) <= 1e-5


@pytest.mark.system
def test_ctrl_c_stops_every_worker_and_exits_130(tmp_path, mlp_recipe):
    mlp_recipe["passes"][0].update(epochs=2000, batch_size=GLOBAL_BATCH // 2)
    tag = uuid.uuid4().hex
    env = {**os.environ, "PYTHONPATH": str(TESTS), "OPTCLI_TEST_TAG": tag}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "optcli",
            "run",
            str(write_recipe(tmp_path, mlp_recipe)),
            "-o",
            str(tmp_path / "out"),
            "--quiet",
            "--nproc-per-node",
            "2",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (tmp_path / "out" / "steps" / "1-finetune.ckpt").exists():
            time.sleep(0.2)  # the first epoch checkpoint: both workers are up and training
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert_no_survivors(tag)
    assert not (tmp_path / "out" / "model.pt2").exists()


@pytest.mark.slow
def test_a_worker_that_raises_ends_the_run_with_its_rank_and_error_in_one_line(tmp_path, mlp_recipe):
    mlp_recipe["model"]["factory_kwargs"] = {"kill_rank": 1, "kill_step": 5, "raise_instead": True}
    mlp_recipe["passes"][0]["batch_size"] = GLOBAL_BATCH // 2
    r = run_tagged(
        "run", write_recipe(tmp_path, mlp_recipe), "-o", tmp_path / "out", "--quiet", "--nproc-per-node", "2"
    )
    assert r.exit_code == 3, r.stderr
    # rank 0 fails too (its peer is gone), but the root cause named is rank 1's, read from its error file
    assert r.stderr.strip().endswith(
        "worker rank 1 (local rank 1, pid "
        + r.stderr.split("pid ")[1].split(")")[0]
        + ") failed: ValueError: worker 1 met a NaN in its batch at step 5"
    ), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


@pytest.mark.slow
def test_two_nodes_resume_from_rank_0s_checkpoint_and_train_like_one_worker(tmp_path, mlp_recipe):
    """Multi-node as users run it: the same command on each node with --nnodes 2 --node-rank i
    --rdzv-endpoint host:port. Both "nodes" are processes on this machine with their own output
    folders, so only rank 0's node holds the epoch checkpoint: after rank 1 is killed, the other node
    resumes from rank 0's broadcast copy, and both nodes end with the weights of one worker."""
    plain = {**mlp_recipe, "passes": [dict(mlp_recipe["passes"][0])]}
    mlp_recipe["model"]["factory_kwargs"] = {"kill_rank": 1, "kill_step": STEPS_PER_EPOCH + 3}
    mlp_recipe["passes"][0].update(batch_size=GLOBAL_BATCH // 2, distributed={"max_restarts": 1})
    path = write_recipe(tmp_path, mlp_recipe)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tag = uuid.uuid4().hex
    env = {**os.environ, "PYTHONPATH": str(TESTS), "OPTCLI_TEST_TAG": tag}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "optcli",
                "run",
                str(path),
                "-o",
                str(tmp_path / f"node{i}"),
                "--json",
                "--quiet",
                "--nnodes",
                "2",
                "--node-rank",
                str(i),
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--nproc-per-node",
                "1",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (0, 1)
    ]
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert_no_survivors(tag)
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    out1, _ = one_worker_run(tmp_path, plain, "one")
    for i, (stdout, _) in enumerate(results):
        block = training(json.loads(stdout))
        assert (block["world_size"], block["nproc_per_node"], block["resumed_from_epoch"]) == (2, 1, 1)
        assert max_abs_diff(weights(out1 / "model.pt2"), weights(tmp_path / f"node{i}" / "model.pt2")) <= 1e-5


@pytest.mark.slow
def test_workers_die_with_a_killed_optcli_process(tmp_path, mlp_recipe):
    """kill -9 of optcli runs no handler; the workers still end (PR_SET_PDEATHSIG, see distributed._die_with_parent)."""
    mlp_recipe["passes"][0].update(epochs=2000, batch_size=GLOBAL_BATCH // 2)
    tag = uuid.uuid4().hex
    env = {**os.environ, "PYTHONPATH": str(TESTS), "OPTCLI_TEST_TAG": tag}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "optcli",
            "run",
            str(write_recipe(tmp_path, mlp_recipe)),
            "-o",
            str(tmp_path / "out"),
            "--quiet",
            "--nproc-per-node",
            "2",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (tmp_path / "out" / "steps" / "1-finetune.ckpt").exists():
            time.sleep(0.2)
        assert len(tagged(tag)) >= 3  # optcli + 2 workers
        proc.kill()  # SIGKILL: no handler runs in optcli; the workers must still go
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert_no_survivors(tag)


@pytest.mark.slow
def test_a_node_left_alone_at_the_rendezvous_fails_with_exit_3_after_rdzv_timeout(tmp_path, mlp_recipe):
    mlp_recipe["passes"][0]["distributed"] = {"rdzv_timeout": 5}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    r = run_tagged(
        "run",
        write_recipe(tmp_path, mlp_recipe),
        "-o",
        tmp_path / "out",
        "--quiet",
        "--nnodes",
        "2",
        "--node-rank",
        "0",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
    )
    assert r.exit_code == 3 and "rendezvous at 127.0.0.1" in r.stderr and len(r.stderr.strip().splitlines()) == 1, (
        r.stderr
    )
    assert time.monotonic() - started < 120


# --------------------------------------------------------------------------- bad options: exit 2 before any work


def test_bad_distributed_flags_are_refused_in_one_line(tmp_path, mlp_recipe):
    path = write_recipe(tmp_path, mlp_recipe)
    for flags, expect in (
        (["--nproc-per-node", "two"], "--nproc-per-node 'two'"),
        (["--nnodes", "2"], "rdzv_endpoint"),
        (["--nnodes", "2", "--rdzv-endpoint", "node0"], "host:port"),
        (["--node-rank", "3", "--nnodes", "2", "--rdzv-endpoint", "node0:29400"], "node_rank 3"),
    ):
        r = run_cli("run", path, "-o", tmp_path / "out", *flags)
        assert r.exit_code == 2, (flags, r.stderr)
        assert expect in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()


def test_distributed_flags_without_a_finetune_pass_are_refused(tmp_path, mlp_recipe):
    mlp_recipe["passes"] = [{"type": "export"}]
    r = run_cli("run", write_recipe(tmp_path, mlp_recipe), "-o", tmp_path / "out", "--nproc-per-node", "2")
    assert r.exit_code == 2 and "no finetune pass" in r.stderr


@pytest.mark.parametrize(
    "finetune, expect",
    [
        ({"device": "cuda:0", "distributed": {"nproc_per_node": 2}}, "names one GPU"),
        ({"device": "cpu", "distributed": {"backend": "nccl"}}, "nccl needs device cuda"),
        ({"device": "cpu", "amp": "bf16"}, "amp bf16 is for CUDA"),
        ({"distributed": {"nproc_per_node": 0}}, "nproc_per_node"),
        ({"distributed": {"nnodes": 2}}, "needs rdzv_endpoint"),
    ],
)
def test_impossible_device_and_launch_settings_fail_validation_with_their_line(tmp_path, mlp_recipe, finetune, expect):
    mlp_recipe["passes"][0].update(finetune)
    r = run_cli("validate", write_recipe(tmp_path, mlp_recipe))
    assert r.exit_code == 2 and expect in r.stderr and "recipe.yaml:" in r.stderr, r.stderr
