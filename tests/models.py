"""Small models the tests build themselves (seconds, no downloads)."""

from __future__ import annotations

import math

import torch
from torch import nn


class TinyEncoder(nn.Module):
    """A 2-layer transformer encoder over token ids with an additive -inf attention mask, like BERT's."""

    def __init__(self, vocab: int = 100, dim: int = 32, heads: int = 2, layers: int = 2, num_classes: int = 4):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, 64, dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "ln1": nn.LayerNorm(dim),
                    "qkv": nn.Linear(dim, 3 * dim),
                    "proj": nn.Linear(dim, dim),
                    "ln2": nn.LayerNorm(dim),
                    "fc1": nn.Linear(dim, 4 * dim),
                    "fc2": nn.Linear(4 * dim, dim),
                }
            )
            for _ in range(layers)
        )
        self.head = nn.Linear(dim, num_classes)

    def forward(self, input_ids, attention_mask):
        b, t = input_ids.shape
        x = self.embed(input_ids) + self.pos[:, :t]
        # -inf where the mask is 0: calibration must cope with the infinities this puts in the graph.
        bias = torch.zeros(b, 1, 1, t).masked_fill(attention_mask[:, None, None, :] == 0, float("-inf"))
        for blk in self.blocks:
            h = blk["ln1"](x)
            q, k, v = blk["qkv"](h).reshape(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias, dim=-1)
            x = x + blk["proj"]((att @ v).transpose(1, 2).reshape(b, t, -1))
            x = x + blk["fc2"](torch.nn.functional.gelu(blk["fc1"](blk["ln2"](x))))
        return self.head(x.mean(1))


def build_encoder(**kwargs) -> TinyEncoder:
    torch.manual_seed(0)
    return TinyEncoder(**kwargs).eval()


class NotExportable(nn.Module):
    """Leaves the graph through Python lists: torch.export refuses it and the tracer bakes in a constant."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.tensor([v * 2 for v in x.flatten().tolist()]).reshape(x.shape))


def build_not_exportable() -> NotExportable:
    return NotExportable()
