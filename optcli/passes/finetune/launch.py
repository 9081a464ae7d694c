"""Retraining on several GPUs or machines through torch's own launcher (torchrun's elastic agent) and DDP.

    finetune: {distributed: {nproc_per_node: 2}}       # or: optcli run r.yaml -o out --nproc-per-node 2

`run_training(job, config, ctx)` is what the finetune pass calls. One worker without restarts trains in
this process. Otherwise it writes the job to the step folder, starts the workers with
torch.distributed.launcher.api.elastic_launch (the in-process API behind `torchrun`: c10d rendezvous,
restarts, error files, signal forwarding) and each worker runs `worker`: bind the device of its
LOCAL_RANK, init_process_group, rebuild the job, call loop.train (which shards the data
with DistributedSampler and wraps the student in DistributedDataParallel). Rank 0 alone writes
checkpoints and logs; the trained student comes back to this process as rank 0's return value.

Multi-node is the same command on every node, as with torchrun: nnodes, node_rank and an
rdzv_endpoint (host:port on node 0) reachable by all.

Why N workers with batch b train like one worker with batch N*b: DistributedSampler gives rank r the
indices r::N of one permutation seeded by (seed, epoch), so the k-th batches of all ranks together are
exactly slice k of N*b of that permutation, which one worker's sampler (N=1) takes as its k-th batch;
DDP averages the ranks' gradients of their mean losses, which is the gradient of the mean loss over
the N*b samples (when N*b divides the data; otherwise the sampler pads ranks with repeated samples).
What still differs is BatchNorm in train mode (statistics over b, not N*b): on CUDA
it becomes SyncBatchNorm; on CPU torch has none (see to_sync_batchnorm). The tests check this with a
BatchNorm-free model: weights equal to 1e-5.

This module imports torch inside functions only: `optcli run` reads cli_overrides from it before any
model is loaded, and a recipe without a finetune pass never needs torch's distributed stack.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from optcli.errors import BadInput, PassFailed, first_line
from optcli.passes.finetune.config import DistributedConfig, check_settings

# A worker whose peer died sees a socket error within milliseconds. Before it exits it waits this
# long, so the agent reports the worker that really failed (the root cause), not its victim.
PEER_LOSS_GRACE_S = 3.0
_PEER_LOSS = re.compile(r"connection (closed|reset)|broken pipe|remote process exited|peer|socket", re.IGNORECASE)


def with_overrides(
    config: DistributedConfig,
    overrides: dict | None,
    where: str = "--nproc-per-node/--nnodes/--node-rank/--rdzv-endpoint",
) -> DistributedConfig:
    """The recipe's distributed block with `optcli run` flags on top (the flags win)."""
    from pydantic import ValidationError

    if not overrides:
        return config
    try:
        return DistributedConfig.model_validate({**config.model_dump(), **overrides})
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        raise BadInput(
            f"{where}: {'.'.join(map(str, err['loc'])) or 'distributed'}: {err['msg'].removeprefix('Value error, ')}"
        ) from None


def cli_overrides(recipe, **flags) -> dict:
    """`optcli run` flags -> overrides of every finetune pass's distributed block, checked now (exit 2), not mid-run."""
    given = {k: v for k, v in flags.items() if v is not None}
    if not given:
        return {}
    if "nproc_per_node" in given and given["nproc_per_node"] != "auto":
        if not str(given["nproc_per_node"]).isdigit():
            raise BadInput(f"--nproc-per-node {given['nproc_per_node']!r}: give a number of workers or auto")
        given["nproc_per_node"] = int(given["nproc_per_node"])
    finetunes = [(i, p) for i, p in enumerate(recipe.passes) if p.type == "finetune"]
    flag_names = ", ".join("--" + k.replace("_", "-") for k in given)
    if not finetunes:
        raise BadInput(
            f"{flag_names}: the recipe has no finetune pass, the only pass that runs workers; drop the flag(s) or add a finetune pass"
        )
    for i, p in finetunes:
        merged = with_overrides(p.distributed, given, flag_names)
        try:
            check_settings(merged, p.device, p.amp)
        except ValueError as e:
            raise BadInput(f"{flag_names} with passes[{i}] (finetune): {e}") from None
    return given


