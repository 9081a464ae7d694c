"""Every model format optcli reads, and every CLI verb, driven as a user would."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import yaml
from conftest import EXPORT, digits_recipe, run_cli, write_recipe


def _reference_logits(digits):
    from optcli.examples.digits import build_cnn

    model = build_cnn(16)
    model.load_state_dict(torch.load(digits / "digits_cnn.pt", weights_only=True))
    x = np.load(digits / "digits_test.npz")["x"][:16]
    with torch.inference_mode():
        return x, model.eval()(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def formats(digits, tmp_path_factory):
    """The same weights as a checkpoint dict, safetensors, and ONNX with external data."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("formats")
    state = torch.load(digits / "digits_cnn.pt", weights_only=True)
    torch.save({"epoch": 3, "state_dict": state}, folder / "checkpoint.pth")
    save_file(state, str(folder / "weights.safetensors"))
    proto = onnx.load(str(digits / "digits_cnn.onnx"))
    (folder / "ext").mkdir()
    onnx.save_model(
        proto, str(folder / "ext" / "model.onnx"), save_as_external_data=True, location="weights.bin", size_threshold=0
    )
    return folder


@pytest.mark.parametrize(
    "name",
    [
        "digits_cnn.pt",
        "digits_cnn.pt2",
        "digits_cnn.ts.pt",
        "digits_cnn.onnx",
        "checkpoint.pth",
        "weights.safetensors",
        "ext/model.onnx",
    ],
)
def test_every_format_loads_and_matches_the_trained_model(digits, formats, name, tmp_path):
    from optcli.artifact import load_model
    from optcli.config import ModelSpec
    from optcli.measure import runner_for

    path = digits / name if (digits / name).exists() else formats / name
    spec = ModelSpec(
        path=path,
        factory="optcli.examples.digits:build_cnn",
        factory_kwargs={"width": 16},
        inputs=[{"name": "x", "shape": [1, 1, 8, 8]}],
    )
    model = load_model(spec)
    x, expected = _reference_logits(digits)
    got = runner_for(model, threads=1)({"x": x})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_inspect_reports_params_ops_inputs_of_onnx_and_state_dict(digits):
    result = run_cli("inspect", digits / "digits_cnn.onnx", "--json")
    assert result.exit_code == 0, result.stderr
    info = result.json()
    proto = onnx.load(str(digits / "digits_cnn.onnx"))
    assert info["ops"]["Conv"] == sum(n.op_type == "Conv" for n in proto.graph.node)
    assert info["inputs"][0]["name"] == "x" and info["inputs"][0]["batch_dynamic"]
    state = torch.load(digits / "digits_cnn.pt", weights_only=True)
    result = run_cli("inspect", digits / "digits_cnn.pt", "--json")
    expected = sum(v.numel() for k, v in state.items() if v.is_floating_point() and "running_" not in k)
    assert result.json()["parameters"] == expected
    assert run_cli("inspect", digits / "digits_cnn.pt2").exit_code == 0


def test_init_writes_a_recipe_that_validates(digits, tmp_path):
    result = run_cli("init", digits / "digits_cnn.onnx", "--data", digits / "digits_calib.npz")
    assert result.exit_code == 0, result.stderr
    recipe = yaml.safe_load(result.stdout)
    assert recipe["model"]["inputs"] == [{"name": "x", "shape": [1, 1, 8, 8], "dtype": "float32"}]
    path = tmp_path / "r.yaml"
    path.write_text(result.stdout)
    assert run_cli("validate", path).exit_code == 0
    result = run_cli("init", digits / "digits_cnn.pt", "--factory", "optcli.examples.digits:build_cnn")
    assert (
        result.exit_code == 2 and "does not fit" in result.stderr and "factory_kwargs" in result.stderr
    )  # width 16 vs default 32
    result = run_cli("init", digits / "digits_cnn.ts.pt")
    assert result.exit_code == 2 and "--shape" in result.stderr  # TorchScript does not record its input shapes
    result = run_cli("init", digits / "digits_cnn.ts.pt", "--shape", "x=1x1x8x8")
    assert yaml.safe_load(result.stdout)["model"]["inputs"][0]["shape"] == [1, 1, 8, 8]
    result = run_cli("init", digits / "digits_cnn.pt2")
    assert yaml.safe_load(result.stdout)["passes"][0]["type"] == "export"


def test_bench_reports_percentiles_per_batch(digits):
    result = run_cli(
        "bench", digits / "digits_cnn.onnx", "--batch", "1", "--batch", "4", "--runs", "5", "--warmup", "1", "--json"
    )
    assert result.exit_code == 0, result.stderr
    lat = result.json()["latency"]
    assert set(lat) == {"batch_1", "batch_4"}
    assert lat["batch_4"]["throughput_per_s"] == pytest.approx(4000 / lat["batch_4"]["p50_ms"], rel=1e-3)


