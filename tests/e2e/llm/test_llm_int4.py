"""int4 for decoders beyond the builder's round-to-nearest: ONNX Runtime's RTN, HQQ, GPTQ (calibrated on the text),
optcli's AWQ and k-quant on the fp32 decoder, a decoder's lm_head / embeddings in their own precision, the mixed int4/int8 search
with a perplexity target, dynamic int8. A tiny Qwen2 decoder is built and exported once (tests/llm_models.py)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from conftest import run_cli, write_recipe
from llm_models import corpus, tiny_decoder

from optcli.passes.quantize.weight_mix import fewest_promoted, promotion_order

SMALL = {"context": 64, "stride": 32, "prompt_tokens": 16, "new_tokens": 16, "prompts": 2, "rounds": 2}


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    """A tiny Qwen2 folder, its text, and its fp32 decoder written by onnxruntime-genai's builder."""
    from optcli.llm.export import export_decoder
    from optcli.llm.perplexity import text_tokens

    root = tmp_path_factory.mktemp("llm_int4")
    tiny_decoder(root / "qwen2", "qwen2")
    corpus(root / "text.txt")
    export_decoder(root / "qwen2", root / "fp32", "fp32")
    tokens = text_tokens(root / "qwen2", root / "text.txt")
    return SimpleNamespace(root=root, folder=root / "qwen2", fp32=root / "fp32", tokens=tokens)


def _quantize(qwen2, tmp_path, details: dict | None = None, **settings) -> Path:
    """The quantize pass on the fp32 decoder folder, as the LLM run calls it (its data: the eval text's tokens)."""
    from optcli.llm.config import LlmReport
    from optcli.model import Model
    from optcli.passes.base import Context
    from optcli.passes.quantize import apply
    from optcli.passes.quantize.config import Config

    recipe = SimpleNamespace(
        data=SimpleNamespace(eval=SimpleNamespace(text=qwen2.root / "text.txt"), calibration=None),
        report=SimpleNamespace(llm=LlmReport(**SMALL), target="cpu", latency=SimpleNamespace(threads=1)),
        passes=[],
    )
    ctx = Context(
        recipe=recipe,
        step_name="2-quantize",
        step_dir=tmp_path,
        reference=None,
        data=SimpleNamespace(tokens=qwen2.tokens),
        log=lambda message: None,
    )
    model = Model(format="genai", inputs=[], path=qwen2.fp32)
    out = Path(apply(model, Config(**settings), ctx).path)
    if details is not None:
        details.update(ctx.details)
    return out


def _nodes(folder: Path) -> list:
    return list(onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node)


def _bits(node) -> int:
    return next((a.i for a in node.attribute if a.name == "bits"), 4)


def _perplexity(folder: Path, tokens) -> float:
    from optcli.llm.perplexity import perplexity

    return perplexity(folder, tokens, SMALL["context"], SMALL["stride"], threads=1)


@pytest.mark.parametrize("algorithm", ["rtn", "hqq", "gptq", "awq", "k_quant"])
def test_each_int4_algorithm_writes_matmulnbits_weights_and_a_decoder_that_runs(qwen2, tmp_path, algorithm):
    out = _quantize(qwen2, tmp_path, weights="int4", algorithm=algorithm, block_size=32)
    matmuls = [n for n in _nodes(qwen2.fp32) if n.op_type == "MatMul"]
    written = [n for n in _nodes(out) if n.op_type == "MatMulNBits"]
    assert len(written) == len(matmuls)
    eight = [n.name for n in written if _bits(n) != 4]
    assert len(eight) == 1 and "lm_head" in eight[0] and all(_bits(n) in (4, 8) for n in written)  # the default
    assert not [n for n in _nodes(out) if n.op_type == "MatMul"]
    assert not [n for n in _nodes(out) if n.op_type == "GatherBlockQuantized"]  # embeddings float by default
    assert all(next(a.i for a in n.attribute if a.name == "accuracy_level") == 4 for n in written)
    assert (out / "genai_config.json").is_file() and (out / "tokenizer.json").is_file()
    before, after = _perplexity(qwen2.fp32, qwen2.tokens), _perplexity(out, qwen2.tokens)
    assert np.isfinite(after) and abs(after / before - 1) < 0.1  # int4 moves a decoder's perplexity, a little


