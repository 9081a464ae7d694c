"""Third-party models' traits (issue 22): weights inside If / Loop bodies, wrapped training checkpoints, TorchScript
saved as .jit, models that are int8 already, passes with nothing to do. Each is a small model built here and run
through the CLI the way a user would (init -> validate -> run -> inspect), checked against counts made here.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from conftest import allow_slower, run_cli
from onnx import TensorProto, helper, numpy_helper

LATENCY = {"batch_sizes": [1], "warmup": 1, "runs": 2, "threads": 1}
WIDTH = 64


# --------------------------------------------------------------------------- graphs with weights in branches


def _branch(name: str, weight: str, inits: list) -> onnx.GraphProto:
    nodes = [
        helper.make_node("MatMul", ["x", weight], [f"{name}_mm"], name=f"{name}_matmul"),
        helper.make_node("Relu", [f"{name}_mm"], [f"{name}_out"], name=f"{name}_relu"),
    ]
    out = [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)]
    return helper.make_graph(nodes, name, [], out, inits)


def _weight(name: str, seed: int, shape=(WIDTH, WIDTH)) -> onnx.TensorProto:
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.1, name)


def branchy(outer_weight: bool = True) -> onnx.ModelProto:
    """y = If(sum(x) > 0, relu(x @ W_then), relu(x @ W_else)), then a Loop of 2 turns of relu(v @ W_loop).
    W_then and W_loop are initializers of their bodies; W_else an outer initializer used only inside the branch
    (or, with outer_weight=False, one of the else body too): the top-level graph holds no weight at all."""
    then_branch = _branch("then", "w_then", [_weight("w_then", 1)])
    else_inits = [] if outer_weight else [_weight("w_else", 2)]
    else_branch = _branch("else", "w_else", else_inits)
    loop_body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["v_in", "w_loop"], ["v_mm"], name="loop_matmul"),
            helper.make_node("Relu", ["v_mm"], ["v_out"], name="loop_relu"),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None),
        ],
        [_weight("w_loop", 3)],
    )
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum"),
        helper.make_node("Greater", ["s", "zero"], ["c"], name="positive"),
        helper.make_node("If", ["c"], ["branch"], then_branch=then_branch, else_branch=else_branch, name="if"),
        helper.make_node("Loop", ["turns", "", "branch"], ["y"], body=loop_body, name="loop"),
    ]
    inits = [numpy_helper.from_array(np.array(0, np.float32), "zero"), numpy_helper.from_array(np.array(2), "turns")]
    if outer_weight:
        inits.append(_weight("w_else", 2))
    graph = helper.make_graph(
        nodes,
        "branchy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", WIDTH])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _graphs(graph: onnx.GraphProto):
    """The graph and every body nested in it, walked here independently of optcli."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for g in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                yield from _graphs(g)


def _weights(path: Path) -> int:
    """Elements of every float initializer above one element, wherever it lives."""
    proto = onnx.load(str(path))
    return sum(
        int(np.prod(t.dims))
        for g in _graphs(proto.graph)
        for t in g.initializer
        if t.data_type == TensorProto.FLOAT and np.prod(t.dims) > 1
    )


def _ops(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for g in _graphs(onnx.load(str(path)).graph):
        for n in g.node:
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def _recipe(tmp_path: Path, model: Path, passes: list[dict], spec: dict | None = None, **extra) -> Path:
    body = {
        "model": spec or {"path": str(model)},
        "passes": allow_slower(passes),  # about where the weights are, not speed: tiny int8 graphs run slower
        "report": {"latency": LATENCY, "fidelity_samples": 4},
    }
    body.update(extra)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def _run(recipe: Path, out: Path):
    result = run_cli("run", recipe, "-o", out, "-q")
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else None
    return result, report


def _calibration(tmp_path: Path, n: int = 16) -> Path:
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.random.default_rng(5).standard_normal((n, WIDTH)).astype(np.float32))
    return path