# --------------------------------------------------------------------------- selection (pure, unit-tested)


def nproc_for(config: DistributedConfig, device: str, cuda_count: int) -> int:
    """Workers on this node. `auto` is one per GPU; on CPU one process already uses every core through
    intra-op threads, so auto means 1 there (ask for N explicitly to shard a CPU retrain)."""
    if config.nproc_per_node != "auto":
        return config.nproc_per_node
    if device == "cpu" or cuda_count == 0:
        return 1
    if re.fullmatch(r"cuda:\d+", device):
        return 1
    return cuda_count


def device_for(setting: str, local_rank: int, cuda_count: int, nproc: int = 1) -> str:
    """The torch device of one worker: worker k on a node binds GPU k (LOCAL_RANK), as torchrun expects."""
    if setting == "cpu" or (setting == "auto" and cuda_count == 0):
        return "cpu"
    if cuda_count == 0:
        raise BadInput(
            f"device {setting}: torch sees no CUDA GPU here (torch.cuda.is_available() is False); use device: cpu or auto"
        )
    if setting.startswith("cuda:"):
        index = int(setting.split(":")[1])
        if nproc > 1:
            raise BadInput(
                f"device {setting} names one GPU but {nproc} workers run per node; use device: cuda (worker k takes GPU k)"
            )
        if index >= cuda_count:
            raise BadInput(f"device {setting}: only {cuda_count} GPU(s) visible (cuda:0..cuda:{cuda_count - 1})")
        return setting
    if local_rank >= cuda_count:
        raise BadInput(
            f"{nproc} workers per node but only {cuda_count} GPU(s) visible; lower nproc_per_node or use auto"
        )
    return f"cuda:{local_rank}"


def backend_for(setting: str, device: str) -> str:
    """NCCL moves CUDA tensors between GPUs; gloo is the backend that works on CPU tensors."""
    kind = device.split(":")[0]
    if setting == "auto":
        return "nccl" if kind == "cuda" else "gloo"
    if setting == "nccl" and kind != "cuda":
        raise BadInput("distributed.backend nccl needs CUDA devices; use backend: auto (gloo on CPU) or device: cuda")
    return setting


def scaled_lr(lr: float, world_size: int, rule: str) -> float:
    """linear: lr x world size (Goyal et al. 2017), since the global batch grows with the workers."""
    return lr * world_size if rule == "linear" else lr


def to_sync_batchnorm(module, device: str):
    """Global-batch BatchNorm statistics across workers on CUDA, so N workers with batch b train like
    one worker with batch N*b. torch's SyncBatchNorm refuses CPU tensors, so on CPU (gloo) every worker
    normalizes with the statistics of its own slice: the usual DDP behaviour, noted in the report.
    Returns (module, the original BatchNorm classes by name, to put back after training)."""
    import torch

    if not device.startswith("cuda"):
        return module, {}
    classes = {n: type(m) for n, m in module.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module), classes


def from_sync_batchnorm(module, classes: dict):
    """Put the original BatchNorm classes back (same parameters and buffers) so the artifact exports as before."""
    import torch

    if not classes:
        return module

    def plain(name: str, sync):
        bn = classes[name](sync.num_features, sync.eps, sync.momentum, sync.affine, sync.track_running_stats)
        bn.load_state_dict(sync.state_dict())
        return bn.train(sync.training)

    if isinstance(module, torch.nn.SyncBatchNorm):
        return plain("", module)
    for name, child in list(module.named_modules()):
        if isinstance(child, torch.nn.SyncBatchNorm):
            parent_name, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, attr, plain(name, child))
    return module