def test_passes_and_schema_describe_every_option():
    result = run_cli("passes", "--json")
    catalog = {p["type"]: p for p in result.json()}
    options = {o["name"]: o for o in catalog["quantize"]["options"]}
    assert options["mode"]["default"] == "dynamic" and "calibration.method" in options
    schema = json.loads(run_cli("schema").stdout)
    assert "passes" in schema["properties"] and "model" in schema["required"]


def test_compare_two_reports(digits, tmp_path):
    outs = []
    for mode in ("dynamic", "static"):
        recipe = write_recipe(
            tmp_path, digits_recipe(digits, [{"type": "quantize", "mode": mode, "allow_slower": True}]), f"{mode}.yaml"
        )
        assert run_cli("run", recipe, "-o", tmp_path / mode, "--quiet").exit_code == 0
        outs.append(tmp_path / mode / "report.json")
    result = run_cli("compare", *outs, "--json")
    rows = {r["metric"]: r for r in result.json()["rows"]}
    a, b = (json.loads(p.read_text())["steps"][-1]["size_bytes"] for p in outs)
    assert rows["size_bytes"]["ratio"] == pytest.approx(a / b, rel=1e-3)


def test_set_overrides_a_recipe_key(digits, tmp_path):
    recipe = write_recipe(tmp_path, digits_recipe(digits, [EXPORT, {"type": "quantize", "allow_slower": True}]))
    result = run_cli(
        "validate", recipe, "--set", "passes.1.mode=static", "--set", "passes.1.per_channel=true", "--json"
    )
    assert result.json()["recipe"]["passes"][1]["mode"] == "static"
    bad = run_cli("validate", recipe, "--set", "passes.7.mode=static")
    assert bad.exit_code == 2 and "no index" in bad.stderr


def digits_batches(n: int = 64):
    """A data factory: yields dicts keyed by input name, like a user's loader."""
    from optcli.examples.digits import digits_arrays

    arrays = digits_arrays()
    for i in range(0, n, 16):
        yield {"x": arrays["x_test"][i : i + 16], "y": arrays["y_test"][i : i + 16]}


def test_data_factory_feeds_evaluation(digits, tmp_path):
    recipe = digits_recipe(digits, [EXPORT])
    recipe["data"] = {
        "eval": {"factory": "test_loaders_and_verbs:digits_batches", "factory_kwargs": {"n": 48}, "labels": "y"}
    }
    result = run_cli("run", write_recipe(tmp_path, recipe), "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.stderr
    assert "48 samples" in result.json()["evaluation"]


def test_pickled_module_needs_trust(digits, tmp_path):
    from optcli.examples.digits import build_cnn

    torch.save(build_cnn(8), tmp_path / "whole.pt")
    refused = run_cli("inspect", tmp_path / "whole.pt")
    assert refused.exit_code == 2 and "--trust-pickle" in refused.stderr
    assert run_cli("inspect", tmp_path / "whole.pt", "--trust-pickle").exit_code == 0


@pytest.mark.parametrize("suffix", [".npz", ".pt", ".safetensors"])
def test_eval_data_reads_npz_pt_and_safetensors_alike(digits, tmp_path, suffix):
    from safetensors.numpy import save_file

    arrays = dict(np.load(digits / "digits_test.npz"))
    path = tmp_path / f"test{suffix}"
    if suffix == ".npz":
        np.savez(path, **arrays)
    elif suffix == ".pt":
        torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, path)
    else:
        save_file(arrays, str(path))
    recipe = digits_recipe(digits, [])
    recipe["data"] = {"eval": {"path": str(path), "labels": "y", "samples": 100}}
    result = run_cli("run", write_recipe(tmp_path, recipe), "-o", tmp_path / "out", "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    x, y = arrays["x"][:100], arrays["y"][:100]
    from optcli.examples.digits import build_cnn

    model = build_cnn(16)
    model.load_state_dict(torch.load(digits / "digits_cnn.pt", weights_only=True))
    with torch.inference_mode():
        expected = float((model.eval()(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
    assert result.json()["steps"][0]["accuracy"]["value"] == pytest.approx(expected)


def test_top5_and_mse_metrics_match_scikit_learn():
    from sklearn.metrics import mean_squared_error, top_k_accuracy_score

    from optcli.measure import metric_value

    rng = np.random.default_rng(0)
    logits, labels = rng.standard_normal((200, 10)), rng.integers(0, 10, 200)
    assert metric_value("top5", [logits], labels) == pytest.approx(
        top_k_accuracy_score(labels, logits, k=5, labels=range(10))
    )
    pred, target = rng.standard_normal((50, 1)), rng.standard_normal(50)
    assert metric_value("mse", [pred], target) == pytest.approx(mean_squared_error(target, pred.ravel()))
