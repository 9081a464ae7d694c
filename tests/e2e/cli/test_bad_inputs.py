"""Each bad input the core refuses: exit 2, one line naming the problem, no traceback, input untouched, no output."""

from __future__ import annotations

import hashlib
import shutil

import pytest
from conftest import digits_recipe, run_cli, write_recipe


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _missing_model(d, t):
    return digits_recipe(d, [{"type": "quantize"}]) | {"model": {"path": str(t / "nope.onnx")}}, "nope.onnx not found"


def _zero_byte_onnx(d, t):
    (t / "empty.onnx").write_bytes(b"")
    return digits_recipe(d, [{"type": "quantize"}]) | {"model": {"path": str(t / "empty.onnx")}}, "empty (0 bytes)"


def _truncated_onnx(d, t):
    (t / "cut.onnx").write_bytes((d / "digits_cnn.onnx").read_bytes()[:5000])
    return digits_recipe(d, [{"type": "quantize"}]) | {"model": {"path": str(t / "cut.onnx")}}, "not a valid ONNX file"


def _random_bytes_pt(d, t):
    (t / "noise.pt").write_bytes(bytes(range(256)) * 40)
    recipe = digits_recipe(d, [{"type": "export"}])
    recipe["model"]["path"] = str(t / "noise.pt")
    return recipe, "not a PyTorch checkpoint"


def _pickled_module(d, t):
    import torch

    from optcli.examples.digits import build_cnn

    torch.save(build_cnn(16), t / "whole.pt")
    recipe = digits_recipe(d, [{"type": "export"}])
    recipe["model"]["path"] = str(t / "whole.pt")
    return recipe, "trust_pickle"


def _unknown_pass(d, t):
    return digits_recipe(d, [{"type": "distil"}]), "unknown pass type 'distil'"


def _unknown_key(d, t):
    return digits_recipe(d, [{"type": "quantize", "per_chanel": True}]), "passes[0].per_chanel: unknown key"


def _wrong_type(d, t):
    return digits_recipe(d, [{"type": "quantize", "per_channel": "sometimes"}]), "passes[0].per_channel"


def _static_without_calibration(d, t):
    recipe = digits_recipe(d, [{"type": "quantize", "mode": "static"}])
    del recipe["data"]["calibration"]
    return recipe, "needs calibration data"


def _missing_calibration_file(d, t):
    recipe = digits_recipe(d, [{"type": "quantize", "mode": "static"}])
    recipe["data"]["calibration"]["path"] = str(t / "calib.npz")
    return recipe, "data.calibration.path"


def _dynamic_dim_without_size(d, t):
    import torch
    from models import build_encoder

    torch.onnx.export(
        build_encoder(),
        (torch.zeros(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long)),
        str(t / "enc.onnx"),
        dynamo=False,
        input_names=["input_ids", "attention_mask"],
        dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}},
    )
    return {
        "model": {"path": str(t / "enc.onnx")},
        "passes": [{"type": "quantize"}],
    }, "input 'input_ids' has a dynamic dimension 1"


def _finetune_after_export(d, t):
    return digits_recipe(d, [{"type": "export"}, {"type": "export"}]), "needs a torch model but gets onnx"


CASES = [
    _missing_model,
    _zero_byte_onnx,
    _truncated_onnx,
    _random_bytes_pt,
    _pickled_module,
    _unknown_pass,
    _unknown_key,
    _wrong_type,
    _static_without_calibration,
    _missing_calibration_file,
    _dynamic_dim_without_size,
    _finetune_after_export,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__.strip("_") for c in CASES])
def test_bad_input_exits_2_with_one_line_and_touches_nothing(digits, tmp_path, case):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    data = tmp_path / "data"
    shutil.copytree(digits, data)
    recipe, expected = case(data, inputs)
    path = write_recipe(tmp_path, recipe)
    before = {p: _sha(p) for p in [*data.iterdir(), *inputs.iterdir()] if p.is_file()}
    out = tmp_path / "out"
    for verb in (["validate", path], ["run", path, "-o", out]):
        result = run_cli(*verb)
        assert result.exit_code == 2, (verb[0], result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert expected in lines[0]
        assert "Traceback" not in result.stderr and result.stdout == ""
    assert not out.exists() or not any(p.name != "steps" for p in out.iterdir()) and not any((out / "steps").iterdir())
    assert before == {p: _sha(p) for p in before}


def test_debug_shows_the_traceback(digits, tmp_path):
    recipe = write_recipe(tmp_path, digits_recipe(digits, [{"type": "quantize", "mode": "static"}], data={}))
    result = run_cli("validate", recipe, "--debug")
    assert result.exit_code == 2 and "Traceback" in result.stderr


def test_non_empty_output_folder_needs_overwrite(digits, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    recipe = write_recipe(tmp_path, digits_recipe(digits, [{"type": "export"}]))
    result = run_cli("run", recipe, "-o", out)
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_export_that_cannot_trace_fails_the_pass_with_exit_3(tmp_path):
    import torch
    from models import build_not_exportable

    torch.save(build_not_exportable().state_dict(), tmp_path / "m.pt")
    recipe = {
        "model": {
            "path": str(tmp_path / "m.pt"),
            "factory": "models:build_not_exportable",
            "inputs": [{"name": "x", "shape": [1, 4]}],
        },
        "passes": [{"type": "export"}],
    }
    result = run_cli("run", write_recipe(tmp_path, recipe), "-o", tmp_path / "out", "--quiet")
    assert result.exit_code == 3
    assert "pass 1-export failed" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "model.onnx").exists()
