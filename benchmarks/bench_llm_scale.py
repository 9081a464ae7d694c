"""Real-size decoders on this machine: a 1.5B (or 3B) Qwen2 folder to an int4 decoder, peak RSS against its weights.

    python benchmarks/bench_llm_scale.py --size 1.5b          # folder written once under the cache, then exported
    python benchmarks/bench_llm_scale.py --size 3b --skip-generate

The folder is random-initialised (nothing can be downloaded) with the real dimensions of Qwen2-1.5B or
Qwen2.5-3B, bf16 safetensors, written by save_pretrained in 300 MB shards (each shard is serialised alone, so the
weights are never held twice); a BPE tokenizer of its own. Each stage runs in a child process whose peak resident
memory (VmHWM, from the kernel) is reported: writing the folder, the int4 export (onnxruntime-genai's model
builder, -p int4 -e cpu, block 32, through optcli.llm.export), generating 16 tokens from the int4 folder.
Before the export, optcli.llm.memory's estimate says whether it fits in the memory available now; a refusal is
reported as such (the exact reason, no OOM kill).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE.parent), os.environ.get("PYTHONPATH")) if p)

SIZES = {
    # Qwen2-0.5B, Qwen2-1.5B and Qwen2.5-3B config.json dimensions (tied embeddings, 151936-token vocabulary).
    "0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14},
    "1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12},
    "3b": {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16},
    "smoke": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    },  # the script
}


def write_folder(size: str, folder: str) -> None:
    """Child: the random bf16 folder (built in bf16 directly: no fp32 copy), saved in small shards."""
    import torch
    from hf_models import bpe_tokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        **SIZES[size],
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        rope_theta=1_000_000.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = Qwen2ForCausalLM(config).eval()
    model.save_pretrained(folder, max_shard_size="300MB")
    bpe_tokenizer()[0].save_pretrained(folder)


def export_watched(folder: Path, out: Path, limit: int) -> dict:
    """The builder's int4 export (-p int4 -e cpu, block 32) in a child whose resident memory is read every 0.2 s:
    past `limit` it is stopped (on a shared 24 GB machine the OOM killer would pick a neighbour), and the peak
    where it stopped is reported. The child's own VmHWM is the peak when it finishes."""
    import tempfile

    from optcli.llm.export import BUILDER, OFFLINE_ENV

    cache = out / ".builder-cache"
    args = ["-i", str(folder), "-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(cache)]
    args += ["--extra_options", "block_size=32"]
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        peak_file = Path(work) / "peak"
        command = [sys.executable, "-m", "optcli.llm.child", str(peak_file), BUILDER, *args]
        # The builder's progress bars go to a file: a pipe nobody reads while polling fills up and blocks it.
        log = (Path(work) / "log").open("w+")
        proc = subprocess.Popen(command, stdout=log, stderr=log, text=True, env={**os.environ, **OFFLINE_ENV})
        watched, stopped = 0, False
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                rss = next(int(x.split()[1]) * 1024 for x in status.read_text().splitlines() if x.startswith("VmRSS"))
            except (OSError, StopIteration):
                rss = 0
            watched = max(watched, rss)
            if rss > limit:
                proc.kill()
                stopped = True
                break
            time.sleep(0.2)
        proc.wait()
        log.seek(0)
        err = log.read()[-20000:]
        log.close()
        said = peak_file.read_text().strip() if peak_file.is_file() else ""
    shutil.rmtree(cache, ignore_errors=True)
    seconds = round(time.perf_counter() - t0, 1)
    if stopped:
        return {"finished": False, "stopped_at_rss_bytes": watched, "limit_bytes": limit, "seconds": seconds}
    if proc.returncode != 0:
        lines = [line for line in err.splitlines() if line.strip()]
        return {"finished": False, "failed": lines[-1] if lines else f"exit {proc.returncode}", "seconds": seconds}
    files = sum(f.stat().st_size for f in out.iterdir() if f.name.startswith("model.onnx"))
    peak = int(said) if said.isdigit() else watched
    return {"finished": True, "peak_rss_bytes": peak, "seconds": seconds, "decoder_bytes": files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1.5b")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("OPTCLI_BENCH_CACHE", "/tmp/optcli-bench")))
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument(
        "--rss-limit-gb", type=float, default=12.0, help="stop the export past this resident memory (shared machine)"
    )
    parser.add_argument("--child-write", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_write:
        write_folder(*args.child_write)
        return
    from optcli.llm.memory import available_memory, export_need, parameter_count, run_child

    folder = args.cache / f"qwen2-{args.size}-random"
    out: dict = {"size": args.size, "folder": str(folder)}
    if not (folder / "config.json").is_file():
        t0 = time.perf_counter()
        env = {"PYTHONPATH": os.pathsep.join([str(HERE), os.environ["PYTHONPATH"]])}
        result = run_child("bench_llm_scale", ["--child-write", args.size, str(folder)], env=env)
        if result.returncode != 0:
            raise SystemExit(f"writing the folder failed: {result.stderr.strip().splitlines()[-1:]}")
        out["write_folder"] = {"peak_rss_bytes": result.peak_rss_bytes, "seconds": round(time.perf_counter() - t0, 1)}
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    out.update(parameters=parameter_count(folder), weights_bytes=weights)
    out["available_before_export"] = available_memory()
    out["builder_estimate_bytes"] = export_need(folder)
    decoder = args.cache / f"qwen2-{args.size}-int4"
    shutil.rmtree(decoder, ignore_errors=True)
    out["int4_export"] = export_watched(folder, decoder, int(args.rss_limit_gb * 2**30))
    if "peak_rss_bytes" in out["int4_export"]:
        out["int4_export"]["peak_over_weights"] = round(out["int4_export"]["peak_rss_bytes"] / weights, 2)
    if not args.skip_generate and out["int4_export"].get("finished"):
        from optcli.llm.generate import measure_in_child

        row = measure_in_child(decoder, [list(range(1, 33))], 16, 2, args.cache)
        out["generate"] = {k: row[k] for k in ("ttft_ms", "decode_tokens_per_s", "peak_rss_bytes")}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
