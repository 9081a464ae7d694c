"""Big ONNX models: peak memory of `optcli run` (dynamic int8) against the model's size on disk, and the >2 GB path.

    python benchmarks/bench_big_onnx.py                 # ~1.1 GB model (inline weights): peak RSS / size on disk
    python benchmarks/bench_big_onnx.py --big           # also a ~2.3 GB model (external data, past protobuf's 2 GB limit)
    python benchmarks/bench_big_onnx.py --layers 4      # a quick smoke run (~270 MB)

Each measurement runs in a child process; its peak resident memory is the kernel's ru_maxrss from wait4.
Baseline in the same run: the bare onnxruntime.quantization.quantize_dynamic call on the same file, and the
size on disk. Files go under --workdir (default: a temp folder on /tmp, removed at the end).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HIDDEN = 4096  # each layer is one 4096x4096 float32 MatMul weight: 64 MiB


def generate(path: Path, layers: int, external: bool) -> None:
    """An MLP of `layers` MatMul+Relu blocks. External data is written tensor by tensor, never all in memory."""
    code = textwrap.dedent(f"""
        import numpy as np, onnx
        from onnx import TensorProto, helper
        layers, hidden, external, path = {layers}, {HIDDEN}, {external}, {str(path)!r}
        rng = np.random.default_rng(0)
        inits, nodes, offset = [], [], 0
        data = open(path + ".data", "wb") if external else None
        x = "x"
        for i in range(layers):
            w = (rng.standard_normal((hidden, hidden), dtype=np.float32) * np.float32((2 / hidden) ** 0.5))
            if external:
                t = TensorProto(name=f"w{{i}}", data_type=TensorProto.FLOAT, dims=[hidden, hidden])
                t.data_location = TensorProto.EXTERNAL
                for k, v in (("location", "model.onnx.data"), ("offset", str(offset)), ("length", str(w.nbytes))):
                    t.external_data.add(key=k, value=v)
                data.write(w.tobytes())
                offset += w.nbytes
            else:
                t = onnx.numpy_helper.from_array(w, f"w{{i}}")
            inits.append(t)
            nodes += [helper.make_node("MatMul", [x, f"w{{i}}"], [f"m{{i}}"], name=f"matmul{{i}}"),
                      helper.make_node("Relu", [f"m{{i}}"], [f"r{{i}}"], name=f"relu{{i}}")]
            x = f"r{{i}}"
            del w
        nodes[-1].output[0] = "y"
        graph = helper.make_graph(nodes, "big_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", hidden])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", hidden])], initializer=inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        if data:
            data.close()
            open(path, "wb").write(model.SerializeToString())
        else:
            onnx.save(model, path)
    """)
    subprocess.run([sys.executable, "-c", code], check=True)


def disk_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.parent.iterdir() if f.name.startswith(path.name))


def measured(args: list[str], cwd: Path | None = None) -> tuple[int, float, float, str]:
    """Run a child; return (exit code, peak RSS in bytes, seconds, stderr tail)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read()[-600:]
    return proc.returncode, usage.ru_maxrss * 1024, time.perf_counter() - t0, tail  # Linux reports KiB


def recipe(model: Path, folder: Path) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(
        textwrap.dedent(f"""
        model: {{path: {model}}}
        passes:
          - {{type: quantize, mode: dynamic, per_channel: false}}
        report:
          fidelity_samples: 8
          latency: {{batch_sizes: [1], warmup: 1, runs: 3, threads: 2}}
    """)
    )
    return path


def bare_quantize(model: Path, target: Path, external: bool) -> list[str]:
    code = (
        f"from onnxruntime.quantization import quantize_dynamic; "
        f"quantize_dynamic({str(model)!r}, {str(target)!r}, use_external_data_format={external})"
    )
    return [sys.executable, "-c", code]


def check_output(model: Path, quantized: Path) -> str:
    """The quantized model loads in ONNX Runtime and agrees with the float one (cosine of outputs)."""
    code = textwrap.dedent(f"""
        import numpy as np, onnxruntime as ort
        x = np.random.default_rng(1).standard_normal((4, {HIDDEN}), dtype=np.float32)
        a = ort.InferenceSession({str(model)!r}, providers=["CPUExecutionProvider"]).run(None, {{"x": x}})[0].ravel()
        b = ort.InferenceSession({str(quantized)!r}, providers=["CPUExecutionProvider"]).run(None, {{"x": x}})[0].ravel()
        print(f"{{np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)):.5f}}")
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def bench(folder: Path, layers: int, external: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "model.onnx"
    t0 = time.perf_counter()
    generate(model, layers, external)
    size = disk_size(model)
    print(
        f"\n{layers} layers, {'external data' if external else 'inline weights'}: {size / 1e9:.3f} GB on disk "
        f"(protobuf limit 2.147 GB), generated in {time.perf_counter() - t0:.0f} s"
    )
    code, peak, seconds, tail = measured(bare_quantize(model, folder / "bare.onnx", external))
    print(
        f"  baseline quantize_dynamic alone : exit {code}, peak RSS {peak / 1e9:6.2f} GB = {peak / size:4.2f}x size, {seconds:6.1f} s"
    )
    if code:
        print(textwrap.indent(tail, "    "))
    (folder / "bare.onnx").unlink(missing_ok=True)
    (folder / "bare.onnx.data").unlink(missing_ok=True)
    out = folder / "out"
    code, peak, seconds, tail = measured(
        [sys.executable, "-m", "optcli", "run", str(recipe(model, folder)), "-o", str(out), "-q"]
    )
    print(
        f"  optcli run (load, measure, quantize, measure, write): exit {code}, peak RSS {peak / 1e9:6.2f} GB = {peak / size:4.2f}x size, {seconds:6.1f} s"
    )
    if code:
        print(textwrap.indent(tail, "    "))
        return
    final = out / "model.onnx"
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    print(
        f"  output: {', '.join(files)}; {disk_size(final) / 1e9:.3f} GB; cosine vs float on 4 inputs: {check_output(model, final)}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--layers", type=int, default=16, help="4096x4096 MatMul layers for the peak-memory run (16: ~1.07 GB)"
    )
    ap.add_argument("--big", action="store_true", help="also run a 34-layer (~2.28 GB) model through external data")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="optcli_big_"))
    work.mkdir(parents=True, exist_ok=True)
    need = (args.layers + (34 if args.big else 0)) * HIDDEN * HIDDEN * 4 * 2.5
    free = shutil.disk_usage(work).free
    if free < need:
        sys.exit(f"{work}: {free / 1e9:.1f} GB free, this run needs about {need / 1e9:.1f} GB")
    try:
        bench(work / "inline", args.layers, external=False)
        shutil.rmtree(work / "inline")
        if args.big:
            bench(work / "external", 34, external=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
