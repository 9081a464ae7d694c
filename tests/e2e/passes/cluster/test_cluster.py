"""The cluster pass (weight sharing), checked on the artifacts it writes: exactly k values per layer, kept by a fine-tune."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from conftest import digits_recipe, run_cli, write_recipe
from onnx import numpy_helper

LAYERS = ["stem.0", "block.conv1", "block.conv2", "features.0", "hidden", "classifier"]
CLUSTERED = ["block.conv1", "block.conv2", "features.0", "hidden"]  # first conv and head are excluded by default
FAST = {"latency": {"batch_sizes": [1], "warmup": 0, "runs": 2, "threads": 1}}


def _pt2_weights(path) -> dict[str, torch.Tensor]:
    state = torch.export.load(str(path)).state_dict
    return {name: state[f"{name}.weight"] for name in LAYERS}


def _distinct(t) -> int:
    return len(np.unique(t.detach().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)))


def _run(tmp_path, recipe, *extra):
    out = tmp_path / "out"
    result = run_cli("run", write_recipe(tmp_path, recipe), "-o", out, "--json", "--quiet", *extra)
    assert result.exit_code == 0, result.stderr
    return out, result.json()


def test_clustering_survives_a_finetune_with_exactly_k_values_per_layer(digits, tmp_path):
    passes = [{"type": "cluster", "clusters": 16}, {"type": "finetune", "epochs": 1, "lr": 0.003}, {"type": "export"}]
    recipe = digits_recipe(digits, passes, report=FAST)
    recipe["data"]["train"] = {"path": str(digits / "digits_train.npz"), "labels": "y", "batch_size": 64}
    out, report = _run(tmp_path, recipe)
    clustered = _pt2_weights(out / "steps" / "1-cluster" / "model.pt2")
    tuned = _pt2_weights(out / "steps" / "2-finetune" / "model.pt2")
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out / "model.onnx")).graph.initializer}
    for name in CLUSTERED:
        assert _distinct(clustered[name]) == 16, name
        assert _distinct(tuned[name]) == 16, f"{name}: the fine-tune broke the sharing"
        # assignments stay: weights that shared a value before training share one after it
        before, after = clustered[name].detach().numpy().ravel(), tuned[name].detach().numpy().ravel()
        for value in np.unique(before):
            assert _distinct(after[before == value]) == 1, name
        # The BatchNorm after each conv was folded in before clustering, so the export has none left to fold into
        # the weights channel by channel: the ONNX file holds the 16 shared values themselves.
        assert _distinct(inits[f"{name}.weight"]) == 16, f"{name}: the ONNX export lost the sharing"
    assert any(not torch.equal(tuned[n], clustered[n]) for n in CLUSTERED)  # the centroids did train
    for name in ("stem.0", "classifier"):
        assert _distinct(tuned[name]) > 16  # excluded by default
    dense, shared = report["steps"][0], report["steps"][1]
    assert shared["compressed_bytes"] < dense["compressed_bytes"]
    assert set(shared["details"]["clustered_layers"]) == set(CLUSTERED)
    assert shared["details"]["folded_batchnorm"] == {
        "block.conv1": "block.bn1",
        "block.conv2": "block.bn2",
        "features.0": "features.1",
    }
    assert any("latency is unchanged" in w for w in report["warnings"])


def test_pruned_then_clustered_layers_keep_their_zeros(digits, tmp_path):
    passes = [{"type": "prune", "sparsity": 0.5}, {"type": "cluster", "bits": 3}]
    out, report = _run(tmp_path, digits_recipe(digits, passes, report=FAST))
    pruned = _pt2_weights(out / "steps" / "1-prune" / "model.pt2")
    shared = _pt2_weights(out / "steps" / "2-cluster" / "model.pt2")
    for name in CLUSTERED:
        assert _distinct(shared[name]) == 8, name
        assert torch.equal(shared[name] == 0, pruned[name] == 0), f"{name}: zeros moved"
        assert report["steps"][2]["details"]["clustered_layers"][name]["zero_pinned"]


def test_clustered_onnx_with_uint8_indices_runs_and_matches_dense_storage(digits, tmp_path):
    base = {"model": {"path": str(digits / "digits_cnn.onnx")}}
    outputs = {}
    for storage in ("dense", "indices"):
        recipe = digits_recipe(
            digits, [{"type": "cluster", "clusters": 16, "storage": storage, "exclude": []}], report=FAST
        )
        recipe["model"] = base["model"]
        folder = tmp_path / storage
        folder.mkdir()
        out, report = _run(folder, recipe)
        proto = onnx.load(str(out / "model.onnx"))
        x = np.load(digits / "digits_test.npz")["x"][:64]
        outputs[storage] = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(
            None, {"x": x}
        )[0]
        step = report["steps"][1]
        if storage == "indices":
            inits = {t.name: t for t in proto.graph.initializer}
            indices = [t for t in inits.values() if t.name.endswith(".indices")]
            assert len(indices) == len(step["details"]["clustered_layers"]) > 0
            assert all(t.data_type == onnx.TensorProto.UINT8 for t in indices)
            assert sum(n.op_type == "Gather" for n in proto.graph.node) == len(indices)
            assert step["size_bytes"] < 0.4 * report["steps"][0]["size_bytes"]
            assert set(step["details"]["session_create_ms"]) == {"dense_input", "indices"}
    np.testing.assert_allclose(outputs["indices"], outputs["dense"], rtol=1e-5, atol=1e-5)


def test_cluster_refuses_impossible_orders_at_load(digits, tmp_path):
    cases = [
        ([{"type": "cluster"}, {"type": "prune"}], "prune first"),
        ([{"type": "cluster", "storage": "indices"}], "after the export pass"),
        ([{"type": "cluster", "clusters": 16, "bits": 3}], "not both"),
        ([{"type": "cluster", "layers": {"nope.*": 8}}], "matches no clusterable layer"),
    ]
    for i, (passes, words) in enumerate(cases):
        result = run_cli("validate", write_recipe(tmp_path, digits_recipe(digits, passes), f"r{i}.yaml"))
        assert result.exit_code == 2, (passes, result.stderr)
        assert words in result.stderr and "Traceback" not in result.stderr, result.stderr


class _Tapped(torch.nn.Module):
    """conv1's raw output also feeds the sum, so its BatchNorm cannot be folded in; conv2 -> bn2 can."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
        self.conv2, self.bn2 = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        a = self.conv1(x)
        y = self.bn2(self.conv2(torch.relu(self.bn1(a)))) + a
        return self.head(y.mean((2, 3)))