@pytest.mark.parametrize("outer_weight", [False, True], ids=["weights-in-bodies", "outer-weight-used-in-branch"])
def test_inspect_counts_the_weights_inside_if_and_loop_bodies(tmp_path, outer_weight):
    model = tmp_path / "branchy.onnx"
    onnx.save(branchy(outer_weight), str(model))
    result = run_cli("inspect", model, "--json")
    assert result.exit_code == 0, result.stderr
    info = result.json()
    assert info["parameters"] == _weights(model) == 3 * WIDTH * WIDTH
    assert info["ops"]["MatMul"] == 3  # the ops the branches run, not only the top level's If / Loop
    assert info["summary"] == "fp32 weights"


def test_dynamic_int8_quantizes_the_matmuls_inside_if_and_loop_bodies(tmp_path):
    model = tmp_path / "branchy.onnx"
    onnx.save(branchy(outer_weight=True), str(model))
    recipe = _recipe(tmp_path, model, [{"type": "quantize", "mode": "dynamic"}])
    assert run_cli("validate", recipe).exit_code == 0
    result, report = _run(recipe, tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    final = tmp_path / "out" / "model.onnx"
    ops = _ops(final)
    assert ops.get("MatMulInteger") == 3 and "MatMul" not in ops, ops  # every branch's MatMul, none left float
    assert not any("nothing to quantize" in w for w in report["warnings"]), report["warnings"]
    step = report["steps"][-1]
    assert step["details"]["quantized_ops"]["MatMulInteger"] == 3
    assert report["steps"][0]["parameters"] == _weights(model)
    assert step["parameters"] == _weights(model)  # the int8 weights counted as weights, inside the bodies too
    assert final.stat().st_size < 0.5 * model.stat().st_size
    assert step["fidelity"]["cosine_mean"] > 0.99
    assert run_cli("inspect", final, "--json").json()["summary"].startswith("dynamic int8: ")


def test_dynamic_int8_keeps_going_when_the_quantizer_breaks_inside_a_branch(tmp_path, monkeypatch):
    from optcli.passes.quantize import ort

    real = ort.quantize_onnx

    def breaks_in_bodies(source, target, settings, config, *rest):
        if config.extra_options.get("EnableSubgraph"):
            raise RuntimeError("Expected w_then to be an initializer")  # what a subgraph bug in ORT looks like
        return real(source, target, settings, config, *rest)

    monkeypatch.setattr(ort, "quantize_onnx", breaks_in_bodies)
    model = tmp_path / "branchy.onnx"
    onnx.save(branchy(outer_weight=False), str(model))
    result, report = _run(_recipe(tmp_path, model, [{"type": "quantize", "mode": "dynamic"}]), tmp_path / "out")
    assert result.exit_code in (0, 1), result.stderr  # a gate may fail on the bodies left float; the pass does not
    assert any("failed in ONNX Runtime's quantizer (RuntimeError: Expected w_then" in w for w in report["warnings"])
    assert any("3 weight tensor(s)" in w and "stayed float" in w for w in report["warnings"]), report["warnings"]


def test_static_int8_says_how_many_branch_weights_stayed_float(tmp_path):
    model = tmp_path / "branchy.onnx"
    onnx.save(branchy(outer_weight=False), str(model))
    recipe = _recipe(
        tmp_path,
        model,
        [{"type": "quantize", "mode": "static"}],
        data={"calibration": {"path": str(_calibration(tmp_path))}},
    )
    result, report = _run(recipe, tmp_path / "out")
    assert result.exit_code in (0, 1), result.stderr
    assert "MatMulInteger" not in _ops(tmp_path / "out" / "model.onnx")
    said = [w for w in report["warnings"] if "inside If/Loop/Scan bodies stayed float" in w]
    assert len(said) == 1, report["warnings"]
    assert f"3 weight tensor(s) ({3 * WIDTH * WIDTH * 4:,} bytes)" in said[0]
    assert "mode: dynamic quantizes them" in said[0]
    assert report["steps"][-1]["details"]["float_weights_in_subgraphs"] == {
        "tensors": 3,
        "bytes": 3 * WIDTH * WIDTH * 4,
    }


def test_int4_quantizes_the_matmuls_inside_branches_without_a_false_nothing_warning(tmp_path):
    model = tmp_path / "branchy.onnx"
    onnx.save(branchy(outer_weight=False), str(model))
    recipe = _recipe(tmp_path, model, [{"type": "quantize", "weights": "int4", "block_size": 32}])
    result, report = _run(recipe, tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert _ops(tmp_path / "out" / "model.onnx").get("MatMulNBits") == 3
    assert not any("nothing" in w for w in report["warnings"]), report["warnings"]
    assert report["steps"][-1]["details"]["weight_only"]["quantized_ops"]["MatMulNBits"] == 3


# --------------------------------------------------------------------------- passes with nothing to do


def _gemm_only(path: Path) -> Path:
    """A Linear layer as most exporters write it: Gemm, which MatMulNBits does not take."""
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1, name="fc")],
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])],
        [_weight("w", 7, (32, WIDTH)), _weight("b", 8, (32,))],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_int4_on_a_graph_without_matmul_says_so_and_keeps_the_input_bytes(tmp_path):
    model = _gemm_only(tmp_path / "linear.onnx")
    recipe = _recipe(tmp_path, model, [{"type": "quantize", "weights": "int4"}])
    result, report = _run(recipe, tmp_path / "out")
    assert result.exit_code == 0, result.stderr  # the default size gate is not failed by a no-op
    assert any(
        "nothing to quantize: no MatMul/Gather node with a constant weight was found" in w for w in report["warnings"]
    ), report["warnings"]
    final = tmp_path / "out" / "model.onnx"
    assert final.read_bytes() == model.read_bytes()  # no opset-21 copy with added bytes
    size_gate = next(g for g in report["gates"] if g["name"].startswith("max_size_ratio"))
    assert size_gate["passed"] and size_gate["value"] <= 1.0


