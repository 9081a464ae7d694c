"""int8 on a small transformer encoder with int64 token ids and a -inf attention mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import EXPORT, allow_slower, run_cli, write_recipe


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    from models import build_encoder

    folder = tmp_path_factory.mktemp("encoder")
    torch.save(build_encoder().state_dict(), folder / "encoder.pt")
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 100, size=(96, 16)).astype(np.int64)
    mask = np.ones_like(ids)
    for row, length in enumerate(rng.integers(4, 17, size=96)):
        mask[row, length:] = 0  # padded tails: the model adds -inf to their attention scores
    np.savez(folder / "tokens.npz", input_ids=ids, attention_mask=mask)
    return folder


def _recipe(folder, quantize: dict) -> dict:
    return {
        "model": {
            "path": str(folder / "encoder.pt"),
            "factory": "models:build_encoder",
            "inputs": [
                {"name": "input_ids", "shape": [1, 16], "dtype": "int64"},
                {"name": "attention_mask", "shape": [1, 16], "dtype": "int64"},
            ],
        },
        "data": {
            "calibration": {"path": str(folder / "tokens.npz"), "samples": 64},
            "eval": {"path": str(folder / "tokens.npz")},
        },
        "passes": allow_slower([EXPORT, {"type": "quantize", **quantize}]),
        "report": {"latency": {"batch_sizes": [4], "warmup": 1, "runs": 3, "threads": 1}},
    }


def test_dynamic_int8_encoder_keeps_fidelity(encoder, tmp_path):
    result = run_cli(
        "run",
        write_recipe(tmp_path, _recipe(encoder, {"mode": "dynamic", "per_channel": True})),
        "-o",
        tmp_path / "out",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    report = result.json()
    final = report["steps"][-1]
    assert (
        final["accuracy"] is None and "fidelity only" in report["evaluation"]
    )  # no labels: fidelity is still measured
    assert final["fidelity"]["cosine_mean"] > 0.99
    assert (
        final["details"]["quantized_ops"].get("MatMulInteger", 0)
        + final["details"]["quantized_ops"].get("DynamicQuantizeMatMul", 0)
        > 0
    )
    # re-measure independently: the written model vs the torch model on the eval tokens
    import onnxruntime as ort
    from models import build_encoder

    data = np.load(encoder / "tokens.npz")
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]})[0]
    with torch.inference_mode():
        ref = build_encoder()(torch.from_numpy(data["input_ids"]), torch.from_numpy(data["attention_mask"])).numpy()
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert abs(cos.mean() - final["fidelity"]["cosine_mean"]) < 1e-4


def test_static_int8_calibration_survives_inf_attention_masks_and_says_so(encoder, tmp_path):
    result = run_cli(
        "run", write_recipe(tmp_path, _recipe(encoder, {"mode": "static"})), "-o", tmp_path / "out", "--json"
    )
    assert result.exit_code == 0, result.stderr
    report = result.json()
    final = report["steps"][-1]
    assert final["details"]["nonfinite_tensors"], "the -inf mask tensors should have been found"
    assert any("inf" in w for w in report["warnings"])
    assert np.isfinite(final["fidelity"]["cosine_mean"]) and final["fidelity"]["cosine_mean"] > 0.9


def test_library_warnings_land_in_the_report_not_the_terminal(encoder, tmp_path):
    # Without pre-processing ONNX Runtime's quantizer logs advice; the user finds it in report.json.
    result = run_cli(
        "run",
        write_recipe(tmp_path, _recipe(encoder, {"mode": "dynamic", "preprocess": False})),
        "-o",
        tmp_path / "out",
        "--json",
        "--quiet",
    )
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    assert any("2-quantize" in w and "pre-process" in w for w in result.json()["warnings"])
