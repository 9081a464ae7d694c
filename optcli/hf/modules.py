"""The torch modules the passes see: plain positional tensors in, one tensor out (what exporters and passes expect)."""

from __future__ import annotations

from pathlib import Path

import torch

from optcli.errors import BadInput
from optcli.hf.folder import module_kind, read_json

# The order the wrapper's forward takes them in: ONNX input order, recipe order and torch argument order agree.
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


class TextModel(torch.nn.Module):
    """A transformers model behind a fixed signature.

    feature-extraction: last_hidden_state, or the sentence embedding when `pooling` is set;
    text-/token-classification and causal-lm: logits.
    """

    def __init__(self, model, input_names: list[str], task: str, pooling=None):
        super().__init__()
        self.model = model
        self.input_names = list(input_names)
        self.task = task
        self.pooling = pooling

    @property
    def output_name(self) -> str:
        if self.task == "feature-extraction":
            return "sentence_embedding" if self.pooling is not None else "last_hidden_state"
        return "logits"

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        kwargs = {n: given[n] for n in self.input_names if given[n] is not None}
        if self.task == "causal-lm":
            kwargs["use_cache"] = False  # past key values are not an output optcli measures or exports
        out = self.model(**kwargs, return_dict=True)
        if self.task != "feature-extraction":
            return out.logits
        hidden = out.last_hidden_state
        if self.pooling is None:
            return hidden
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        return self.pooling(hidden, mask)


class SentencePooling(torch.nn.Module):
    """sentence-transformers' Pooling (+ Normalize): the modes it names, concatenated in its order."""

    ORDER = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")

    def __init__(self, modes: tuple[str, ...], normalize: bool):
        super().__init__()
        self.modes = tuple(m for m in self.ORDER if m in modes)
        self.normalize = normalize

    def forward(self, hidden, attention_mask):
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        counts = mask.sum(1).clamp(min=1e-9)
        parts = []
        for mode in self.modes:
            if mode == "cls":
                parts.append(hidden[:, 0])
            elif mode == "max":
                parts.append(hidden.masked_fill(mask == 0, float("-inf")).max(dim=1).values)
            elif mode == "mean":
                parts.append((hidden * mask).sum(1) / counts)
            elif mode == "mean_sqrt_len_tokens":
                parts.append((hidden * mask).sum(1) / counts.sqrt())
            elif mode == "weightedmean":
                positions = torch.arange(1, hidden.shape[1] + 1, dtype=hidden.dtype, device=hidden.device)
                weighted = mask * positions.view(1, -1, 1)
                parts.append((hidden * weighted).sum(1) / weighted.sum(1).clamp(min=1e-9))
            else:  # lasttoken: the last position the mask keeps (right padding)
                last = (attention_mask.sum(1) - 1).clamp(min=0)
                parts.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        if self.normalize:
            out = torch.nn.functional.normalize(out, p=2, dim=-1)
        return out


LEGACY_POOLING = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


def sentence_pooling(folder: Path, modules: list[dict]) -> SentencePooling:
    """Read the module configs (no sentence-transformers import): Transformer, Pooling and Normalize are understood."""
    modes: tuple[str, ...] | None = None
    normalize = False
    for m in modules:
        kind = module_kind(m)
        if kind == "Transformer":
            continue
        if kind == "Normalize":
            normalize = True
            continue
        if kind != "Pooling":
            raise BadInput(
                f"{folder / 'modules.json'}: module {m.get('type')!r} is not supported (Transformer, Pooling and Normalize are)"
            )
        path = folder / str(m.get("path", "")) / "config.json"
        if not path.is_file():
            raise BadInput(f"{folder / 'modules.json'}: the Pooling module's {path} is missing")
        cfg = read_json(path, "pooling config")
        cfg = cfg if isinstance(cfg, dict) else {}
        mode = cfg.get("pooling_mode")
        if mode is not None:
            modes = (mode,) if isinstance(mode, str) else tuple(mode)
        else:
            modes = tuple(v for k, v in LEGACY_POOLING.items() if cfg.get(k))
        unknown = [x for x in modes if x not in SentencePooling.ORDER]
        if not modes or unknown:
            raise BadInput(
                f"{path}: pooling mode {unknown or '(none)'} not understood (known: {', '.join(SentencePooling.ORDER)})"
            )
    if modes is None:
        raise BadInput(f"{folder / 'modules.json'}: no Pooling module; optcli reads encoder + Pooling (+ Normalize)")
    return SentencePooling(modes, normalize)
