"""An onnxruntime-genai decoder folder run with plain ONNX Runtime: input ids in, logits and the KV cache out.

What onnxruntime-genai's generator hides (every position's logits, the cache itself) is what perplexity and the
logits check need; the folder's genai_config.json says the input/output names and the cache's layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from optcli.errors import BadInput
from optcli.llm import GENAI_CONFIG

ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": np.float32}


def genai_config(folder: Path) -> dict:
    path = Path(folder) / GENAI_CONFIG
    if not path.is_file():
        raise BadInput(f"{folder}: no {GENAI_CONFIG}; not a decoder folder onnxruntime-genai wrote")
    return json.loads(path.read_text(encoding="utf-8"))


class Decoder:
    """One ONNX Runtime session on the folder's decoder; __call__(ids, past) -> (logits, present)."""

    def __init__(self, folder: Path, providers=("CPUExecutionProvider",), threads: int | None = None):
        import onnxruntime as ort

        config = genai_config(folder)["model"]
        dec = config["decoder"]
        self.folder = Path(folder)
        self.layers = int(dec["num_hidden_layers"])
        self.kv_heads = int(dec["num_key_value_heads"])
        self.head_size = int(dec["head_size"])
        self.vocab = int(config["vocab_size"])
        self.names = dec["inputs"]
        self.out_names = dec["outputs"]
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.folder / dec["filename"]), options, providers=list(providers))
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        key = self.names["past_key_names"] % 0
        self.kv_dtype = ORT_TYPES.get(self.inputs[key].type, np.float32)
        self.outputs = [o.name for o in self.session.get_outputs()]

    def empty_past(self) -> list[np.ndarray]:
        shape = (1, self.kv_heads, 0, self.head_size)
        return [np.zeros(shape, self.kv_dtype) for _ in range(2 * self.layers)]

    def __call__(self, ids: np.ndarray, past: list[np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """ids [1, T] after `past` (2 x layers arrays, key then value per layer; None: empty): logits [1, T, V]."""
        past = self.empty_past() if past is None else past
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        total = past[0].shape[2] + ids.shape[1]
        feeds = {self.names["input_ids"]: ids}
        if "attention_mask" in self.names and self.names["attention_mask"] in self.inputs:
            feeds[self.names["attention_mask"]] = np.ones((1, total), np.int64)
        positions = self.names.get("position_ids", "position_ids")
        if positions in self.inputs:
            feeds[positions] = np.arange(total - ids.shape[1], total, dtype=np.int64)[None]
        for layer in range(self.layers):
            feeds[self.names["past_key_names"] % layer] = past[2 * layer]
            feeds[self.names["past_value_names"] % layer] = past[2 * layer + 1]
        wanted = [self.out_names["logits"]] + [
            self.out_names[kind] % layer
            for layer in range(self.layers)
            for kind in ("present_key_names", "present_value_names")
        ]
        got = self.session.run(wanted, feeds)
        return got[0].astype(np.float32), got[1:]