def has_batchnorm(module) -> bool:
    import torch

    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())


# --------------------------------------------------------------------------- the finetune pass's entry point


def run_training(job, config, ctx) -> tuple[Any, dict]:
    """Train `job` with the finetune config's device / amp / distributed settings.

    Returns (TrainResult, the report's world figures). One worker trains here; more go through the launcher.
    """
    import torch

    from optcli.passes.finetune.loop import Env, train

    dist_cfg = with_overrides(config.distributed, ctx.options.get("distributed"))
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = config.device if config.device != "auto" else ("cuda" if cuda_count else "cpu")
    nproc = nproc_for(dist_cfg, device, cuda_count)
    if config.amp != "none" and device == "cpu":
        ctx.warn(f"amp {config.amp} not used: torch sees no CUDA device, so training runs in fp32 on CPU")
    world = nproc * dist_cfg.nnodes
    if config.scale_lr == "linear" and world > 1:
        job.config = job.config.model_copy(update={"lr": scaled_lr(job.config.lr, world, config.scale_lr)})
    if world == 1 and dist_cfg.max_restarts == 0:  # nothing to launch: train in this process
        dev = device_for(device, 0, cuda_count, 1)
        if dev.startswith("cuda"):
            torch.cuda.set_device(dev)
        result = train(job, Env(device=dev), progress=False if ctx.quiet else ctx.progress, log=ctx.log)
        return result, _world_figures(result, 1, 1, None, [_device_name(dev)], config, job)
    if has_batchnorm(job.student) and device == "cpu":
        ctx.warn(
            f"BatchNorm statistics are per worker on CPU (batch {job.config.batch_size or job.train.batch_size} each, not the global batch): "
            "torch's SyncBatchNorm needs CUDA, so the result differs slightly from one worker"
        )
    settings = {
        "device": device,
        "backend": dist_cfg.backend,
        "quiet": ctx.quiet,
        "debug": bool(ctx.options.get("debug")),
    }
    result, info = launch(job, dist_cfg, nproc, settings, ctx.step_dir, ctx.step_name, ctx.log)
    return result, _world_figures(result, world, nproc, info["backend"], info["devices"], config, job)


def _world_figures(result, world: int, nproc: int, backend: str | None, devices: list[str], config, job) -> dict:
    per_worker = job.config.batch_size or job.train.batch_size
    return {
        "world_size": world,
        "nproc_per_node": nproc,
        "backend": backend,
        "devices": devices,
        "batch_per_worker": per_worker,
        "global_batch": per_worker * world,
        "lr": job.config.lr,
        "scale_lr": config.scale_lr,
        "amp": config.amp,
        "samples_per_s_per_worker": round(result.samples_per_s / world, 1),
    }


def _device_name(device: str) -> str:
    import platform

    import torch

    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    threads = torch.get_num_threads()
    return f"cpu ({platform.machine()}, {threads} thread{'s' if threads != 1 else ''})"


# --------------------------------------------------------------------------- launcher (runs in the optcli process)


