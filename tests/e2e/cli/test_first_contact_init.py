"""Issue 21, part 4: the first recipe runs. `optcli init` writes a recipe that validates and runs where it is
written, checks --data against the model, keeps calibration and evaluation apart; a model given where a recipe goes,
refusals `run` would make after work has started, and errors a CI reporter must see — each as the user meets it."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import yaml
from conftest import run_cli, write_recipe

from optcli.data import DataCatalog
from optcli.model import InputSpec
from optcli.recipe import load_recipe

DIGITS_INPUT = [InputSpec(name="x", shape=[1, 1, 8, 8], dtype="float32")]
QUICK = {"latency": {"batch_sizes": [1], "warmup": 0, "runs": 2, "threads": 1}}


@pytest.fixture
def work(digits, tmp_path):
    """A user's folder: the digits models and data beside each other, named relatively."""
    for name in ("digits_cnn.onnx", "digits_cnn.ts.pt", "digits_cnn.pt", "digits_test.npz"):
        shutil.copy(digits / name, tmp_path / name)
    return tmp_path


# --------------------------------------------------------------------------- 1. paths relative to the recipe


def test_init_output_file_names_paths_from_where_the_recipe_lives(work, tmp_path_factory):
    (work / "recipes").mkdir()
    result = run_cli("init", "digits_cnn.onnx", "--data", "digits_test.npz", "-o", "recipes/r.yaml", cwd=work)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""  # the recipe went to the file
    recipe = yaml.safe_load((work / "recipes" / "r.yaml").read_text())
    assert recipe["model"]["path"] == "../digits_cnn.onnx"
    assert recipe["data"]["eval"]["path"] == "../digits_test.npz"
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    assert run_cli("validate", work / "recipes" / "r.yaml", cwd=elsewhere).exit_code == 0
    again = run_cli("init", "digits_cnn.onnx", "-o", "recipes/r.yaml", cwd=work)
    assert again.exit_code == 2 and "--overwrite" in again.stderr  # an existing recipe is not replaced silently
    assert yaml.safe_load((work / "recipes" / "r.yaml").read_text()) == recipe
    model_bytes = (work / "digits_cnn.onnx").read_bytes()
    onto_model = run_cli("init", "digits_cnn.onnx", "-o", "digits_cnn.onnx", "--overwrite", cwd=work)
    assert onto_model.exit_code == 2 and (work / "digits_cnn.onnx").read_bytes() == model_bytes


def test_init_to_stdout_redirected_into_the_working_folder_validates_from_anywhere(work, tmp_path_factory):
    result = run_cli("init", "digits_cnn.onnx", "--data", "digits_test.npz", cwd=work)
    assert result.exit_code == 0, result.stderr
    (work / "recipe.yaml").write_text(result.stdout)  # `optcli init digits_cnn.onnx > recipe.yaml`
    assert yaml.safe_load(result.stdout)["model"]["path"] == "digits_cnn.onnx"
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    checked = run_cli("validate", work / "recipe.yaml", cwd=elsewhere)
    assert checked.exit_code == 0, checked.stderr


# --------------------------------------------------------------------------- 2. --data checked against the model


def test_init_refuses_data_keyed_unlike_the_model_with_the_message_validate_gives(work):
    np.savez(work / "wrongkey.npz", a=np.zeros((4, 1, 8, 8), np.float32))
    init = run_cli("init", "digits_cnn.onnx", "--data", "wrongkey.npz", cwd=work)
    assert init.exit_code == 2 and init.stdout == ""
    recipe = {
        "model": {"path": "digits_cnn.onnx"},
        "data": {"calibration": {"path": "wrongkey.npz"}},
        "passes": [{"type": "quantize", "mode": "static"}],
    }
    validate = run_cli("validate", write_recipe(work, recipe))
    assert validate.exit_code == 2
    assert init.stderr == validate.stderr and "wrongkey.npz" in init.stderr and "x" in init.stderr


# --------------------------------------------------------------------------- 3. calibration and eval apart


def test_init_with_one_data_file_calibrates_and_measures_on_disjoint_halves(work):
    result = run_cli("init", "digits_cnn.onnx", "--data", "digits_test.npz", "-o", "r.yaml", cwd=work)
    assert result.exit_code == 0, result.stderr
    recipe = load_recipe(work / "r.yaml")
    data = DataCatalog(recipe.data, DIGITS_INPUT)
    total = np.load(work / "digits_test.npz")["x"]
    calibration, evaluation = data.calibration.arrays["x"], data.eval.arrays["x"]
    first_half = len(total) - len(evaluation)
    assert len(evaluation) == len(total) // 2 and 0 < len(calibration) <= first_half
    assert np.array_equal(calibration, total[: len(calibration)])  # from the first half
    assert np.array_equal(evaluation, total[first_half:])  # the second half, whole: no sample in both
    assert len(data.eval.labels) == len(evaluation)  # labels follow their inputs


def test_a_data_slice_that_is_empty_or_reversed_is_refused_at_validate(work):
    recipe = {
        "model": {"path": "digits_cnn.onnx"},
        "data": {"eval": {"path": "digits_test.npz", "take": [0.6, 0.2]}},
        "passes": [{"type": "quantize"}],
    }
    result = run_cli("validate", write_recipe(work, recipe))
    assert result.exit_code == 2 and "take" in result.stderr and "start < stop" in result.stderr


# --------------------------------------------------------------------------- 4. no data: a recipe that runs


