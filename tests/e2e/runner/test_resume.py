"""`optcli run --resume` and the output folder: finished steps reused only when nothing they depend on changed,
the same bytes as a fresh run, and one run per folder at a time."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import EXPORT, digits_recipe, run_cli, write_recipe

# These tests check resuming, not speed: dynamic int8 on the digits CNN runs ConvInteger, slower than fp32, and the
# default speed gate would rightly fail it.
PASSES = [EXPORT, {"type": "quantize", "mode": "dynamic", "allow_slower": True}]
FAST = {"latency": {"batch_sizes": [1], "warmup": 0, "runs": 3, "threads": 1}}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def reused(result) -> list[str]:
    return re.findall(r"(\d+-\w+): unchanged since the last run", result.stderr)


def ran(result) -> list[str]:
    return re.findall(r"(\d+-\w+): running", result.stderr)


def run(recipe: Path, out: Path, *extra: str):
    result = run_cli("run", recipe, "-o", out, *extra)
    assert result.exit_code == 0, result.stderr
    return result


@pytest.fixture
def first(digits, tmp_path):
    """A finished export + dynamic int8 run: (recipe, output folder)."""
    recipe = write_recipe(tmp_path, digits_recipe(digits, PASSES, report=FAST))
    run(recipe, tmp_path / "out")
    return recipe, tmp_path / "out"


def test_resume_reuses_every_finished_step_and_ends_with_the_same_bytes(first, tmp_path):
    recipe, out = first
    before = {p.name: sha(p) for p in (out / "model.onnx", out / "steps" / "1-export" / "model.onnx")}
    again = run(recipe, out, "--resume")
    assert reused(again) == ["1-export", "2-quantize"] and ran(again) == []
    assert {p.name: sha(p) for p in (out / "model.onnx", out / "steps" / "1-export" / "model.onnx")} == before
    report = json.loads((out / "report.json").read_text())
    assert report["output"]["sha256"] == sha(out / "model.onnx")
    fresh = run(recipe, tmp_path / "fresh")  # export + dynamic int8 are deterministic: a fresh run agrees byte for byte
    assert sha(tmp_path / "fresh" / "model.onnx") == sha(out / "model.onnx")
    assert ran(fresh) == ["1-export", "2-quantize"]


def test_changed_pass_config_reruns_from_that_pass(first, tmp_path):
    recipe, out = first
    changed = run(recipe, out, "--resume", "--set", "passes.1.per_channel=true")
    assert reused(changed) == ["1-export"] and ran(changed) == ["2-quantize"]
    run(recipe, tmp_path / "fresh", "--set", "passes.1.per_channel=true")
    assert sha(out / "model.onnx") == sha(tmp_path / "fresh" / "model.onnx")
    earlier = run(recipe, out, "--resume", "--set", "passes.0.opset=17")
    assert reused(earlier) == [] and ran(earlier) == ["1-export", "2-quantize"]


def test_report_settings_do_not_invalidate_finished_steps(first):
    recipe, out = first
    again = run(recipe, out, "--resume", "--set", "report.latency.runs=4")
    assert reused(again) == ["1-export", "2-quantize"]


@pytest.mark.parametrize("change", ["model", "calibration data", "seed"])
def test_changed_inputs_rerun_every_step(digits, tmp_path, change):
    work = tmp_path / "work"
    work.mkdir()
    for f in ("digits_cnn.pt", "digits_calib.npz", "digits_test.npz"):
        (work / f).write_bytes((digits / f).read_bytes())
    passes = [EXPORT, {"type": "quantize", "mode": "static"}]
    recipe = write_recipe(tmp_path, digits_recipe(work, passes, report=FAST, gates={}))
    out = tmp_path / "out"
    run(recipe, out)
    extra = ()
    if change == "model":
        import torch

        state = torch.load(work / "digits_cnn.pt")
        state["classifier.bias"] += 0.5
        torch.save(state, work / "digits_cnn.pt")
    elif change == "calibration data":
        with np.load(work / "digits_calib.npz") as z:
            arrays = dict(z)
        arrays["x"] = arrays["x"][::-1].copy() * 0.5
        np.savez(work / "digits_calib.npz", **arrays)
    else:
        extra = ("--set", "seed=7")
    again = run(recipe, out, "--resume", *extra)
    assert reused(again) == [] and ran(again) == ["1-export", "2-quantize"]


def test_damaged_step_record_or_artifact_is_run_again_not_trusted(first):
    recipe, out = first
    good = sha(out / "model.onnx")
    step_json = out / "steps" / "2-quantize" / "step.json"
    step_json.write_text(step_json.read_text()[:50])  # half-written
    again = run(recipe, out, "--resume")
    assert reused(again) == ["1-export"] and ran(again) == ["2-quantize"]
    artifact = out / "steps" / "1-export" / "model.onnx"
    artifact.write_bytes(artifact.read_bytes()[:-10] + b"0123456789")  # edited after it was recorded
    again = run(recipe, out, "--resume")
    # The export runs again and writes the same bytes, so the quantize step's input is unchanged: reused.
    assert ran(again) == ["1-export"] and reused(again) == ["2-quantize"]
    assert sha(out / "model.onnx") == good


def test_a_step_whose_input_artifact_changed_runs_again(first):
    recipe, out = first
    # Same configs, but the export's recorded output now differs: the quantize step read other bytes.
    step_json = out / "steps" / "1-export" / "step.json"
    record = json.loads(step_json.read_text())
    artifact = out / "steps" / "1-export" / "model.onnx"
    import onnx

    proto = onnx.load(str(artifact))
    proto.doc_string = "changed"
    onnx.save(proto, str(artifact))
    record["sha256"] = sha(artifact)
    step_json.write_text(json.dumps(record))
    again = run(recipe, out, "--resume")
    assert reused(again) == ["1-export"] and ran(again) == ["2-quantize"]


def test_output_folder_refuses_to_clobber_without_overwrite_or_resume(first):
    recipe, out = first
    result = run_cli("run", recipe, "-o", out, "-q")
    assert result.exit_code == 2 and "--overwrite" in result.stderr and "--resume" in result.stderr
    (out / "model.onnx").write_bytes(b"")  # what --overwrite must replace, not keep
    run(recipe, out, "--overwrite", "-q")
    assert (out / "model.onnx").stat().st_size > 0


def test_second_run_into_the_same_folder_is_refused_while_the_first_runs(digits, tmp_path):
    slow = write_recipe(
        tmp_path,
        digits_recipe(
            digits, PASSES, report={"latency": {"batch_sizes": [1], "warmup": 0, "runs": 100_000, "threads": 1}}
        ),
    )
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "optcli", "run", str(slow), "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stderr:
            if "measuring the original" in line:
                break
        for flags in ((), ("--overwrite",), ("--resume",)):
            second = run_cli("run", slow, "-o", out, "-q", *flags)
            assert second.exit_code == 2, second.stderr
            assert "in use by another optcli run" in second.stderr and f"pid {proc.pid}" in second.stderr
            assert (out / ".optcli.lock").read_text() == str(proc.pid)  # the first run's lock was not taken over
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    assert not (out / ".optcli.lock").exists()
    run(slow, out, "--resume", "--set", "report.latency.runs=3", "-q")  # the folder is usable again


@pytest.mark.system
def test_two_runs_into_different_folders_at_once_do_not_interfere(digits, tmp_path):
    recipe = write_recipe(tmp_path, digits_recipe(digits, PASSES, report=FAST))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "optcli", "run", str(recipe), "-o", str(tmp_path / f"out{i}"), "-q", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    reports = [json.loads(stdout) for stdout, _ in results]
    for i, report in enumerate(reports):
        assert Path(report["output"]["path"]) == tmp_path / f"out{i}" / "model.onnx"
        assert report["output"]["sha256"] == sha(tmp_path / f"out{i}" / "model.onnx")
    assert reports[0]["output"]["sha256"] == reports[1]["output"]["sha256"]


def test_stale_lock_is_named_in_the_refusal(first):
    recipe, out = first
    (out / ".optcli.lock").write_text("999999")
    result = run_cli("run", recipe, "-o", out, "--resume", "-q")
    assert result.exit_code == 2
    assert (
        str(out / ".optcli.lock") in result.stderr
        and "pid 999999" in result.stderr
        and len(result.stderr.strip().splitlines()) == 1
    )
    assert (out / ".optcli.lock").read_text() == "999999"  # a refused run does not remove someone else's lock
