"""One read-only view of an ONNX file's graph, parsed once per file version, and one checked save.

Analysis helpers (which nodes a candidate would quantize, the post-processing tail, op counts, exclusions) read the
same graph many times in one run, inside search and fallback rounds too; each used to parse the file again. The view
is cached by (path, mtime, size), so a rewritten file is read afresh. Weights held in external data files are not
loaded, and inline weights are dropped once indexed (an initializer's shape and dtype stay): a cached view costs
the graph's memory, not the model's. The cached protobuf is shared by every reader: a caller that changes a model
loads its own copy (`load_model`).
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

CACHE_SIZE = 16  # graphs kept parsed: a search reads a handful (input, BN-folded, raw, the chosen candidate)
# A file's mtime has the kernel's clock granularity (milliseconds): one rewritten to the same size within it would
# look unchanged. So a file changed this recently is parsed without caching (git's "racily clean" rule).
RACY_NS = 1_000_000_000
WEIGHT_FIELDS = ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")


@dataclass(frozen=True)
class Initializer:
    shape: tuple[int, ...]
    dtype: int  # onnx.TensorProto data type
    external: bool  # its bytes live in an external data file (not loaded by the view)


@dataclass(frozen=True)
class GraphView:
    """The main graph of one ONNX file, read-only: shared by every reader, so never change a node."""

    path: Path
    opsets: dict[str, int]  # domain ("" for ONNX) -> version
    inputs: tuple[str, ...]  # graph inputs that are not initializers
    outputs: tuple[str, ...]
    nodes: tuple[Any, ...]  # onnx.NodeProto, in the file's (topological) order
    initializers: dict[str, Initializer]
    _proto: Any = field(repr=False, compare=False)
    _by_op: dict = field(default_factory=dict, repr=False, compare=False)
    _producer: dict = field(default_factory=dict, repr=False, compare=False)
    _consumers: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def opset(self) -> int:
        """The default (ONNX) domain's opset."""
        return self.opsets.get("", self.opsets.get("ai.onnx", 0))

    def by_op(self, *op_types: str) -> list:
        """Nodes of these op types, in graph order."""
        if len(op_types) == 1:
            return list(self._by_op.get(op_types[0], []))
        return [n for n in self.nodes if n.op_type in op_types]

    def op_counts(self) -> dict[str, int]:
        return {op: len(nodes) for op, nodes in self._by_op.items()}

    def producer(self, tensor: str):
        """The node writing this tensor, None for a graph input or an initializer."""
        return self._producer.get(tensor)

    def consumers(self, tensor: str) -> list:
        return self._consumers.get(tensor, [])

    @property
    def proto(self):
        """The parsed ModelProto without weight values (dims and dtypes kept; subgraphs included), shared by every
        reader of this file version: read it, never change it. load_model() gives a copy to change."""
        return self._proto


def graph_view(path: Path | str) -> GraphView:
    """The view of the file as it is on disk now (a cached parse when the file did not change)."""
    resolved = Path(path).resolve()
    stat = os.stat(resolved)
    if time.time_ns() - stat.st_mtime_ns < RACY_NS:
        return _parse(str(resolved))
    return _cached_view(str(resolved), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=CACHE_SIZE)
def _cached_view(path: str, mtime_ns: int, size: int) -> GraphView:
    return _parse(path)


def _parse(path: str) -> GraphView:
    import onnx
    from onnx.external_data_helper import uses_external_data

    proto = onnx.load(path, load_external_data=False)
    graph = proto.graph
    inits = {
        t.name: Initializer(tuple(int(d) for d in t.dims), int(t.data_type), uses_external_data(t))
        for t in graph.initializer
    }
    _drop_weight_values(graph)
    by_op: dict[str, list] = defaultdict(list)
    for node in graph.node:
        by_op[node.op_type].append(node)
    producer, consumers = links(graph.node)
    return GraphView(
        path=Path(path),
        opsets={o.domain: int(o.version) for o in proto.opset_import},
        inputs=tuple(i.name for i in graph.input if i.name not in inits),
        outputs=tuple(o.name for o in graph.output),
        nodes=tuple(graph.node),
        initializers=inits,
        _proto=proto,
        _by_op=dict(by_op),
        _producer=producer,
        _consumers=consumers,
    )


def links(nodes) -> tuple[dict[str, Any], dict[str, list]]:
    """(tensor -> the node writing it, tensor -> the nodes reading it) over these nodes; optional (empty) names
    left out. For a graph being rewritten, where no cached view applies."""
    producer: dict[str, Any] = {}
    consumers: dict[str, list] = defaultdict(list)
    for node in nodes:
        for name in node.output:
            if name:
                producer[name] = node
        for name in node.input:
            if name:
                consumers[name].append(node)
    return producer, dict(consumers)


def _drop_weight_values(graph) -> None:
    """Initializers keep name, dims and dtype; their values go (in If / Loop / Scan bodies too)."""
    for t in graph.initializer:
        for name in WEIGHT_FIELDS:
            t.ClearField(name)
    for node in graph.node:
        for attr in node.attribute:
            for body in [attr.g] if attr.HasField("g") else list(attr.graphs):
                _drop_weight_values(body)


def load_model(path: Path | str, external_data: bool = True):
    """A fresh ModelProto of the file, owned by the caller (for passes that change the graph or read weights)."""
    import onnx

    return onnx.load(str(path), load_external_data=external_data)


def checked_save(proto, target: Path) -> Path:
    """Save (weights to one external data file past protobuf's 2 GB limit) and run onnx.checker on the written
    file, by path, so a model over 2 GB is checked too. A model the checker refuses is deleted, never left behind."""
    import onnx

    from optcli.artifact import artifact_files, save_onnx

    save_onnx(proto, target)
    try:
        onnx.checker.check_model(str(target))
    except onnx.checker.ValidationError:
        for f in artifact_files(target):
            f.unlink(missing_ok=True)
        raise
    return target
