"""Decoder LLMs: a causal-LM folder -> an onnxruntime-genai decoder (KV cache) with int4 weights, measured the way
LLM users measure (sliding-window perplexity, time to first token, decode tokens/s, greedy agreement, peak RSS).
Tiny decoders of the real architectures are built in the tests (tests/llm_models.py)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import yaml
from conftest import run_cli, write_recipe
from hf_models import tiny_gpt2
from llm_models import corpus, tiny_decoder

SMALL = {"context": 64, "stride": 32, "prompt_tokens": 16, "new_tokens": 16, "prompts": 2, "rounds": 2}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm")
    tiny_decoder(root / "llama", "llama")
    corpus(root / "text.txt")
    return root


def _recipe(root, folder, passes=({"type": "decoder", "precision": "int4"},), **llm):
    return {
        "model": {"path": str(folder)},
        "data": {"eval": {"text": str(root / "text.txt")}},
        "passes": list(passes),
        "report": {"llm": {**SMALL, **llm}},
        "gates": {"max_perplexity_increase": 0.5},
    }


def _sliding_perplexity_with_transformers(folder, text_path, context, stride) -> float:
    """transformers' own recipe (huggingface.co/docs/transformers/perplexity), computed here independently."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    ids = torch.tensor(tok(text_path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
    total, count, previous = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        window = ids[begin:end]
        labels = window.clone()
        labels[: -(end - previous)] = -100
        with torch.no_grad():
            loss = model(window[None], labels=labels[None]).loss
        scored = int((labels[1:] != -100).sum())
        total += float(loss) * scored
        count += scored
        previous = end
        if end == len(ids):
            break
    return math.exp(total / count)


