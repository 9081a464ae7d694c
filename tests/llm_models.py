"""Tiny decoders of the real architectures, saved the way transformers saves them (save_pretrained), with a BPE
tokenizer of their own: hidden 64, 2 layers, grouped-query attention where the architecture has it. Nothing is
downloaded; onnxruntime-genai's model builder exports them in seconds."""

from __future__ import annotations

from pathlib import Path

from hf_models import SENTENCES, bpe_tokenizer

ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "phi3")
COMMON = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "tie_word_embeddings": False,
}


def tiny_decoder(folder: Path, arch: str = "llama", tied: bool = False) -> Path:
    """tied: the lm_head shares the embedding table (tie_word_embeddings, as Qwen2-0.5B and Llama-3.2-1B ship)."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    tokenizer, vocab = bpe_tokenizer()
    kinds = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": 16}),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": None}),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {"original_max_position_embeddings": 128, "pad_token_id": 0}),
    }
    config_class, model_class, extra = kinds[arch]
    config = config_class(vocab_size=vocab, **{**COMMON, "tie_word_embeddings": tied}, **extra)
    model = model_class(config).eval()
    with torch.no_grad():  # random weights give near-uniform logits: spread them so greedy choices are clear-cut
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def corpus(path: Path, repeats: int = 12) -> Path:
    path.write_text("\n".join(SENTENCES * repeats) + "\n", encoding="utf-8")
    return path
