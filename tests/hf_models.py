"""Tiny Hugging Face folders built the way transformers saves them (save_pretrained), with tokenizers of their own.

Hidden size 32, 2 layers: a load + export + int8 run takes seconds. Nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

WORDS = [
    "the",
    "a",
    "dog",
    "cat",
    "bird",
    "sat",
    "ran",
    "sang",
    "on",
    "under",
    "near",
    "mat",
    "tree",
    "house",
    "car",
    "road",
    "red",
    "blue",
    "big",
    "small",
    "fast",
    "slow",
    "old",
    "new",
    "happy",
    "sad",
    "morning",
    "night",
    "river",
    "city",
    "garden",
    "and",
    "but",
    "while",
]
SENTENCES = [
    "the dog sat on the mat",
    "a cat ran under the tree",
    "the big bird sang in the morning",
    "a small red car ran fast on the road",
    "the old house near the river",
    "a happy dog and a sad cat",
    "the blue bird sat on the big tree while the cat ran",
    "a new car on the city road at night",
    "the slow cat sat near the garden",
    "a fast dog ran near the old river",
]


def wordpiece_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(specials + WORDS + ["in", "at", "."])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
    return fast, len(vocab)


def bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SENTENCES * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    return fast, tok.get_vocab_size()


def tiny_bert(folder: Path, num_labels: int | None = None, tokens: bool = False) -> Path:
    """A 2-layer BERT + WordPiece tokenizer: BertModel; BertForSequenceClassification with num_labels, or
    BertForTokenClassification with num_labels and tokens=True."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification, BertModel

    torch.manual_seed(0)
    tokenizer, vocab = wordpiece_tokenizer()
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    if num_labels:
        config.num_labels = num_labels
        config.id2label = {i: f"class{i}" for i in range(num_labels)}
        config.label2id = {v: k for k, v in config.id2label.items()}
        model = (BertForTokenClassification if tokens else BertForSequenceClassification)(config)
    else:
        model = BertModel(config, add_pooling_layer=False)
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_gpt2(folder: Path) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tokenizer, vocab = bpe_tokenizer()
    config = GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    GPT2LMHeadModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sentence_transformers_layout(bert: Path, folder: Path) -> Path:
    """The BERT folder as sentence-transformers lays one out: Transformer at the root, mean Pooling, Normalize."""
    shutil.copytree(bert, folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False})
    )
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    return folder


def write_text(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
