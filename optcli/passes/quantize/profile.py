"""What an ONNX Runtime session really runs, and what each part of it costs (ORT's own profiler).

int8 pays only where the session fuses Q/DQ around an op into an integer kernel (QLinearConv, QGemm, ...); an op with
no int8 kernel (HardSwish, HardSigmoid, Resize) leaves Dequantize/Quantize islands around it that cost more than they
save. The QDQ file on disk does not show that: the profile of the session and its optimized graph do.

Costs are attributed to regions: each node of a graph belongs to the compute op (Conv, Gemm, MatMul, ConvTranspose)
that feeds it (walking back along first inputs; forward for nodes before any compute op). The fp32 session fuses an
activation into its Conv, the int8 one runs QLinearConv + DequantizeLinear + HardSigmoid + Mul + QuantizeLinear: both
sum into the same region, so the two costs compare like with like.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from optcli.onnxgraph import graph_view, load_model

COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# Names ORT gives the nodes it creates from one of ours (QDQ fusion, NCHWc layout, Q/DQ the quantizer inserted).
_DERIVED = re.compile(r"(_token_\d+|_nchwc|_QuantizeLinear|_DequantizeLinear|_quantized|_output_\d+)$")
# Session ops that are int8 kernels (fused Q/DQ regions).
SESSION_GRAPH_LIMIT = 256 * 2**20
INT8_KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger")


@dataclass
class Profile:
    """Median kernel time per session node over the profiled runs, and the op counts of the session's graph."""

    node_ms: dict[str, float]
    node_op: dict[str, str]
    session_ops: dict[str, int] = field(default_factory=dict)

    def total_ms(self) -> float:
        return float(sum(self.node_ms.values()))

    def by_op_type(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for name, ms in self.node_ms.items():
            out[self.node_op.get(name, "?")] += ms
        return dict(out)


def profile(path: Path, feeds: dict, threads: int, runs: int = 10, warmup: int = 2) -> Profile:
    """Run the model `runs` times under ORT's profiler; every file it writes goes to a temp dir removed after."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="optcli-profile-") as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "profile")
        # The session's own graph (what it fused) is written only for models small enough to copy cheaply.
        small = Path(path).stat().st_size < SESSION_GRAPH_LIMIT
        if small:
            opts.optimized_model_filepath = str(Path(tmp) / "session.onnx")
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        for _ in range(warmup + runs):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
        session_ops = {}
        if small and (Path(tmp) / "session.onnx").exists():
            optimized = load_model(Path(tmp) / "session.onnx", external_data=False)
            session_ops = dict(Counter(n.op_type for n in optimized.graph.node))
    times: dict[str, list[float]] = defaultdict(list)
    ops: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            name = e["name"][: -len("_kernel_time")]
            times[name].append(float(e["dur"]))
            ops[name] = e.get("args", {}).get("op_name", "?")
    # The last `runs` calls of each node: warm-up calls pay allocation and pre-packing.
    node_ms = {n: float(np.median(v[-runs:])) / 1000.0 for n, v in times.items()}
    return Profile(node_ms, ops, session_ops)


def fused_counts(session_ops: dict[str, int]) -> dict[str, int]:
    """int8 kernels the session runs vs compute ops it still runs in float."""
    return {
        "int8_kernels": sum(v for k, v in session_ops.items() if k in INT8_KERNELS or k.startswith("QLinear")),
        "float_compute": sum(v for k, v in session_ops.items() if k in COMPUTE_OPS or k == "FusedConv"),
        "quantize_linear": session_ops.get("QuantizeLinear", 0),
        "dequantize_linear": session_ops.get("DequantizeLinear", 0),
    }


class Regions:
    """Which compute op of a graph each of its nodes (and tensors) belongs to."""

    def __init__(self, path: Path):

        nodes = list(graph_view(path).nodes)
        producer = {o: n for n in nodes for o in n.output if o}
        consumers: dict[str, list] = defaultdict(list)
        for n in nodes:
            for i in n.input:
                consumers[i].append(n)
        self.op_type = {n.name: n.op_type for n in nodes}
        self.owner: dict[str, str | None] = {}
        for n in nodes:  # graph order is topological: a producer's owner is known before its consumers'
            if n.op_type in COMPUTE_OPS:
                self.owner[n.name] = n.name
                continue
            first = producer.get(n.input[0]) if n.input else None
            self.owner[n.name] = self.owner.get(first.name) if first is not None else None
        for n in reversed(nodes):  # nodes before any compute op (input Quantize, pre-processing): the first one after
            if self.owner[n.name] is None:
                for c in consumers.get(n.output[0], []) if n.output else []:
                    if self.owner.get(c.name):
                        self.owner[n.name] = self.owner[c.name]
                        break
        self.by_tensor = {o: self.owner[n.name] for n in nodes for o in n.output if o}

    def members(self, names: frozenset[str]) -> frozenset[str]:
        """`names` plus every node the compute ops among them own: a Conv kept fp32 keeps its activation (HardSigmoid,
        Mul, ...) fp32 too, or the quantizer still wraps those in Q/DQ islands that cost more than they save."""
        owners = {n for n in names if self.op_type.get(n) in COMPUTE_OPS}
        if not owners:
            return names
        return names | frozenset(n for n, owner in self.owner.items() if owner in owners)

    def resolve(self, session_name: str) -> str | None:
        """The region of a profiled session node, from the name ORT derived from one of ours."""
        current = session_name.rstrip("/")
        while current:
            for candidate in (current, _DERIVED.sub("", current), _DERIVED.sub("", _DERIVED.sub("", current))):
                if candidate in self.owner:
                    return self.owner[candidate]
                if candidate in self.by_tensor:
                    return self.by_tensor[candidate]
            if "/" not in current[1:]:
                return None
            current = current.rsplit("/", 1)[0]  # fusions append "/QuickGeluFusion/" and the like
        return None

    def costs(self, prof: Profile) -> tuple[dict[str, float], float]:
        """ms per region, and the ms no region could be found for (layout reorders, shape ops)."""
        out: dict[str, float] = defaultdict(float)
        other = 0.0
        for name, ms in prof.node_ms.items():
            region = self.resolve(name)
            if region is None:
                other += ms
            else:
                out[region] += ms
        return dict(out), other


@dataclass
class Comparison:
    """fp32 vs int8 cost per region (a compute op and what hangs off it), from one profile of each."""

    rows: list[dict]  # {"node", "op_type", "fp32_ms", "int8_ms"}
    fp32_total_ms: float
    int8_total_ms: float
    fp32_other_ms: float
    int8_other_ms: float
    session_ops: dict[str, int]

    def slower(self, quantized: set[str], margin_ms: float = 0.002, ratio: float = 1.0) -> list[str]:
        """Quantized regions whose int8 cost exceeds their fp32 twin's (by more than noise)."""
        return [
            r["node"] for r in self.rows if r["node"] in quantized and r["int8_ms"] > r["fp32_ms"] * ratio + margin_ms
        ]


def compare(fp32_path: Path, fp32: Profile, int8_path: Path, int8: Profile) -> Comparison:
    f_regions, q_regions = Regions(fp32_path), Regions(int8_path)
    f_costs, f_other = f_regions.costs(fp32)
    q_costs, q_other = q_regions.costs(int8)
    names = sorted(set(f_costs) | set(q_costs), key=lambda n: -f_costs.get(n, 0.0))
    rows = [
        {
            "node": n,
            "op_type": f_regions.op_type.get(n) or q_regions.op_type.get(n, "?"),
            "fp32_ms": round(f_costs.get(n, 0.0), 4),
            "int8_ms": round(q_costs.get(n, 0.0), 4),
        }
        for n in names
    ]
    return Comparison(rows, fp32.total_ms(), int8.total_ms(), f_other, q_other, int8.session_ops)


def op_type_table(comparison: Comparison, quantized: set[str], why_fp32: dict[str, str]) -> list[dict]:
    """One row per compute op type: fp32 ms, int8 ms (this model), regions quantized / kept fp32, and why."""
    table: dict[str, dict] = {}
    for r in comparison.rows:
        row = table.setdefault(
            r["op_type"],
            {"op_type": r["op_type"], "fp32_ms": 0.0, "int8_ms": 0.0, "quantized": 0, "fp32": 0, "why": Counter()},
        )
        row["fp32_ms"] += r["fp32_ms"]
        row["int8_ms"] += r["int8_ms"]
        if r["node"] in quantized:
            row["quantized"] += 1
        else:
            row["fp32"] += 1
            row["why"][why_fp32.get(r["node"], "op type not in the chosen candidate")] += 1
    out = []
    for row in sorted(table.values(), key=lambda x: -x["fp32_ms"]):
        row["fp32_ms"] = round(row["fp32_ms"], 4)
        row["int8_ms"] = round(row["int8_ms"], 4)
        row["why"] = "; ".join(f"{k} ({v})" for k, v in row["why"].most_common())
        out.append(row)
    return out