def launch(
    job, config: DistributedConfig, nproc: int, settings: dict, step_dir: Path, step_name: str, log
) -> tuple[Any, dict]:
    """Start nproc workers on this node with torch's elastic agent; return rank 0's (TrainResult, info).

    A worker that raises or dies ends the run with PassFailed naming its rank and the root cause
    (read from the agent's error file); with max_restarts > 0 the agent restarts every worker and
    they resume from the last epoch checkpoint. Ctrl-C / SIGTERM stop every worker before returning.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    job_dir = Path(step_dir) / "distributed-job"
    job.save(job_dir)
    logs = Path(tempfile.mkdtemp(prefix="optcli-elastic-"))  # the agent's error files: outside the output folder
    single = config.nnodes == 1
    launch_config = LaunchConfig(
        min_nodes=config.nnodes,
        max_nodes=config.nnodes,
        nproc_per_node=nproc,
        # One machine: torchrun --standalone's choice, a c10d store on a free local port and a fresh id.
        rdzv_backend=config.rdzv_backend,
        rdzv_endpoint=config.rdzv_endpoint or "localhost:0",
        run_id=config.rdzv_id if not single else uuid.uuid4().hex,
        rdzv_configs={
            "join_timeout": config.rdzv_timeout,
            **({"rank": config.node_rank} if config.rdzv_backend == "static" else {}),
        },
        max_restarts=config.max_restarts,
        start_method="spawn",
        # Only local rank 0 keeps its console; the others' errors reach us through their error files.
        logs_specs=DefaultLogsSpecs(log_dir=str(logs), local_ranks_filter=None if settings["debug"] else {0}),
    )
    log(
        f"{step_name}: {nproc * config.nnodes} workers ({nproc} on this node x {config.nnodes} node(s)), torch elastic launch"
    )
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}
    try:
        with _quiet_agent(settings["debug"]), _fresh_store_per_attempt():
            results = elastic_launch(launch_config, worker)(str(job_dir), settings)
    except ChildFailedError as e:
        raise PassFailed(step_name, failure_message(e, config.max_restarts)) from None
    except SignalException as e:
        # The agent has already stopped every worker (SIGTERM, then SIGKILL after its timeout).
        raise KeyboardInterrupt(str(e)) from None
    except RendezvousError as e:
        where = config.rdzv_endpoint or "this machine"
        why = type(e).__name__ + (f": {first_line(e)}" if first_line(e) else "")
        raise PassFailed(
            step_name,
            f"rendezvous at {where} failed ({why}); "
            f"check that all {config.nnodes} node(s) run the same command and can reach rdzv_endpoint",
        ) from None
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        shutil.rmtree(job_dir, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)
    # Every node's local rank 0 returns its copy (DDP keeps replicas equal), so each node can finish the recipe.
    returned = [results[r] for r in sorted(results) if results[r] is not None]
    if not returned:
        raise PassFailed(step_name, "no worker returned the trained model")
    return returned[0]


def failure_message(error, max_restarts: int) -> str:
    """One line from torch's ChildFailedError: which rank failed first, and why."""
    rank, failure = error.get_first_failure()
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    if not message or message.startswith("To enable traceback"):
        message = f"exited with code {failure.exitcode}"
    message = first_line(message, 400)
    if failure.exitcode < 0:
        message = f"killed by signal {-failure.exitcode} ({failure.signal_name()})"
    attempts = f" after {max_restarts} restart(s)" if max_restarts else ""
    return f"worker rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) failed{attempts}: {message}"


@contextmanager
def _fresh_store_per_attempt():
    # By default the c10d rendezvous shares one TCP store with the workers across restarts, and the
    # restarted workers' gloo then reads the dead workers' addresses from it (connectFullMesh: connection
    # refused). torch's own opt-out gives each rendezvous round its own store, so max_restarts works.
    previous = os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE")
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
        else:
            os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = previous


@contextmanager
def _quiet_agent(debug: bool):
    # The agent logs every failure with the worker's traceback; the user gets one line from us instead.
    prefixes = ("torch.distributed.elastic", "torch.distributed.launcher", "torch.multiprocessing")
    # torch gives each of these module loggers its own level, so each one is quietened, not just the parents.
    names = [n for n in list(logging.root.manager.loggerDict) if n.startswith(prefixes)] + list(prefixes)
    previous = {n: logging.getLogger(n).level for n in names}
    if not debug:
        for n in names:
            logging.getLogger(n).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for n, level in previous.items():
            logging.getLogger(n).setLevel(level)


# --------------------------------------------------------------------------- worker (runs in each spawned process)


