"""Intermediate tensors of a float graph on calibration batches: what SmoothQuant and AWQ read their per-channel
statistics from. The named tensors become extra outputs of a copy of the graph, and one ONNX Runtime session runs
every batch."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np


def tensor_values(
    proto, names: list[str], batches: Iterable[dict], work: Path | None = None, optimize: bool = True
) -> Iterator[list[np.ndarray]]:
    """Per batch, the values of `names` (in that order). `proto` is left as it was. A graph past protobuf's 2 GB is
    written under `work` for ONNX Runtime to read (an error without it); optimize=False keeps every tensor the way
    the graph names it, where a fusion could otherwise compute around one."""
    import onnx
    import onnxruntime as ort

    from optcli.artifact import ONNX_EXTERNAL_THRESHOLD, save_onnx

    augmented = onnx.ModelProto()
    augmented.CopyFrom(proto)
    have = {o.name for o in augmented.graph.output}
    augmented.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in have)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    large = augmented.ByteSize() > ONNX_EXTERNAL_THRESHOLD
    if large and work is None:
        raise ValueError("a graph past 2 GB needs a work folder to be read from")
    holder = tempfile.TemporaryDirectory(dir=work, prefix="tensors-") if large else contextlib.nullcontext()
    with holder as folder:  # the session reads the file until it is done
        source: Any = (
            str(save_onnx(augmented, Path(folder) / "augmented.onnx")) if folder else augmented.SerializeToString()
        )
        del augmented
        session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        inputs = {i.name for i in session.get_inputs()}
        for feeds in batches:
            yield session.run(names, {k: v for k, v in feeds.items() if k in inputs})
        del session