def test_batchnorm_is_folded_only_where_the_conv_feeds_it_alone_and_outputs_stay():
    from optcli.model import InputSpec
    from optcli.passes.cluster.fold import find_pairs, fold

    torch.manual_seed(0)
    model = _Tapped().eval()
    for bn in (model.bn1, model.bn2):  # statistics far from the identity, so a wrong fold shows
        (
            bn.running_mean.uniform_(-1, 1),
            bn.running_var.uniform_(0.3, 3),
            bn.weight.data.normal_(),
            bn.bias.data.normal_(),
        )
    x = torch.randn(5, 1, 6, 6)
    expected = model(x)
    pairs = find_pairs(model, [InputSpec("x", (1, 1, 6, 6), "float32")])
    assert pairs.pairs == {"conv2": "bn2"} and not pairs.reason
    fold(model, "conv2", "bn2")
    assert isinstance(model.bn2, torch.nn.Identity) and isinstance(model.bn1, torch.nn.BatchNorm2d)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_pruned_clustered_finetuned_int8_is_gated_on_accuracy_not_on_the_cosine_to_the_original(digits, tmp_path):
    passes = [
        {"type": "prune", "sparsity": 0.5},
        {"type": "cluster", "clusters": 16},
        {"type": "finetune", "epochs": 1, "lr": 0.003},
        {"type": "export"},
        {"type": "quantize", "mode": "static", "per_channel": True},
    ]
    recipe = digits_recipe(digits, passes, report=FAST)
    recipe["data"]["train"] = {"path": str(digits / "digits_train.npz"), "labels": "y", "batch_size": 64}
    out = tmp_path / "out"
    result = run_cli("run", write_recipe(tmp_path, recipe), "-o", out, "--json", "--quiet")
    report = result.json()
    gates = {g["name"]: g for g in report["gates"]}
    # The fine-tune moved the outputs on purpose: the default promise is the eval accuracy within 1 pt.
    assert "min_fidelity_cosine (default)" not in gates
    drop = gates["max_accuracy_drop (default)"]
    first, last = report["steps"][0]["accuracy"]["value"], report["steps"][-1]["accuracy"]["value"]
    assert drop["limit"] == 0.01 and drop["value"] == round(first - last, 6)
    assert result.exit_code == (0 if first - last <= 0.01 else 1), result.stderr
    int8 = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out / "model.onnx")).graph.initializer}
    assert any(a.dtype == np.int8 for a in int8.values())
