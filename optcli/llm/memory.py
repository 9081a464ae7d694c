"""Peak resident memory of a child process (its own VmHWM), and the refusal of a model that cannot fit before anything loads it.

Past the available memory Linux overcommits and the OOM killer ends the run (and maybe a neighbour) without a
word, so the estimate is made from the weight files' headers, before transformers or the builder touch them.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from optcli.errors import BadInput

# The builder holds the model in torch (as fp32 on CPU) and the ONNX tensors it writes: about twice the fp32
# weights, plus the runtime and the libraries (measured on the tiny folders: ~0.7 GB of imports).
EXPORT_FACTOR = 2.0
OVERHEAD_BYTES = 1 << 30
SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def parameter_count(folder: Path) -> int | None:
    """Parameters of the folder's safetensors weights, read from their headers (no tensor is loaded)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with path.open("rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(size))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def available_memory() -> int:
    from optcli.model import available_memory as available

    return available()


def export_need(folder: Path) -> int | None:
    """Bytes the builder is expected to hold at its peak for this folder (None: no safetensors to read)."""
    params = parameter_count(folder)
    return None if params is None else int(params * 4 * EXPORT_FACTOR + OVERHEAD_BYTES)


def check_fits(folder: Path) -> None:
    need, have = export_need(folder), available_memory()
    if need is not None and need > have:
        params = parameter_count(folder) or 0
        raise BadInput(
            f"{folder}: a {params / 1e9:.2f}B-parameter model needs about {need / 1e9:.1f} GB to export "
            f"(fp32 weights twice over, the builder's peak), more than the {have / 1e9:.1f} GB available; "
            "free memory or use a machine with more"
        )


@dataclass
class ChildResult:
    returncode: int
    peak_rss_bytes: int
    stdout: str
    stderr: str


def run_child(module: str, args: list[str], env: dict | None = None, timeout: float | None = None) -> ChildResult:
    """Run `python -m module args...` in a child process; peak_rss_bytes is the child's own (optcli.llm.child)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="optcli-peak-") as work:
        peak = Path(work) / "peak"
        proc = subprocess.Popen(
            [sys.executable, "-m", "optcli.llm.child", str(peak), module, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        said = peak.read_text().strip() if peak.is_file() else ""
    return ChildResult(proc.returncode, int(said) if said.isdigit() else 0, out, err)


def peak_rss_self() -> int:
    """This process's peak resident memory (VmHWM), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