@pytest.mark.parametrize(("model", "args"), [("digits_cnn.onnx", ()), ("digits_cnn.ts.pt", ("--shape", "x=1x1x8x8"))])
def test_init_without_data_writes_a_recipe_that_runs_on_generated_inputs(work, model, args):
    init = run_cli("init", model, *args, cwd=work)
    assert init.exit_code == 0, init.stderr
    assert "generated inputs" in init.stderr and "--data" in init.stderr
    assert "generated inputs" in init.stdout  # said in the recipe too
    (work / "recipe.yaml").write_text(init.stdout)  # `optcli init MODEL > recipe.yaml`
    run = run_cli("run", "recipe.yaml", "-o", "out", "--quiet", cwd=work)
    assert run.exit_code in (0, 1), run.stderr  # it ran; a gate may fail, never bad input or a failed pass
    report = json.loads((work / "out" / "report.json").read_text())
    assert report["steps"][-1]["fidelity"]["cosine_mean"] is not None


# --------------------------------------------------------------------------- 5. pickles


def test_init_points_a_pickled_module_at_trust_pickle_and_takes_it(work):
    import torch

    from optcli.examples.digits import build_cnn

    module = build_cnn(width=16)
    module.load_state_dict(torch.load(work / "digits_cnn.pt", weights_only=True))
    torch.save(module, work / "whole.pt")
    refused = run_cli("init", "whole.pt", "--shape", "x=1x1x8x8", cwd=work)
    assert refused.exit_code == 2 and "--trust-pickle" in refused.stderr and "--factory" not in refused.stderr
    trusted = run_cli("init", "whole.pt", "--shape", "x=1x1x8x8", "--trust-pickle", "-o", "r.yaml", cwd=work)
    assert trusted.exit_code == 0, trusted.stderr
    assert run_cli("validate", work / "r.yaml").exit_code == 0  # the recipe carries the opt-in it was written with
    weights = run_cli("init", "digits_cnn.pt", cwd=work)
    assert weights.exit_code == 2 and "--factory" in weights.stderr  # a state_dict: weights only


# --------------------------------------------------------------------------- 6. a model where a recipe goes


@pytest.mark.parametrize("model", ["digits_cnn.onnx", "digits_cnn.ts.pt", "digits_cnn.pt"])
def test_a_model_given_as_the_recipe_is_named_a_model_with_the_init_command(work, model):
    for verb in (["run", model, "-o", "out"], ["validate", model], ["sweep", model, "-o", "out"]):
        result = run_cli(*verb, cwd=work)
        assert result.exit_code == 2, result.stderr
        assert (
            result.stderr
            == f"error: {model} is a model, not a recipe: `optcli init {model} > recipe.yaml` writes one\n"
        )
    assert not (work / "out").exists()


def test_a_model_renamed_yaml_is_still_recognised_by_its_bytes(work):
    shutil.copy(work / "digits_cnn.onnx", work / "model.yaml")
    result = run_cli("validate", "model.yaml", cwd=work)
    assert result.exit_code == 2 and "is a model, not a recipe" in result.stderr and "#x" not in result.stderr


# --------------------------------------------------------------------------- 7. validate refuses what run would


@pytest.mark.parametrize(
    "passes",
    [
        [{"type": "cluster"}],
        [{"type": "prune"}],
        [{"type": "convert", "dtype": "fp16"}],
        [{"type": "finetune", "epochs": 1}],
        [{"type": "export"}, {"type": "prune"}, {"type": "cluster"}],
    ],
    ids=["cluster", "prune", "convert", "finetune", "export-first"],
)
def test_validate_refuses_torch_passes_on_torchscript_as_run_does(work, passes):
    recipe = {
        "model": {"path": "digits_cnn.ts.pt", "inputs": [{"name": "x", "shape": [1, 1, 8, 8]}]},
        "data": {"train": {"path": "digits_test.npz"}},
        "passes": passes,
        "report": QUICK,
    }
    path = write_recipe(work, recipe)
    validate = run_cli("validate", path)
    if passes[0]["type"] == "export":  # after the export these passes edit an ONNX graph: nothing to refuse
        assert validate.exit_code == 0, validate.stderr
        return
    run = run_cli("run", path, "-o", work / "out", "--quiet")
    assert validate.exit_code == 2 and "TorchScript" in validate.stderr.replace("torchscript", "TorchScript")
    assert run.exit_code == 2 and run.stderr == validate.stderr  # the same line, before any measurement
    assert not (work / "out").exists()


# --------------------------------------------------------------------------- 8. errors CI reporters see


@pytest.mark.parametrize(
    "verb",
    [
        ["run", "digits_cnn.onnx", "-o", "out"],
        ["sweep", "digits_cnn.onnx", "-o", "out"],
        ["compare", "missing.json", "also-missing.json"],
    ],
    ids=["run", "sweep", "compare"],
)
def test_a_bad_input_still_gives_ci_a_junit_error_and_a_json_error(work, verb):
    result = run_cli(*verb, "--json", "--junit", "results.xml", cwd=work)
    assert result.exit_code == 2
    line = result.stderr.strip().removeprefix("error: ")
    assert result.json() == {"error": line, "exit_code": 2}
    root = ET.parse(work / "results.xml").getroot()
    assert root.get("errors") == "1" and root.get("tests") == "1"
    error = root.find("testsuite/testcase/error")
    assert error is not None and error.get("message") == line and error.get("type") == "BadInput"
