"""A small decoder trained here, once, on text this machine has: the model bench_llm.py measures perplexity on.

No wheel ships a real decoder's weights and nothing can be downloaded, so quality figures (perplexity deltas of
int4 against fp32) need a model that has learnt something: random weights have no structure for a quantizer to
lose. The text is the docstrings of Python's standard library (read with `ast`, a few MB of English prose and
examples); whole modules are held out, so the held-out file is text the model never saw.

    python benchmarks/llm_quality_model.py              # trains (<= --minutes of CPU) or reuses the cache
    python benchmarks/llm_quality_model.py --minutes 3  # a quick, worse model

The folder (Qwen2 architecture, byte-level BPE tokenizer of its own, safetensors) and the two text files are cached
under $OPTCLI_BENCH_CACHE (default ~/.cache/optcli-bench/llm-quality), keyed by the settings; never in git.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import random
import sys
import sysconfig
import time
from pathlib import Path

# A 1024-token vocabulary: the logits' matmul was a quarter of each step at 4096, and more steps in the same CPU
# minutes give a model whose weights have learnt enough for int4 to cost something measurable.
SETTINGS = {
    "vocab": 1024,
    "hidden": 256,
    "layers": 4,
    "heads": 4,
    "kv_heads": 2,
    "intermediate": 512,
    "seq": 128,
    "batch": 16,
    "lr": 3e-3,
    "seed": 0,
    "held_out_share": 0.05,
}


def cache_root() -> Path:
    return Path(os.environ.get("OPTCLI_BENCH_CACHE", Path.home() / ".cache" / "optcli-bench")) / "llm-quality"


def key(settings: dict, minutes: float) -> str:
    return hashlib.sha256(json.dumps({**settings, "minutes": minutes}, sort_keys=True).encode()).hexdigest()[:12]


def docstrings() -> dict[str, str]:
    """Module name -> its docstrings joined by blank lines (modules, classes, functions), stdlib only, no tests."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in ("test", "site-packages", "idlelib", "lib2to3") or "tests" in rel.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        texts = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    texts.append(doc)
        if texts:
            out[str(rel)] = "\n\n".join(texts)
    return out


def split_text(settings: dict) -> tuple[str, str]:
    """(train, held-out): whole modules held out, chosen by a seeded shuffle."""
    docs = docstrings()
    names = sorted(docs)
    random.Random(settings["seed"]).shuffle(names)
    held = set(names[: max(1, int(len(names) * settings["held_out_share"]))])
    train = "\n\n".join(docs[n] for n in names if n not in held)
    test = "\n\n".join(docs[n] for n in names if n in held)
    return train, test


def tokenizer(train: str, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(train.split("\n\n"), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def train(folder: Path, settings: dict, minutes: float) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(settings["seed"])
    text, held = split_text(settings)
    tok = tokenizer(text, settings["vocab"])
    ids = torch.tensor(tok(text)["input_ids"], dtype=torch.long)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=settings["hidden"],
        num_hidden_layers=settings["layers"],
        num_attention_heads=settings["heads"],
        num_key_value_heads=settings["kv_heads"],
        intermediate_size=settings["intermediate"],
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = Qwen2ForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    seq, batch = settings["seq"], settings["batch"]
    opt = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=0.1, betas=(0.9, 0.95))
    # The budget is CPU time (the machine is shared: wall time says little), capped at 3x in wall time.
    budget = minutes * 60
    gen = torch.Generator().manual_seed(settings["seed"])
    start, cpu0, step, losses = time.perf_counter(), time.process_time(), 0, []
    model.train()
    while (frac := max((time.process_time() - cpu0) / budget, (time.perf_counter() - start) / (3 * budget))) < 1:
        # Cosine decay over the time budget (the step count is unknown on a shared machine), 20 warm-up steps.
        elapsed = time.perf_counter() - start
        lr = settings["lr"] * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=gen)
        x = torch.stack([ids[s : s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 25 == 0:
            print(
                f"step {step} loss {sum(losses[-25:]) / 25:.3f} ({elapsed / 60:.1f} min)", file=sys.stderr, flush=True
            )
    model.eval()
    held_ids = torch.tensor(tok(held)["input_ids"][: 32 * seq], dtype=torch.long)
    with torch.no_grad():
        chunks = held_ids[: len(held_ids) // seq * seq].view(-1, seq)
        held_loss = sum(model(input_ids=c[None], labels=c[None]).loss.item() for c in chunks) / len(chunks)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return {
        "parameters": params,
        "steps": step,
        "tokens_seen": step * batch * seq,
        "train_tokens": len(ids),
        "train_loss_last": round(sum(losses[-25:]) / max(1, len(losses[-25:])), 4),
        "held_out_perplexity_torch": round(math.exp(held_loss), 3),
        "minutes": round((time.perf_counter() - start) / 60, 2),
        "cpu_minutes": round((time.process_time() - cpu0) / 60, 2),
    }


def ensure(minutes: float = 24.0) -> dict:
    """The cached model folder and text files, trained on first use. Returns paths and the training record."""
    root = cache_root() / key(SETTINGS, minutes)
    record = root / "record.json"
    if record.exists():
        return json.loads(record.read_text())
    import torch

    torch.set_num_threads(2)
    tmp = root.with_name(root.name + ".partial")
    train_text, held = split_text(SETTINGS)
    info = train(tmp / "model", SETTINGS, minutes)
    (tmp / "train.txt").write_text(train_text)
    (tmp / "held_out.txt").write_text(held)
    if root.exists():
        import shutil

        shutil.rmtree(root)
    tmp.rename(root)
    out = {
        "folder": str(root / "model"),
        "train_text": str(root / "train.txt"),
        "held_out_text": str(root / "held_out.txt"),
        "settings": SETTINGS,
        **info,
    }
    record.write_text(json.dumps(out, indent=1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--minutes", type=float, default=24.0, help="training budget in CPU minutes (wall time capped at 3x)"
    )
    args = parser.parse_args()
    print(json.dumps(ensure(args.minutes), indent=1))


if __name__ == "__main__":
    main()