def test_awq_scales_every_foldable_group_of_the_decoder_and_says_why_o_proj_is_left_alone(qwen2, tmp_path):
    details: dict = {}
    _quantize(qwen2, tmp_path, details, weights="int4", algorithm="awq", lm_head="int4", block_size=32)
    record = details["weight_only"]["awq"]
    scaled = {m for g in record["groups"] for m in g["matmuls"]}
    matmuls = {n.name for n in _nodes(qwen2.fp32) if n.op_type == "MatMul"}
    o_proj = {n for n in matmuls if "o_proj" in n}
    assert scaled == matmuls - o_proj  # qkv, gate+up, down (into up_proj's columns), and the untied lm_head
    assert all("GroupQueryAttention" in record["skipped"][n] for n in o_proj)
    assert all(g["error_awq"] <= g["error_rtn"] for g in record["groups"])
    assert any(g["alpha"] is not None and g["error_awq"] < g["error_rtn"] for g in record["groups"])
    down = [g for g in record["groups"] if g["fold"].startswith("columns of") and "down_proj" in g["matmuls"][0]]
    assert len(down) == len([n for n in matmuls if "down_proj" in n])
    assert not any(g["clip"] for g in record["groups"] if "qkv" in g["matmuls"][0])  # q and k are never clipped


def test_lm_head_and_embeddings_take_the_precision_the_recipe_gives_them(qwen2, tmp_path):
    out = _quantize(qwen2, tmp_path / "a", weights="int4", lm_head="int8", embeddings="int4", block_size=32)
    head = [n for n in _nodes(out) if n.op_type == "MatMulNBits" and "lm_head" in n.name]
    assert len(head) == 1 and _bits(head[0]) == 8
    assert [n for n in _nodes(out) if n.op_type == "GatherBlockQuantized"]
    out = _quantize(qwen2, tmp_path / "b", weights="int4", algorithm="gptq", lm_head="fp32", embeddings="fp32")
    assert [n.name for n in _nodes(out) if n.op_type == "MatMul"] == ["/lm_head/MatMul"]
    assert not [n for n in _nodes(out) if n.op_type == "GatherBlockQuantized"]


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """A tiny Qwen2 whose lm_head shares the embedding table, exported fp32 by the builder (Gather(Transpose(W)))."""
    from optcli.llm.export import export_decoder
    from optcli.llm.perplexity import text_tokens

    root = tmp_path_factory.mktemp("llm_tied")
    tiny_decoder(root / "qwen2", "qwen2", tied=True)
    corpus(root / "text.txt")
    export_decoder(root / "qwen2", root / "fp32", "fp32")
    tokens = text_tokens(root / "qwen2", root / "text.txt")
    return SimpleNamespace(root=root, folder=root / "qwen2", fp32=root / "fp32", tokens=tokens)


def _files_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx"))


@pytest.mark.parametrize(("lm_head", "bits"), [(None, 8), ("int4", 4)])  # None: the decoder default, int8
def test_a_tied_decoder_shares_the_lm_heads_quantized_table_with_its_embeddings(tied, tmp_path, lm_head, bits):
    extra = {"lm_head": lm_head} if lm_head else {}
    shared = _quantize(tied, tmp_path / "shared", weights="int4", block_size=32, **extra)
    floats = _quantize(tied, tmp_path / "float", weights="int4", block_size=32, embeddings="fp32", **extra)
    nodes = _nodes(shared)
    head = next(n for n in nodes if n.op_type == "MatMulNBits" and "lm_head" in n.name)
    (table,) = [n for n in nodes if n.op_type == "GatherBlockQuantized"]
    reshape = next(n for n in nodes if table.input[0] in n.output)
    assert reshape.input[0] == head.input[1] and table.input[2] == head.input[2]  # the lm_head's blocks and scales
    assert _bits(table) == _bits(head) == bits
    assert not [n for n in nodes if n.op_type == "Transpose" and "embed" in n.name]  # gone with the float copy
    # embeddings: fp32 written in the recipe keeps the float table
    assert [n for n in _nodes(floats) if n.op_type == "Gather" and "embed" in n.name]
    assert _files_size(shared) < _files_size(floats)
    before, after = _perplexity(floats, tied.tokens), _perplexity(shared, tied.tokens)
    assert abs(after / before - 1) < 0.05, (before, after)  # the decoder runs in ONNX Runtime, answers kept


