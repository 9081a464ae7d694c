"""Inputs of every rank and role, as speech, OCR and speaker models have them: a scalar sample rate fed with every
batch, a recurrent state whose batch is its second axis, token ids inside the table they index, a TorchScript
forward taking a Python int. Each model goes init -> validate -> run -> inspect through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import allow_slower, run_cli
from input_models import embedding_ids, recurrent_state, save, scalar_rate, scripted_rate

FAST = {"warmup": 1, "runs": 3, "threads": 1}


def _ort(path: Path, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def _init(model: Path, *extra: str) -> dict:
    result = run_cli("init", model, *extra)
    assert result.exit_code == 0, result.stderr
    return yaml.safe_load(result.stdout)


def _write(folder: Path, recipe: dict) -> Path:
    recipe["report"]["latency"].update(FAST)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _validate_run_inspect(recipe: Path, out: Path) -> dict:
    validated = run_cli("validate", recipe)
    assert validated.exit_code == 0, validated.stderr
    ran = run_cli("run", recipe, "-o", out, "-q")
    assert ran.exit_code in (0, 1), ran.stderr  # 1: a default size gate on a model this small
    report = json.loads((out / "report.json").read_text())
    inspected = run_cli("inspect", report["output"]["path"], "--json")
    assert inspected.exit_code == 0, inspected.stderr
    return report


def _inputs(recipe: dict) -> dict:
    return {i["name"]: i for i in recipe["model"]["inputs"]}


def test_scalar_sample_rate_from_the_data_file_is_fed_with_every_batch(tmp_path):
    model = Path(save(scalar_rate(), tmp_path / "vad.onnx"))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 16)).astype(np.float32)
    sr = np.array(8000, dtype=np.int64)  # a 0-d array: one value for every sample
    expected = _ort(model, {"x": x, "sr": sr})[0]  # the model run by hand with that rate
    np.savez(tmp_path / "audio.npz", x=x, sr=sr, y=expected)
    recipe = _init(model)
    assert _inputs(recipe)["sr"]["shape"] == [] and "value" in _inputs(recipe)["sr"]
    recipe["data"] = {
        "calibration": {"path": str(tmp_path / "audio.npz")},
        "eval": {"path": str(tmp_path / "audio.npz"), "labels": "y", "metric": "mse", "batch_size": 4},
    }
    report = _validate_run_inspect(_write(tmp_path, recipe), tmp_path / "out")
    original = report["steps"][0]
    # mse against the hand-run outputs: 0 only if every batch (4 + 4 + 2 samples) got sr = 8000
    assert original["accuracy"]["value"] == pytest.approx(0, abs=1e-10)
    assert set(original["latency"]) == {"batch_1", "batch_32"}
    final = _ort(report["output"]["path"], {"x": x, "sr": sr})[0]
    assert np.abs(final - expected).max() < 0.05 * np.abs(expected).max()


def test_scalar_value_given_in_the_recipe_is_what_the_model_gets(tmp_path):
    model = Path(save(scalar_rate(), tmp_path / "vad.onnx"))
    x = np.random.default_rng(1).standard_normal((6, 16)).astype(np.float32)
    expected = _ort(model, {"x": x, "sr": np.array(24000, dtype=np.int64)})[0]
    np.savez(tmp_path / "audio.npz", x=x, y=expected)  # no sr in the data: the recipe gives it
    recipe = _init(model)
    _inputs(recipe)["sr"]["value"] = 24000
    recipe["data"] = {"eval": {"path": str(tmp_path / "audio.npz"), "labels": "y", "metric": "mse"}}
    report = _validate_run_inspect(_write(tmp_path, recipe), tmp_path / "out")
    assert report["steps"][0]["accuracy"]["value"] == pytest.approx(0, abs=1e-10)


def test_scalar_stored_per_sample_is_refused_by_validate_in_one_sentence(tmp_path):
    model = Path(save(scalar_rate(), tmp_path / "vad.onnx"))
    np.savez(tmp_path / "audio.npz", x=np.zeros((4, 16), np.float32), sr=np.full(4, 16000))
    recipe = _init(model)
    recipe["data"] = {"eval": {"path": str(tmp_path / "audio.npz")}}
    result = run_cli("validate", _write(tmp_path, recipe))
    assert result.exit_code == 2
    assert "takes a scalar" in result.stderr and "0-d array" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_recurrent_state_model_gets_latency_at_the_batch_it_takes(tmp_path):
    model = Path(save(recurrent_state(), tmp_path / "speaker.onnx"))  # x[batch, 16], h[2, 1, 32]
    recipe = _init(model)
    assert recipe["report"]["latency"]["batch_sizes"] == [1]  # not b32, which the state cannot take
    assert _inputs(recipe)["h"]["batch_axis"] == 1
    rng = np.random.default_rng(4)
    x, h = rng.standard_normal((6, 16)).astype(np.float32), np.zeros((2, 1, 32), np.float32)
    np.savez(tmp_path / "frames.npz", x=x, h=h)  # h stored once: the initial state of every sample
    data = {"path": str(tmp_path / "frames.npz")}
    recipe["data"] = {"calibration": data, "eval": data}
    # the search times every candidate at the batch the model takes (no None latencies to compare)
    recipe["passes"] = allow_slower([{"type": "quantize", "target": {"metric": "cosine", "min_value": 0.9}}])
    recipe["report"]["latency"]["batch_sizes"] = [1, 8]
    report = _validate_run_inspect(_write(tmp_path, recipe), tmp_path / "out")
    for step in report["steps"]:
        assert step["latency"]["batch_1"]["p50_ms"] > 0, step["name"]
        assert "batch_8" not in step["latency"]
    notes = json.dumps(report)
    assert "batch 8 skipped" in notes and "'h'" in notes


def test_state_with_a_free_batch_axis_runs_every_batch_size(tmp_path):
    model = Path(save(recurrent_state("dynamic"), tmp_path / "speaker.onnx"))  # h[2, batch, 32]
    rng = np.random.default_rng(2)
    x, h = rng.standard_normal((6, 16)).astype(np.float32), rng.standard_normal((2, 6, 32)).astype(np.float32)
    np.savez(tmp_path / "frames.npz", x=x, h=h)  # samples on h's axis 1
    recipe = _init(model)
    assert _inputs(recipe)["h"]["batch_axis"] == 1
    recipe["data"] = {
        "calibration": {"path": str(tmp_path / "frames.npz")},
        "eval": {"path": str(tmp_path / "frames.npz")},
    }
    recipe["report"]["latency"]["batch_sizes"] = [1, 4]
    report = _validate_run_inspect(_write(tmp_path, recipe), tmp_path / "out")
    assert {"batch_1", "batch_4"} <= set(report["steps"][-1]["latency"])
    assert report["steps"][-1]["fidelity"]["cosine_mean"] > 0.99


def test_bench_of_a_recurrent_state_model_prints_the_batch_it_takes(tmp_path):
    model = Path(save(recurrent_state(), tmp_path / "speaker.onnx"))
    result = run_cli("bench", model, "--runs", "3", "--warmup", "1", "--json")
    assert result.exit_code == 0, result.stderr
    assert result.json()["latency"]["batch_1"]["p50_ms"] > 0


def test_token_ids_without_data_stay_inside_the_embedding_table(tmp_path):
    model = Path(save(embedding_ids(rows=4), tmp_path / "ocr.onnx"))
    recipe = _init(model)
    recipe["passes"] = [{"type": "quantize", "weights": "int4", "block_size": 16}]
    recipe["report"]["latency"]["batch_sizes"] = [1, 4]
    report = _validate_run_inspect(_write(tmp_path, recipe), tmp_path / "out")
    assert report["steps"][-1]["fidelity"]["cosine_mean"] > 0.9
    assert {"batch_1", "batch_4"} <= set(report["steps"][-1]["latency"])
    # the int4 table (GatherBlockQuantized) bounds the ids bench generates too
    benched = run_cli("bench", report["output"]["path"], "--runs", "2", "--warmup", "1", "--json")
    assert benched.exit_code == 0, benched.stderr
    assert "GatherBlockQuantized" in json.dumps(run_cli("inspect", report["output"]["path"], "--json").json())


def test_torchscript_python_int_argument_is_named_by_init_and_fed_as_a_value(tmp_path):
    import torch

    scripted_rate().save(str(tmp_path / "rate.pt"))
    refused = run_cli("init", tmp_path / "rate.pt")
    assert refused.exit_code == 2 and "sr: int" in refused.stderr and "--shape x=" in refused.stderr, refused.stderr
    recipe = _init(tmp_path / "rate.pt", "--shape", "x=1x16")
    assert _inputs(recipe)["sr"] == {"name": "sr", "value": 1}  # the schema's Python int, by name
    _inputs(recipe)["sr"]["value"] = 8000
    x = np.random.default_rng(3).standard_normal((5, 16)).astype(np.float32)
    expected = torch.jit.load(str(tmp_path / "rate.pt"))(torch.from_numpy(x), 8000).detach().numpy()
    np.savez(tmp_path / "feats.npz", x=x, y=expected)
    recipe["data"] = {"eval": {"path": str(tmp_path / "feats.npz"), "labels": "y", "metric": "mse"}}
    report = _validate_run_inspect(_write(tmp_path, recipe), tmp_path / "out")
    assert report["steps"][0]["accuracy"]["value"] == pytest.approx(0, abs=1e-10)
    assert report["steps"][-1]["accuracy"]["value"] < 1e-3 * float((expected**2).mean())


def test_torchscript_python_argument_without_value_is_refused_by_validate(tmp_path):
    scripted_rate().save(str(tmp_path / "rate.pt"))
    recipe = _init(tmp_path / "rate.pt", "--shape", "x=1x16")
    del _inputs(recipe)["sr"]["value"]
    result = run_cli("validate", _write(tmp_path, recipe))
    assert result.exit_code == 2
    assert "'sr' as a Python int" in result.stderr and "value" in result.stderr, result.stderr


def test_search_with_no_latency_measured_ranks_by_its_metric_and_says_so(tmp_path, monkeypatch):
    import optcli.passes.quantize.search.evaluation as evaluation

    monkeypatch.setattr(evaluation, "time_p50", lambda *a, **k: None)  # every candidate untimed
    model = Path(save(recurrent_state(), tmp_path / "speaker.onnx"))
    x = np.random.default_rng(5).standard_normal((4, 16)).astype(np.float32)
    np.savez(tmp_path / "frames.npz", x=x, h=np.zeros((2, 1, 32), np.float32))
    recipe = _init(model)
    data = {"path": str(tmp_path / "frames.npz")}
    recipe["data"] = {"calibration": data, "eval": data}
    recipe["passes"] = allow_slower([{"type": "quantize", "target": {"metric": "cosine", "min_value": 0.9}}])
    report = _validate_run_inspect(_write(tmp_path, recipe), tmp_path / "out")
    assert "latency not measured" in json.dumps(report)


@pytest.mark.parametrize(
    ("dims", "axes"),
    [
        ([["batch", 16], [2, 1, 32]], [0, 1]),  # a state sized for one sample: its axis of size 1
        ([[1, 16], [2, 1, 32]], [0, 1]),
        ([["batch", 16], [2, "batch", 32]], [0, 1]),  # named as the batch
        ([["s0", 16], [2, "s0", 32], []], [0, 1, None]),  # named as another input's batch; a scalar has none
        ([["batch", 16], [2, None, 32]], [0, 1]),  # a state's one free axis
        ([[4, 3, 8, 8], [4, 10]], [0, 0]),  # exported at batch 4
        ([[5]], [None]),  # one vector: no batch axis
        ([["batch", 16], [2, 3, 32]], [0, None]),  # a state of its own size: the same with every batch
    ],
)
def test_batch_axis_is_read_from_the_file_dims(dims, axes):
    from optcli.model import batch_axes

    assert batch_axes([{"name": f"i{k}", "shape": d} for k, d in enumerate(dims)]) == axes


def test_inputs_pinning_another_batch_refuse_it_with_the_input_named():
    from optcli.model import InputSpec, batch_refusal, batch_sizes_taken, feeds_for_batch

    inputs = [InputSpec("x", (1, 16), "float32"), InputSpec("h", (2, 1, 32), "float32", False, batch_axis=1)]
    assert feeds_for_batch(inputs, 8) is None and "'h'" in batch_refusal(inputs, 8)
    feeds = feeds_for_batch(inputs, 1)
    assert feeds["x"].shape == (1, 16) and feeds["h"].shape == (2, 1, 32)
    assert batch_sizes_taken(inputs, [1, 32]) == [1]
    free = [InputSpec("x", (1, 16), "float32"), InputSpec("h", (2, 1, 32), "float32", batch_axis=1)]
    assert feeds_for_batch(free, 4)["h"].shape == (2, 4, 32)


def test_torchscript_inputs_named_otherwise_in_the_recipe_are_still_fed_by_position(digits, tmp_path):
    recipe = {
        "model": {
            "path": str(digits / "digits_cnn.ts.pt"),
            "inputs": [{"name": "image", "shape": [1, 1, 8, 8]}],  # forward(self, x): another name
        },
        "passes": [{"type": "export"}],
        "report": {"latency": {"batch_sizes": [1], **FAST}, "fidelity_samples": 4},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert run_cli("validate", path).exit_code == 0