def test_a_run_whose_passes_all_skip_still_writes_model_onnx(tmp_path):
    # A graph too small to quantize: the quantize step keeps the user's file, named theirs.
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
    )
    model = tmp_path / "tiny_classifier.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    result, report = _run(_recipe(tmp_path, model, [{"type": "quantize", "mode": "dynamic"}]), tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert report["output"]["path"] == str(tmp_path / "out" / "model.onnx")
    assert (tmp_path / "out" / "model.onnx").read_bytes() == model.read_bytes()
    assert not (tmp_path / "out" / model.name).exists()


def test_dynamic_int8_does_not_claim_it_used_calibration_samples(tmp_path):
    model = tmp_path / "branchy.onnx"
    onnx.save(branchy(), str(model))
    calib = {"calibration": {"path": str(_calibration(tmp_path, n=8))}}
    for mode in ("dynamic", "static"):
        recipe = _recipe(tmp_path, model, [{"type": "quantize", "mode": mode}], data=calib)
        result, report = _run(recipe, tmp_path / f"out_{mode}")
        assert result.exit_code in (0, 1), result.stderr
        noted = [w for w in report["warnings"] if "samples requested" in w]
        # static calibrates on them (8 of the 128 asked for are there); dynamic measures ranges at run time
        assert noted == [] if mode == "dynamic" else len(noted) == 1 and "8 used" in noted[0], report["warnings"]


# --------------------------------------------------------------------------- torch checkpoints