def test_dynamic_int8_of_a_decoder_quantizes_its_matmuls_and_keeps_perplexity(qwen2, tmp_path):
    out = _quantize(qwen2, tmp_path, mode="dynamic")
    ops = {n.op_type for n in _nodes(out)}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    before, after = _perplexity(qwen2.fp32, qwen2.tokens), _perplexity(out, qwen2.tokens)
    assert abs(after / before - 1) < 0.05


def test_mixed_search_promotes_the_most_sensitive_layer_first_and_no_more_than_the_target_needs():
    loss = {"q": 0.05, "down": 2.0, "lm_head": 0.6, "up": 0.1}  # perplexity rise with each layer alone at int4
    counts = {"q": 10, "down": 40, "lm_head": 80, "up": 40}
    order = promotion_order(loss, counts, per_weight=False)
    assert order[0] == "down" and order[1] == "lm_head"

    def perplexity(k: int) -> float:  # losses add up: each promoted layer gives its rise back
        return 10.0 + sum(loss[n] for n in order[k:])

    assert fewest_promoted(len(order), lambda k: perplexity(k) <= 10.0 + 1.0) == 1  # down alone in int8 meets it
    assert fewest_promoted(len(order), lambda k: perplexity(k) <= 10.0 + 0.2) == 2
    assert fewest_promoted(len(order), lambda k: perplexity(k) <= 10.0 + 5.0) == 0  # all int4 already meets it
    # By loss per weight (the encoders' size-minded order) the small q layer would come before lm_head.
    assert promotion_order(loss, counts, per_weight=True).index("q") < order.index("q")


def test_perplexity_target_keeps_the_most_sensitive_matmuls_in_int8_and_reports_the_table(qwen2, tmp_path):
    target = {"metric": "perplexity", "max_increase": 1e-8}  # tighter than any all-int4 decoder: int8 layers needed
    passes = [
        {"type": "decoder", "precision": "fp32"},
        {"type": "quantize", "weights": "int4", "block_size": 32, "target": target},
    ]
    recipe = {
        "model": {"path": str(qwen2.folder)},
        "data": {"eval": {"text": str(qwen2.root / "text.txt")}},
        "passes": passes,
        "report": {"llm": {**SMALL, "threads": 1}},
    }
    result = run_cli("run", write_recipe(tmp_path, recipe), "-o", tmp_path / "out", "--json", "--quiet")
    assert result.exit_code in (0, 1), result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    step = report["steps"][-1]
    sensitivity = step["details"]["search"]["sensitivity"]
    kept = step["details"]["weight_only"]["mixed"]["backup_nodes"]
    assert len(sensitivity) == len([n for n in _nodes(qwen2.fp32) if n.op_type == "MatMul"])
    assert kept and kept[0] == max(sensitivity, key=sensitivity.get)
    int8 = {n.name for n in _nodes(tmp_path / "out" / "decoder") if n.op_type == "MatMulNBits" and _bits(n) == 8}
    assert len(int8) == len(kept)


@pytest.mark.parametrize(
    ("quantize", "words"),
    [
        ({"weights": "int8", "algorithm": "awq"}, "awq searches int4 scales only"),
        ({"weights": "int4", "algorithm": "awq", "op_types": ["MatMul", "Gather"]}, "awq quantizes MatMul only"),
        ({"weights": "int4", "algorithm": "gptx"}, "algorithm"),
        ({"weights": "int8", "algorithm": "gptq"}, "int4 only"),
        ({"weights": "int4", "embeddings": "int8"}, "embeddings"),
        ({"mode": "static"}, "static int8 of its activations is not offered"),
        ({"weights": "int4", "target": {"metric": "cosine", "min_value": 0.99}}, "metric: perplexity"),
        ({"weights": "int4", "target": {"metric": "perplexity", "min_value": 10}}, "max_increase (relative)"),
        ({"weights": "int4", "act_order": False}, "act_order is a GPTQ setting"),
    ],
)
def test_decoder_quantize_options_that_cannot_work_are_refused_at_load(qwen2, tmp_path, quantize, words):
    recipe = {
        "model": {"path": str(qwen2.folder)},
        "data": {"eval": {"text": str(qwen2.root / "text.txt")}},
        "passes": [{"type": "decoder", "precision": "fp32"}, {"type": "quantize", **quantize}],
        "report": {"llm": SMALL},
    }
    result = run_cli("validate", write_recipe(tmp_path, recipe))
    assert result.exit_code == 2
    assert words in result.stderr and "Traceback" not in result.stderr
