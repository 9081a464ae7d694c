"""Hugging Face model folders as model.path, with text data: tiny models saved by transformers inside the tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import allow_slower, run_cli, write_recipe
from hf_models import SENTENCES, sentence_transformers_layout, tiny_bert, tiny_gpt2, write_text

LATENCY = {"latency": {"batch_sizes": [4], "warmup": 1, "runs": 3, "threads": 1}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf")
    tiny_bert(root / "bert")
    sentence_transformers_layout(root / "bert", root / "minilm-like")
    tiny_bert(root / "classifier", num_labels=3)
    tiny_gpt2(root / "gpt2")
    write_text(root / "sentences.txt", SENTENCES * 4)
    lines = [json.dumps({"text": t, "label": f"class{i % 3}"}) for i, t in enumerate(SENTENCES * 3)]
    (root / "labelled.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _tokens(folder: Path, texts: list[str], length: int) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(texts, padding="max_length", truncation=True, max_length=length, return_tensors="np")
    return {k: v.astype(np.int64) for k, v in enc.items()}


def _run(tmp_path, recipe: dict, *extra: str):
    return run_cli("run", write_recipe(tmp_path, recipe), "-o", tmp_path / "out", "--json", "--quiet", *extra)


def test_sentence_transformers_folder_exports_int8_with_the_embedding_it_ships(folders, tmp_path):
    recipe = {
        "model": {"path": str(folders / "minilm-like")},
        "data": {
            "calibration": {"text": str(folders / "sentences.txt"), "samples": 32, "max_length": 16},
            "eval": {"text": str(folders / "sentences.txt"), "max_length": 16},
        },
        "passes": allow_slower([{"type": "export"}, {"type": "quantize", "mode": "dynamic", "per_channel": True}]),
        "report": LATENCY,
        "gates": {"min_fidelity_cosine": 0.99},
    }
    result = _run(tmp_path, recipe)
    assert result.exit_code == 0, result.stderr
    report = result.json()
    assert report["input"]["kind"] == "hf BertModel + sentence pooling"
    assert [s["name"] for s in report["steps"]] == ["original", "1-export", "2-quantize"]
    assert report["steps"][-1]["fidelity"]["cosine_mean"] >= 0.99
    assert report["steps"][-1]["fidelity"]["neighbour_top1_agreement"] >= 0.8

    exported = tmp_path / "out" / "steps" / "1-export" / "model.onnx"
    graph = onnx.load(str(exported)).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    for inp in graph.input:  # batch and sequence both free: any length of text runs
        assert all(d.dim_param for d in inp.type.tensor_type.shape.dim)

    # Independently: transformers' BertModel, mean pooling over the mask, L2 normalize (what sentence-transformers ships).
    import onnxruntime as ort
    from transformers import BertModel

    texts = ["the dog sat on the mat", "a small red car ran fast on the road at night"]
    feeds = _tokens(folders / "bert", texts, 24)  # another length than the recipe's: the axis is really free
    bert = BertModel.from_pretrained(str(folders / "bert"), local_files_only=True).eval()
    with torch.no_grad():
        hidden = bert(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state
    mask = torch.from_numpy(feeds["attention_mask"]).unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    got = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_causal_lm_perplexity_matches_transformers_loss_and_gates_int8(folders, tmp_path):
    recipe = {
        "model": {"path": str(folders / "gpt2")},
        "data": {
            "calibration": {"text": str(folders / "sentences.txt"), "samples": 16, "max_length": 16},
            "eval": {"text": str(folders / "sentences.txt"), "samples": 12, "max_length": 16},
        },
        "passes": allow_slower([{"type": "quantize", "mode": "dynamic", "per_channel": True}]),
        "report": LATENCY,
        "gates": {"max_perplexity_increase": 0.05},
    }
    result = _run(tmp_path, recipe)
    assert result.exit_code == 0, result.stderr
    report = result.json()
    original = report["steps"][0]["accuracy"]
    assert original["metric"] == "perplexity"

    from transformers import GPT2LMHeadModel

    feeds = _tokens(folders / "gpt2", (SENTENCES * 4)[:12], 16)
    labels = torch.from_numpy(np.where(feeds["attention_mask"] == 1, feeds["input_ids"], -100))
    model = GPT2LMHeadModel.from_pretrained(str(folders / "gpt2"), local_files_only=True).eval()
    with torch.no_grad():
        loss = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}, labels=labels).loss
    assert original["value"] == pytest.approx(float(torch.exp(loss)), rel=1e-4)
    gate = next(g for g in report["gates"] if g["name"] == "max_perplexity_increase")
    final = report["steps"][-1]["accuracy"]["value"]
    assert gate["value"] == pytest.approx((final - original["value"]) / original["value"], abs=1e-6)
    assert gate["passed"] is True


def test_text_classification_reads_jsonl_labels_by_name_and_survives_prune_export_int8(folders, tmp_path):
    recipe = {
        "model": {"path": str(folders / "classifier")},
        "data": {"eval": {"text": str(folders / "labelled.jsonl"), "max_length": 16}},
        "passes": allow_slower(
            [
                {"type": "prune", "method": "magnitude", "sparsity": 0.3},
                {"type": "export"},
                {"type": "quantize", "mode": "dynamic"},
            ]
        ),
        "report": LATENCY,
    }
    result = _run(tmp_path, recipe)
    assert result.exit_code == 0, result.stderr
    report = result.json()
    from transformers import BertForSequenceClassification

    feeds = _tokens(folders / "classifier", SENTENCES * 3, 16)
    model = BertForSequenceClassification.from_pretrained(str(folders / "classifier"), local_files_only=True).eval()
    with torch.no_grad():
        predicted = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.argmax(-1).numpy()
    labels = np.arange(len(SENTENCES) * 3) % 3  # class<i> -> i through config.json label2id
    assert report["steps"][0]["accuracy"]["value"] == pytest.approx(float((predicted == labels).mean()))
    assert report["steps"][1]["sparsity"] > 0.2
    assert report["steps"][-1]["fidelity"]["top1_agreement"] is not None


def test_init_and_inspect_describe_a_folder(folders, tmp_path):
    result = run_cli("inspect", folders / "gpt2", "--json")
    assert result.exit_code == 0, result.stderr
    info = result.json()
    assert info["architecture"] == "GPT2LMHeadModel"
    assert info["task"] == "causal-lm"
    assert info["tokenizer"]["vocab_size"] > 100
    expected = sum(p.numel() for p in torch.nn.Module.parameters(_gpt2(folders)))
    assert info["parameters"] == expected

    result = run_cli("init", folders / "minilm-like")
    assert result.exit_code == 0, result.stderr
    import yaml

    recipe = yaml.safe_load(result.stdout)
    assert recipe["model"]["task"] == "feature-extraction"
    assert recipe["data"]["calibration"]["text"] == "calibration.txt"
    assert [p["type"] for p in recipe["passes"]] == ["export", "quantize"]


def _gpt2(folders):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(str(folders / "gpt2"), local_files_only=True)


def test_corrupt_safetensors_is_named_in_one_line(folders, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in (folders / "bert").iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    result = run_cli("inspect", broken)
    assert result.exit_code == 2
    assert "model.safetensors" in result.stderr and "not a valid safetensors" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_weights_and_unknown_architecture_are_refused(folders, tmp_path):
    empty = tmp_path / "noweights"
    empty.mkdir()
    (empty / "config.json").write_text((folders / "bert" / "config.json").read_text())
    result = run_cli("inspect", empty)
    assert result.exit_code == 2 and "no weights" in result.stderr and "model.safetensors" in result.stderr

    alien = tmp_path / "alien"
    alien.mkdir()
    (alien / "config.json").write_text(json.dumps({"model_type": "no-such-model", "architectures": ["AlienModel"]}))
    result = run_cli("inspect", alien)
    assert result.exit_code == 2 and "'no-such-model' is unknown to transformers" in result.stderr


def test_folder_with_remote_code_is_refused_unless_the_recipe_trusts_it(folders, tmp_path):
    remote = tmp_path / "remote"
    remote.mkdir()
    config = json.loads((folders / "bert" / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    recipe = {"model": {"path": str(remote)}, "passes": [], "report": LATENCY}
    result = _run(tmp_path, recipe)
    assert result.exit_code == 2
    assert "modeling_evil.EvilModel" in result.stderr and "trust_remote_code: true" in result.stderr
    assert not (tmp_path / "out").exists()


def test_pickled_pytorch_model_bin_needs_trust_pickle(folders, tmp_path):
    from transformers import BertModel

    legacy = tmp_path / "legacy"
    BertModel.from_pretrained(str(folders / "bert"), local_files_only=True).save_pretrained(legacy)
    state = {k: v for k, v in _safetensors(legacy / "model.safetensors").items()}
    state["note"] = Path("anything")  # a pickled Python object beside the weights: weights_only refuses it
    torch.save(state, legacy / "pytorch_model.bin")
    (legacy / "model.safetensors").unlink()
    result = run_cli("inspect", legacy)
    assert result.exit_code == 2
    assert "pytorch_model.bin" in result.stderr and "--trust-pickle" in result.stderr


def _safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_missing_hf_extra_exits_2_naming_it(folders, tmp_path):
    # A finder that refuses transformers, as on an install without optcli[hf].
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        textwrap.dedent(
            """
            import sys

            class NoTransformers:
                def find_spec(self, name, path=None, target=None):
                    if name == "transformers" or name.startswith("transformers."):
                        raise ImportError("No module named 'transformers'")
                    return None

            sys.meta_path.insert(0, NoTransformers())
            """
        )
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "optcli", "inspect", str(folders / "bert")], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 2, proc.stderr
    assert "optcli[hf]" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_folder_run_opens_no_socket(folders, tmp_path):
    # Any connection attempt (a hub lookup) is recorded and refused.
    site = tmp_path / "site"
    site.mkdir()
    log = tmp_path / "sockets.log"
    (site / "sitecustomize.py").write_text(
        textwrap.dedent(
            f"""
            import socket

            def refuse(self, address, *args):
                with open({str(log)!r}, "a") as fh:
                    fh.write(repr(address) + "\\n")
                raise OSError("network disabled in this test")

            socket.socket.connect = refuse
            socket.socket.connect_ex = refuse
            """
        )
    )
    recipe = {
        "model": {"path": str(folders / "minilm-like")},
        "data": {"eval": {"text": str(folders / "sentences.txt"), "samples": 8, "max_length": 16}},
        "passes": [],
        "report": LATENCY,
    }
    path = write_recipe(tmp_path, recipe)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "optcli", "run", str(path), "-o", str(tmp_path / "out"), "--json", "--quiet"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["steps"][0]["fidelity"]["cosine_mean"] == 1.0
    assert not log.exists(), log.read_text()


def test_pruned_model_is_written_back_as_a_folder_transformers_loads(folders, tmp_path):
    recipe = {
        "model": {"path": str(folders / "minilm-like")},
        "data": {"eval": {"text": str(folders / "sentences.txt"), "max_length": 16}},
        "passes": [{"type": "prune", "method": "magnitude", "sparsity": 0.5}, {"type": "save", "format": "hf"}],
        "report": LATENCY,
    }
    result = _run(tmp_path, recipe)
    assert result.exit_code == 0, result.stderr
    written = tmp_path / "out" / "minilm-like"
    assert result.json()["output"]["path"] == str(written)
    assert {"config.json", "model.safetensors", "tokenizer.json", "modules.json"} <= {p.name for p in written.iterdir()}
    assert (written / "1_Pooling" / "config.json").is_file()

    from transformers import BertModel

    bert = BertModel.from_pretrained(str(written), local_files_only=True)
    dense = bert.encoder.layer[0].intermediate.dense.weight
    assert 0.3 < float((dense == 0).float().mean()) < 0.7  # the masks are folded into plain zeros
    # optcli reads its own output like any folder, sentence-transformers layout included.
    again = tmp_path / "again"
    again.mkdir()
    result = _run(again, {**recipe, "model": {"path": str(written)}, "passes": []})
    assert result.exit_code == 0, result.stderr
    assert result.json()["input"]["kind"] == "hf BertModel + sentence pooling"