def worker_env() -> dict:
    """This worker's place, from the variables the elastic agent sets (as torchrun does)."""
    env = os.environ
    return {
        "rank": int(env["RANK"]),
        "world_size": int(env["WORLD_SIZE"]),
        "local_rank": int(env["LOCAL_RANK"]),
        "local_world_size": int(env["LOCAL_WORLD_SIZE"]),
        "restart": int(env.get("TORCHELASTIC_RESTART_COUNT", "0")),
    }


def _die_with_parent() -> None:
    """Linux: end this worker when the optcli process dies, even by SIGKILL (out of memory, kill -9).
    Ctrl-C and SIGTERM are handled by the agent; this covers the death no handler sees, which would
    otherwise leave workers training, or waiting forever to hand back their result."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the line above: nobody will collect this worker
        os._exit(1)


def _rank0_checkpoint(job, rank: int):
    """Make every rank resume from rank 0's latest epoch checkpoint.

    Rank 0 alone writes checkpoints, into its node's output folder. A rank on another node (its own -o)
    would see none there, or a stale one, start from another epoch than rank 0, and the collectives
    would mismatch. So rank 0 broadcasts its latest checkpoint; a rank that cannot see that same file
    reads it from a private temporary folder (never the output folder). Returns that folder, or None.
    """
    import torch.distributed as dist

    from optcli.passes.finetune.checkpoint import latest_checkpoint

    folder = Path(job.checkpoint_dir) if job.checkpoint_dir else None
    payload: list = [None]
    if rank == 0 and folder is not None:
        latest = latest_checkpoint(folder)
        payload = [(latest.name, latest.read_bytes()) if latest is not None else None]
    dist.broadcast_object_list(payload, src=0)
    if rank == 0 or folder is None:
        return None
    shared = payload[0]
    if shared is not None and (folder / shared[0]).is_file() and (folder / shared[0]).read_bytes() == shared[1]:
        return None  # rank 0's node, or a shared filesystem
    if shared is None and latest_checkpoint(folder) is None:
        return None
    private = tempfile.TemporaryDirectory(prefix="optcli-ckpt-")
    if shared is not None:
        (Path(private.name) / shared[0]).write_bytes(shared[1])
    job.checkpoint_dir = private.name
    return private


def worker(job_dir: str, settings: dict):
    """One worker: bind the device, join the process group, train, return rank 0's result.

    The agent wraps this in torch's @record, so an exception lands in the worker's error file.
    """
    import torch
    import torch.distributed as dist

    from optcli.passes.finetune.loop import Env, TrainJob, train

    _die_with_parent()
    place = worker_env()
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = device_for(settings["device"], place["local_rank"], cuda_count, place["local_world_size"])
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    else:
        # torchrun would set OMP_NUM_THREADS=1; share the cores instead so N workers never oversubscribe them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // place["local_world_size"]))
    backend = backend_for(settings["backend"], device)
    dist.init_process_group(backend, device_id=torch.device(device) if backend == "nccl" else None)
    private = None
    try:
        job = TrainJob.load(Path(job_dir))
        private = _rank0_checkpoint(job, place["rank"])
        job.student, bn_classes = to_sync_batchnorm(job.student, device)
        env = Env(rank=place["rank"], world_size=place["world_size"], local_rank=place["local_rank"], device=device)
        main = env.is_main and not settings["quiet"]
        log = (lambda m: print(f"optcli {m}", file=sys.stderr, flush=True)) if main else (lambda m: None)
        if place["restart"] and main:
            log(f"restart {place['restart']}: workers resume from the last epoch checkpoint")
        try:
            result = train(job, env, progress=main, log=log)
        except Exception as e:
            if _PEER_LOSS.search(str(e)):
                time.sleep(PEER_LOSS_GRACE_S)
            raise
        result.student = from_sync_batchnorm(result.student, bn_classes)
        devices = [None] * place["world_size"]
        dist.all_gather_object(devices, _device_name(device))
    finally:
        dist.destroy_process_group()
        if private is not None:
            private.cleanup()
    if place["local_rank"] != 0:
        return None
    return result, {"backend": backend, "devices": devices}