def test_init_writes_an_int4_llm_recipe_and_run_reports_perplexity_speed_and_memory_per_step(llama, tmp_path):
    recipe_path = tmp_path / "recipe.yaml"
    result = run_cli("init", llama / "llama", "--data", llama / "text.txt", "-o", recipe_path)
    assert result.exit_code == 0, result.stderr
    recipe = yaml.safe_load(recipe_path.read_text())
    assert recipe["passes"] == [{"type": "decoder", "precision": "int4", "block_size": 32}]
    assert (recipe_path.parent / recipe["data"]["eval"]["text"]).resolve() == (llama / "text.txt").resolve()
    recipe["report"]["llm"] = SMALL  # the tiny model's context is 128: a smaller window keeps the test quick
    recipe_path.write_text(yaml.safe_dump(recipe))

    result = run_cli("run", recipe_path, "-o", tmp_path / "out", "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    report = result.json()
    original, final = report["steps"]
    assert [original["name"], final["name"]] == ["original", "1-decoder"]

    # The reference is the fp32 decoder, checked against transformers: prefill and 8 decode steps through the cache.
    check = original["details"]["logits_check"]
    assert check["passed"] and check["steps"] == 8 and check["relative_error"] <= check["tolerance"]
    expected = _sliding_perplexity_with_transformers(llama / "llama", llama / "text.txt", 64, 32)
    assert original["accuracy"] == {"metric": "perplexity", "value": pytest.approx(expected, rel=1e-4)}

    # int4 weights: MatMulNBits, a fraction of the fp32 bytes, perplexity measured the same way.
    assert final["details"]["export"]["precision"] == "int4"
    assert final["size_bytes"] < 0.5 * original["size_bytes"]
    assert final["accuracy"]["metric"] == "perplexity" and final["accuracy"]["value"] > 1
    for step in (original, final):
        gen = step["details"]["generation"]
        assert gen["ttft_ms"] > 0 and gen["decode_tokens_per_s"] > 0
        assert gen["peak_rss_bytes"] > 10 << 20 and step["details"]["export"]["peak_rss_bytes"] > 10 << 20
    assert 0 <= final["details"]["generation"]["greedy_agreement"] <= 1
    speed = report["generation"]["decode_speedup"]
    assert speed["interval"][0] <= speed["value"] <= speed["interval"][1]
    assert report["summary"]["verdict"] == report["generation"]["verdict"]
    assert "perplexity" in report["generation"]["verdict"]

    # The output folder runs in onnxruntime-genai as it is, and greedy decoding there matches plain ONNX Runtime.
    import onnxruntime_genai as og

    from optcli.llm.decoder import Decoder

    out = tmp_path / "out" / "decoder"
    model = og.Model(str(out))
    prompt = og.Tokenizer(model).encode("the dog sat on the mat")
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 8, min_length=len(prompt) + 8, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    decoder, past, ids, expected_tokens = Decoder(out), None, np.asarray(prompt), []
    for _ in range(8):
        logits, past = decoder(ids, past)
        ids = np.asarray([int(logits[0, -1].argmax())])
        expected_tokens.append(int(ids[0]))
    assert tokens == expected_tokens

    assert "## Generation" in (tmp_path / "out" / "report.md").read_text()
    assert "<h2>Generation</h2>" in (tmp_path / "out" / "report.html").read_text()
    # The terminal view, from the finished steps (--resume: nothing is exported again).
    result = run_cli("run", recipe_path, "-o", tmp_path / "out", "--resume")
    assert result.exit_code == 0, result.stderr
    assert "decode tok/s" in result.stdout and "TTFT ms" in result.stdout and "generate RSS" in result.stdout
    assert json.loads((tmp_path / "out" / "report.json").read_text())["reused_steps"] == {
        "original": "resume",
        "1-decoder": "resume",
    }


def _refused(tmp_path, recipe) -> str:
    result = run_cli("run", write_recipe(tmp_path, recipe), "-o", tmp_path / "out")
    assert result.exit_code == 2, result.stderr
    assert not (tmp_path / "out").exists()
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    return lines[0]


def test_an_architecture_the_builder_cannot_export_is_refused_naming_it(llama, tmp_path):
    tiny_gpt2(tmp_path / "gpt2")
    said = _refused(tmp_path, _recipe(llama, tmp_path / "gpt2"))
    assert "GPT2LMHeadModel" in said and "LlamaForCausalLM" in said
    # init keeps writing the one-pass recipe (export + int8, perplexity) for it
    result = run_cli("init", tmp_path / "gpt2")
    assert result.exit_code == 0, result.stderr
    assert [p["type"] for p in yaml.safe_load(result.stdout)["passes"]] == ["export", "quantize"]


def test_a_folder_without_a_tokenizer_is_refused(llama, tmp_path):
    folder = tmp_path / "bare"
    shutil.copytree(llama / "llama", folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    assert "no tokenizer" in _refused(tmp_path, _recipe(llama, folder))


def test_a_text_shorter_than_one_perplexity_window_is_refused(llama, tmp_path):
    recipe = _recipe(llama, llama / "llama")
    (tmp_path / "short.txt").write_text("the dog sat on the mat\n")
    recipe["data"]["eval"]["text"] = str(tmp_path / "short.txt")
    said = _refused(tmp_path, recipe)
    assert "shorter than one perplexity window of 65" in said


def test_a_model_larger_than_memory_is_refused_before_loading(llama, tmp_path, monkeypatch):
    import optcli.llm.memory as memory

    monkeypatch.setattr(memory, "available_memory", lambda: 100 << 20)  # 100 MB free
    said = _refused(tmp_path, _recipe(llama, llama / "llama"))
    assert "GB to export" in said and "0.1 GB available" in said


def test_perplexity_windows_score_every_token_but_the_first_exactly_once():
    from optcli.llm.perplexity import windows

    for n, context, stride in [(100, 64, 32), (64, 64, 64), (65, 64, 16), (1000, 128, 100)]:
        scored = []
        for begin, end, count in windows(n, context, stride):
            assert end - begin <= context and count <= end - begin
            scored += list(range(end - count, end))
        assert scored == list(range(1, n))


def test_greedy_agreement_is_the_share_of_identical_positions_in_the_first_32_tokens():
    from optcli.llm.generate import greedy_agreement

    reference = [list(range(40)), list(range(40))]
    changed = [list(range(40)), [*range(16), *[-1] * 24]]
    assert greedy_agreement(reference, changed) == pytest.approx((32 + 16) / 64)


@pytest.mark.parametrize(
    "arch",
    ["qwen2", *(pytest.param(a, marks=pytest.mark.slow) for a in ("qwen3", "mistral", "phi3"))],
)
def test_decoder_logits_match_transformers_in_prefill_and_eight_decode_steps(arch, tmp_path):
    """Llama is checked by the CLI test above (the reference step checks its own export); the others here."""
    from optcli.llm.check import check_logits
    from optcli.llm.export import export_decoder

    tiny_decoder(tmp_path / "hf", arch)
    done = export_decoder(tmp_path / "hf", tmp_path / "fp32")
    assert done["precision"] == "fp32" and (tmp_path / "fp32" / "genai_config.json").is_file()
    assert not (tmp_path / "fp32" / ".builder-cache").exists()
    check = check_logits(tmp_path / "hf", tmp_path / "fp32", [5, 17, 33, 80, 2, 9, 100, 4])
    assert check["steps"] == 8
    assert check["relative_error"] <= check["tolerance"], check
