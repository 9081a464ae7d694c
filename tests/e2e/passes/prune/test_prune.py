"""The prune pass, checked on the artifacts it writes: exact sparsity, zeros that survive, channels really gone."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import digits_recipe, run_cli, write_recipe
from onnx import numpy_helper

LAYERS = ["stem.0", "block.conv1", "block.conv2", "features.0", "hidden", "classifier"]
FAST = {"latency": {"batch_sizes": [1], "warmup": 0, "runs": 2, "threads": 1}}


def _run(tmp_path, digits, passes, *extra, **recipe_extra):
    recipe = write_recipe(tmp_path, digits_recipe(digits, passes, report=FAST, **recipe_extra))
    out = tmp_path / "out"
    result = run_cli("run", recipe, "-o", out, "--json", "--quiet", *extra)
    assert result.exit_code == 0, result.stderr
    return out, result.json()


def _pt2_weights(path) -> dict[str, torch.Tensor]:
    """Conv/Linear weights of a written .pt2, read back independently of optcli."""
    state = torch.export.load(str(path)).state_dict
    return {name: state[f"{name}.weight"] for name in LAYERS}


def _zeros(t) -> int:
    return int((t == 0).sum())


def test_global_prune_reaches_the_exact_sparsity_over_the_pruned_layers(digits, tmp_path):
    out, report = _run(tmp_path, digits, [{"type": "prune", "sparsity": 0.6, "scope": "global"}])
    weights = _pt2_weights(out / "steps" / "1-prune" / "model.pt2")
    pruned = [n for n in LAYERS if n not in ("stem.0", "classifier")]  # first conv and head are left alone by default
    n = sum(weights[k].numel() for k in pruned)
    assert abs(sum(_zeros(weights[k]) for k in pruned) - round(0.6 * n)) <= 1
    assert _zeros(weights["stem.0"]) == 0 and _zeros(weights["classifier"]) == 0
    details = report["steps"][1]["details"]
    assert set(details["per_layer_sparsity"]) == set(LAYERS)
    for name in LAYERS:
        assert details["per_layer_sparsity"][name] == pytest.approx(
            _zeros(weights[name]) / weights[name].numel(), abs=1e-6
        )
    assert details["parameters_before"] == details["parameters_after"]  # masks keep shapes ...
    assert details["nonzero_parameters_after"] < details["parameters_before"]
    assert (
        "dense kernels" in details["latency_note"] and "structured: channels" in details["latency_note"]
    )  # ... and buy no speed
    assert report["steps"][1]["compressed_bytes"] < report["steps"][0]["compressed_bytes"]


def test_layer_scope_with_glob_override_reaches_each_layers_sparsity(digits, tmp_path):
    passes = [
        {
            "type": "prune",
            "sparsity": 0.5,
            "scope": "layer",
            "layers": {"features.*": 0.75, "block.conv2": 0.0},
            "exclude": [],
        }
    ]
    out, _ = _run(tmp_path, digits, passes)
    weights = _pt2_weights(out / "model.pt2")
    expected = {
        "stem.0": 0.5,
        "block.conv1": 0.5,
        "block.conv2": 0.0,
        "features.0": 0.75,
        "hidden": 0.5,
        "classifier": 0.5,
    }
    for name, sparsity in expected.items():
        assert abs(_zeros(weights[name]) - round(sparsity * weights[name].numel())) <= 1, name


def test_min_params_and_exclude_leave_layers_alone(digits, tmp_path):
    passes = [{"type": "prune", "sparsity": 0.5, "scope": "layer", "exclude": ["hidden"], "min_params": 1000}]
    out, report = _run(tmp_path, digits, passes)
    weights = _pt2_weights(out / "model.pt2")
    for name in LAYERS:
        big = weights[name].numel() >= 1000 and name != "hidden"
        assert (_zeros(weights[name]) > 0) == big, name
    assert "hidden" in report["steps"][1]["details"]["excluded_layers"]


def test_pruned_weights_stay_zero_through_finetune_and_onnx_export(digits, tmp_path):
    passes = [{"type": "prune", "sparsity": 0.7}, {"type": "finetune", "epochs": 1, "lr": 0.01}, {"type": "export"}]
    recipe = digits_recipe(digits, passes, report=FAST)
    recipe["data"]["train"] = {"path": str(digits / "digits_train.npz"), "labels": "y", "batch_size": 64}
    out = tmp_path / "out"
    result = run_cli("run", write_recipe(tmp_path, recipe), "-o", out, "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    pruned = _pt2_weights(out / "steps" / "1-prune" / "model.pt2")
    tuned = _pt2_weights(out / "steps" / "2-finetune" / "model.pt2")
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out / "model.onnx")).graph.initializer}
    for name in LAYERS:
        zero = pruned[name] == 0
        assert not bool(tuned[name][zero].any()), f"{name}: pruned weights came back during fine-tune"
        onnx_weight = inits[f"{name}.weight"]
        assert not np.any(onnx_weight[zero.numpy()]), f"{name}: pruned weights are non-zero in the ONNX file"
    assert any(not torch.equal(tuned[n], pruned[n]) for n in LAYERS)  # the surviving weights did train


def test_gradual_prune_during_finetune_ends_at_the_exact_sparsity(digits, tmp_path):
    passes = [
        {"type": "prune", "sparsity": 0.7, "schedule": {"steps": 20}},
        {"type": "finetune", "epochs": 2, "lr": 0.003},
    ]
    recipe = digits_recipe(digits, passes, report=FAST)
    recipe["data"]["train"] = {"path": str(digits / "digits_train.npz"), "labels": "y", "batch_size": 64}
    out = tmp_path / "out"
    result = run_cli("run", write_recipe(tmp_path, recipe), "-o", out, "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    start = _pt2_weights(out / "steps" / "1-prune" / "model.pt2")
    end = _pt2_weights(out / "model.pt2")
    pruned = [n for n in LAYERS if n not in ("stem.0", "classifier")]
    assert sum(_zeros(start[k]) for k in pruned) == 0  # the ramp starts dense ...
    n = sum(end[k].numel() for k in pruned)
    assert abs(sum(_zeros(end[k]) for k in pruned) - round(0.7 * n)) <= 1  # ... and ends exactly at the target
    assert result.json()["steps"][1]["details"]["schedule"]["steps"] == 20


def test_masks_hold_through_a_plain_training_loop_and_fold_on_save(tmp_path):
    from optcli.artifact import save_torch
    from optcli.examples.digits import build_cnn
    from optcli.model import InputSpec, Model
    from optcli.passes.base import Context
    from optcli.passes.prune import Config, apply

    torch.manual_seed(0)
    model = Model("torch", [InputSpec("x", (1, 1, 8, 8), "float32")], module=build_cnn(16).eval())
    ctx = Context(recipe=None, step_name="1-prune", step_dir=tmp_path, reference=model, data=None)
    pruned = apply(model, Config(sparsity=0.8), ctx).module
    assert not any(
        _zeros(p) for p in model.module.parameters() if p.dim() > 1
    )  # the reference is never pruned in place
    zero = {n: (m.weight == 0).clone() for n, m in pruned.named_modules() if n in LAYERS}
    opt = torch.optim.Adam(pruned.parameters(), lr=0.05)
    pruned.train()
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(pruned(torch.randn(16, 1, 8, 8)), torch.randint(0, 10, (16,))).backward()
        opt.step()
    saved = _pt2_weights(save_torch(pruned, model.inputs, tmp_path))
    for name in LAYERS:
        assert (saved[name][zero[name]] == 0).all(), name
    assert sum(int(z.sum()) for z in zero.values()) > 0


def test_gradual_schedule_raises_sparsity_step_by_step_to_the_exact_target(tmp_path):
    from optcli.examples.digits import build_cnn
    from optcli.model import InputSpec, Model
    from optcli.passes.base import Context, training_hooks
    from optcli.passes.prune import Config, apply
    from optcli.passes.prune.plan import cubic_sparsity

    model = Model("torch", [InputSpec("x", (1, 1, 8, 8), "float32")], module=build_cnn(16).eval())
    ctx = Context(recipe=None, step_name="1-prune", step_dir=tmp_path, reference=model, data=None)
    module = apply(model, Config(sparsity=0.8, scope="layer", schedule={"steps": 10}), ctx).module
    schedule = training_hooks(module)
    conv = module.block.conv1
    seen = [_zeros(conv.weight)]
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    for step in range(1, 11):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(module(torch.randn(8, 1, 8, 8)), torch.randint(0, 10, (8,))).backward()
        opt.step()
        schedule.step()
        seen.append(_zeros(conv.weight))
        assert abs(seen[-1] - round(cubic_sparsity(step, 10, 0.8) * conv.weight.numel())) <= 1
    assert seen[0] == 0 and seen == sorted(seen) and len(set(seen)) > 5  # a ramp, not one jump
    assert schedule.done and abs(seen[-1] - round(0.8 * conv.weight.numel())) <= 1


def test_schedule_finish_reaches_the_target_when_training_stops_early(tmp_path):
    from optcli.examples.digits import build_cnn
    from optcli.model import InputSpec, Model
    from optcli.passes.base import Context, training_hooks
    from optcli.passes.prune import Config, apply

    model = Model("torch", [InputSpec("x", (1, 1, 8, 8), "float32")], module=build_cnn(16).eval())
    ctx = Context(recipe=None, step_name="1-prune", step_dir=tmp_path, reference=model, data=None)
    module = apply(model, Config(sparsity=0.5, scope="layer", schedule={"steps": 100}), ctx).module
    training_hooks(module).step()
    training_hooks(module).finish()
    weight = module.features[0].weight
    assert abs(_zeros(weight) - round(0.5 * weight.numel())) <= 1


def test_channel_pruning_shrinks_layers_keeps_outputs_and_runs_in_onnxruntime(digits, tmp_path):
    passes = [
        {"type": "prune", "sparsity": 0.5, "structured": "channels", "scope": "layer", "exclude": ["classifier"]},
        {"type": "export"},
    ]
    out, report = _run(tmp_path, digits, passes)
    before = {n: tuple(t.shape) for n, t in _pt2_weights(digits / "digits_cnn.pt2").items()}
    after = {n: tuple(t.shape) for n, t in _pt2_weights(out / "steps" / "1-prune" / "model.pt2").items()}
    for name in ["stem.0", "block.conv1", "features.0", "hidden"]:  # output channels halved, residual block included
        assert after[name][0] == before[name][0] // 2, name
    assert after["block.conv2"][0] == after["stem.0"][0]  # the residual addition keeps both sides equal
    assert after["classifier"][0] == 10 and after["classifier"][1] == after["hidden"][0]
    details = report["steps"][1]["details"]
    assert details["shrunk_layers"]["features.1"]["after"] == [after["features.0"][0]]  # BatchNorm follows its conv
    assert details["parameters_after"] < 0.4 * details["parameters_before"]
    assert report["steps"][1]["parameters"] == details["parameters_after"]
    assert "latency_note" not in details

    program = torch.export.load(str(out / "steps" / "1-prune" / "model.pt2")).module()
    x = np.load(digits / "digits_test.npz")["x"]
    with torch.inference_mode():
        expected = program(torch.from_numpy(x)).numpy()
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    assert got.shape == (len(x), 10)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)
    init_shapes = {t.name: tuple(t.dims) for t in onnx.load(str(out / "model.onnx")).graph.initializer}
    assert init_shapes["features.0.weight"] == after["features.0"]


class Branchy(torch.nn.Module):
    """A depthwise-separable branch and a 1x1 branch joined by a concatenation: channel bookkeeping torch-pruning must get right."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.depthwise = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 1)
        )
        self.side = nn.Conv2d(16, 8, 1)
        self.mix = nn.Sequential(
            nn.Conv2d(24, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = self.stem(x)
        return self.head(self.mix(torch.cat([self.depthwise(x), self.side(x)], dim=1)))


def build_branchy() -> Branchy:
    torch.manual_seed(0)
    return Branchy().eval()


def test_channel_pruning_handles_depthwise_convs_and_concatenation(tmp_path):
    torch.save(build_branchy().state_dict(), tmp_path / "branchy.pt")
    recipe = {
        "model": {
            "path": str(tmp_path / "branchy.pt"),
            "factory": "test_prune:build_branchy",
            "inputs": [{"name": "x", "shape": [1, 3, 12, 12]}],
        },
        "passes": [
            {"type": "prune", "sparsity": 0.5, "structured": "channels", "scope": "layer", "exclude": ["head"]},
            {"type": "export"},
        ],
        "report": FAST,
    }
    out = tmp_path / "out"
    result = run_cli("run", write_recipe(tmp_path, recipe), "-o", out, "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    state = torch.export.load(str(out / "steps" / "1-prune" / "model.pt2")).state_dict
    dw = state["depthwise.0.weight"]
    assert (
        dw.shape[1] == 1 and dw.shape[0] == state["stem.0.weight"].shape[0] == 8
    )  # depthwise stays depthwise, halved with its input
    assert (
        state["mix.0.weight"].shape[1] == state["depthwise.3.weight"].shape[0] + state["side.weight"].shape[0] < 24
    )  # the concat shrank
    x = np.random.default_rng(0).standard_normal((4, 3, 12, 12)).astype(np.float32)
    with torch.inference_mode():
        expected = torch.export.load(str(out / "steps" / "1-prune" / "model.pt2")).module()(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.shape == (4, 5)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)


def test_onnx_initializer_pruning_keeps_the_graph_valid_and_exact(digits, tmp_path):
    recipe = digits_recipe(digits, [{"type": "prune", "sparsity": 0.6, "scope": "layer", "exclude": []}], report=FAST)
    recipe["model"] = {"path": str(digits / "digits_cnn.onnx")}
    out = tmp_path / "out"
    result = run_cli("run", write_recipe(tmp_path, recipe), "-o", out, "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weights = [inits[n.input[1]] for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(weights) == 6
    for w in weights:
        assert abs(int((w == 0).sum()) - round(0.6 * w.size)) <= 1
    x = np.load(digits / "digits_test.npz")["x"]
    logits = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert logits.shape == (len(x), 10) and np.isfinite(logits).all()
    assert result.json()["steps"][1]["sparsity"] > 0.55


def _identity_checkpoint(folder):
    path = folder / "identity.pt"
    torch.save({}, path)
    return {
        "path": str(path),
        "factory": "torch.nn:Identity",
        "inputs": [{"name": "x", "shape": [1, 4], "dtype": "float32"}],
    }


REFUSALS = {
    "sparsity_one": ({"sparsity": 1.0}, "less than 1"),
    "sparsity_negative": ({"sparsity": -0.1}, "greater than or equal to 0"),
    "layer_sparsity_out_of_range": ({"layers": {"hidden": 1.5}}, "outside [0, 1)"),
    "glob_matches_nothing": ({"layers": {"decoder.*": 0.5}}, "'decoder.*' matches no prunable layer"),
    "exclude_matches_nothing": ({"exclude": ["nope"]}, "'nope' matches no prunable layer"),
    "everything_excluded": ({"exclude": ["*"]}, "no layer"),
    "schedule_without_finetune": ({"schedule": {"steps": 10}}, "add a finetune pass"),
    "structured_onnx": ({"structured": "channels", "_onnx": True}, "needs a torch model"),
    "onnx_glob_matches_nothing": (
        {"layers": {"decoder.*": 0.5}, "_onnx": True},
        "'decoder.*' matches no prunable layer",
    ),
    "no_prunable_layers": ({"_identity": True}, "no prunable layers"),
    "torchscript_model": ({"_ts": True}, "keeps no Conv/Linear modules"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_impossible_prune_request_is_refused_with_exit_2_and_one_line(digits, tmp_path, case):
    options, words = REFUSALS[case]
    options = dict(options)
    prune = {"type": "prune", "sparsity": 0.5, **{k: v for k, v in options.items() if not k.startswith("_")}}
    recipe = digits_recipe(digits, [prune], report=FAST)
    if options.get("_onnx"):
        recipe["model"] = {"path": str(digits / "digits_cnn.onnx")}
    if options.get("_ts"):
        recipe["model"] = {"path": str(digits / "digits_cnn.ts.pt"), "inputs": recipe["model"]["inputs"]}
    if options.get("_identity"):
        recipe["model"] = _identity_checkpoint(tmp_path)
        recipe["data"] = {}
    path = write_recipe(tmp_path, recipe)
    for verb in (["validate", path], ["run", path, "-o", tmp_path / "out"]):
        result = run_cli(*verb)
        assert result.exit_code == 2, (verb[0], result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], (verb[0], result.stderr)
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()  # refused before any work: nothing written