class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(WIDTH, 48)
        self.fc2 = torch.nn.Linear(48, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def build_mlp() -> Mlp:
    return Mlp()


FACTORY = "test_weights_everywhere:build_mlp"
MLP_PARAMS = WIDTH * 48 + 48 + 48 * 10 + 10


def _model_spec(path: Path, **extra) -> dict:
    return {"path": str(path), "factory": FACTORY, "inputs": [{"name": "x", "shape": [1, WIDTH]}], **extra}


@pytest.mark.parametrize("key", ["model_state", "net_weights"])
def test_a_training_checkpoint_is_unwrapped_for_inspect_and_run(tmp_path, key):
    torch.manual_seed(0)
    state = build_mlp().state_dict()
    model = tmp_path / "checkpoint.pt"
    torch.save({key: state, "epoch": 3, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}}, model)
    expected = sum(t.numel() for t in state.values())
    info = run_cli("inspect", model, "--json")
    assert info.exit_code == 0, info.stderr
    assert info.json()["parameters"] == expected == MLP_PARAMS
    recipe = _recipe(tmp_path, model, [], spec=_model_spec(model))
    assert run_cli("validate", recipe).exit_code == 0
    result, report = _run(recipe, tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert report["steps"][0]["parameters"] == expected


def test_state_dict_key_picks_one_of_two_state_dicts(tmp_path):
    torch.manual_seed(0)
    model_sd, ema_sd = build_mlp().state_dict(), build_mlp().state_dict()
    path = tmp_path / "ema.pt"
    torch.save({"weights": model_sd, "ema_weights": ema_sd, "epoch": 3}, path)
    info = run_cli("inspect", path, "--json").json()
    assert info["state_dicts"] == {"weights": MLP_PARAMS, "ema_weights": MLP_PARAMS}
    assert info["parameters"] == 2 * MLP_PARAMS
    result, _ = _run(_recipe(tmp_path, path, [], spec=_model_spec(path)), tmp_path / "out")
    assert result.exit_code == 2
    assert "model.state_dict_key" in result.stderr and "factory_kwargs" not in result.stderr, result.stderr
    recipe = _recipe(tmp_path, path, [], spec=_model_spec(path, state_dict_key="ema_weights"))
    result, report = _run(recipe, tmp_path / "out2")
    assert result.exit_code == 0, result.stderr
    assert report["steps"][0]["parameters"] == MLP_PARAMS


def test_strict_false_loads_a_checkpoint_with_training_only_keys_and_lists_them(tmp_path):
    state = build_mlp().state_dict()
    state["aux_head.weight"] = torch.zeros(5, 48)  # a training-only head the deployed module does not have
    path = tmp_path / "trained.pt"
    torch.save(state, path)
    refused, _ = _run(_recipe(tmp_path, path, [], spec=_model_spec(path)), tmp_path / "out")
    assert refused.exit_code == 2
    assert "model.strict: false" in refused.stderr and "factory_kwargs" not in refused.stderr, refused.stderr
    recipe = _recipe(tmp_path, path, [], spec=_model_spec(path, strict=False))
    assert run_cli("validate", recipe).exit_code == 0
    result, report = _run(recipe, tmp_path / "out2")
    assert result.exit_code == 0, result.stderr
    said = [w for w in report["warnings"] if "aux_head.weight" in w]
    assert len(said) == 1 and "ignored" in said[0], report["warnings"]
    assert report["steps"][0]["parameters"] == MLP_PARAMS


def test_a_jit_torchscript_file_goes_through_init_validate_and_run(tmp_path):
    torch.manual_seed(0)
    module = build_mlp().eval()
    model = tmp_path / "mlp.jit"
    torch.jit.save(torch.jit.trace(module, torch.zeros(1, WIDTH)), str(model))
    assert run_cli("inspect", model, "--json").json()["parameters"] == MLP_PARAMS
    init = run_cli("init", model, "--shape", f"x=1x{WIDTH}")
    assert init.exit_code == 0, init.stderr
    recipe = tmp_path / "recipe.yaml"
    body = yaml.safe_load(init.stdout)
    body["report"] = {"latency": LATENCY, "fidelity_samples": 4}
    recipe.write_text(yaml.safe_dump(body))
    validate = run_cli("validate", recipe)
    assert validate.exit_code == 0, validate.stderr
    result, report = _run(recipe, tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert _ops(tmp_path / "out" / "model.onnx").get("MatMulInteger") == 2


def test_an_unknown_model_extension_is_refused_alike_by_every_verb(tmp_path):
    model = tmp_path / "mlp.ckpt"
    torch.save(build_mlp().state_dict(), model)
    recipe = _recipe(tmp_path, model, [], spec=_model_spec(model))
    said = []
    for args in (("inspect", model), ("init", model, "--factory", FACTORY), ("validate", recipe)):
        result = run_cli(*args)
        assert result.exit_code == 2, (args, result.stdout)
        said.append(result.stderr.split("mlp.ckpt", 1)[1].strip())
    assert len(set(said)) == 1 and said[0].startswith("has an unknown extension; use .onnx, .pt/.pth/.jit"), said


# --------------------------------------------------------------------------- models that are int8 already


def test_init_on_an_int8_onnx_model_writes_a_recipe_without_quantize(tmp_path):
    from onnxruntime.quantization import quantize_dynamic

    fp32 = tmp_path / "branchy.onnx"
    onnx.save(branchy(), str(fp32))
    int8 = tmp_path / "branchy_int8.onnx"
    quantize_dynamic(str(fp32), str(int8), extra_options={"EnableSubgraph": True})
    assert _ops(int8).get("MatMulInteger") == 3  # the int8 ops sit inside the If / Loop bodies
    init = run_cli("init", int8)
    assert init.exit_code == 0, init.stderr
    assert "int8 already" in init.stdout and "MatMulInteger" in init.stdout
    body = yaml.safe_load(init.stdout)
    assert not any(p["type"] == "quantize" for p in body["passes"])
    recipe = tmp_path / "recipe.yaml"
    body["report"] = {"latency": LATENCY, "fidelity_samples": 4}
    recipe.write_text(yaml.safe_dump(body))
    assert run_cli("validate", recipe).exit_code == 0
    result, report = _run(recipe, tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "out" / "model.onnx").read_bytes() == int8.read_bytes()
    # and `run` still refuses a quantize step on it, inside branches too
    body["passes"] = [{"type": "quantize", "mode": "dynamic"}]
    recipe.write_text(yaml.safe_dump(body))
    refused = run_cli("validate", recipe)
    assert refused.exit_code == 2 and "a second time" in refused.stderr


def test_init_on_an_int8_torchscript_module_writes_a_recipe_without_quantize(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int8 = torch.ao.quantization.quantize_dynamic(build_mlp().eval(), {torch.nn.Linear}, dtype=torch.qint8)
        model = tmp_path / "mlp_int8.pt"
        torch.jit.save(torch.jit.trace(int8, torch.zeros(1, WIDTH)), str(model))
    init = run_cli("init", model, "--shape", f"x=1x{WIDTH}")
    assert init.exit_code == 0, init.stderr
    assert "int8 already" in init.stdout and "quantized::" in init.stdout
    assert yaml.safe_load(init.stdout)["passes"] == []


# --------------------------------------------------------------------------- library warnings


class Warns(torch.nn.Module):
    """Warns on every forward, as torch's exporters do about an op, in one long line."""

    TEXT = (
        "The operator aten::frobnicate is exported as a combination of Reshape, Transpose and Gather operators; "
        "if the indices include negative values the exported graph produces incorrect results without any error. "
        "Consider rewriting the indexing with torch.gather, or use the dynamo-based exporter, which handles this "
        "case correctly and records the original stack trace for every node it emits in the graph"
    )

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(WIDTH, 10)

    def forward(self, x):
        warnings.warn(self.TEXT, UserWarning, stacklevel=2)
        return self.fc(x)


def build_warns() -> Warns:
    return Warns()


def test_a_long_library_warning_reaches_the_report_in_whole_words(tmp_path):
    model = tmp_path / "warns.pt"
    torch.save(build_warns().state_dict(), model)
    spec = _model_spec(model, factory="test_weights_everywhere:build_warns")
    result, report = _run(_recipe(tmp_path, model, [{"type": "export"}], spec=spec), tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    said = [w for w in report["warnings"] if "aten::frobnicate" in w]
    assert len(said) == 1, report["warnings"]
    text = said[0].removeprefix("1-export: ")
    assert text.endswith("…") and len(text) <= 302
    assert Warns.TEXT.startswith(text.removesuffix("…").rstrip())  # a prefix of the message...
    assert Warns.TEXT[len(text.removesuffix("…").rstrip())] in " ."  # ...cut between words, not inside one
