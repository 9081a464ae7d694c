"""A fine-tune job as one worker needs it (TrainJob: config, student, teacher, data; saved for a worker process and
loaded back there), where the process sits (Env), what the loop returns (TrainResult), and the student's pieces the
pass prepares before training: a replaced head, frozen parameters, train / eval mode."""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from optcli.errors import BadInput
from optcli.passes.finetune.config import Config


@dataclass(frozen=True)
class Env:
    """Where this process sits in a (possibly distributed) run. Default: a single CPU process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class TrainJob:
    config: Config  # config.model_dump(mode="json") is its serializable form
    student: nn.Module
    train: Any  # optcli.data.Dataset
    input_names: list[str]
    eval: Any = None  # optcli.data.Dataset | None
    teacher: nn.Module | None = None
    checkpoint_dir: str | None = None

    def save(self, folder: Path) -> None:
        """Write the job for a worker process: config.json, modules.pt, train.npz, eval.npz."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta: dict[str, Any] = {
            "config": self.config.model_dump(mode="json"),
            "input_names": self.input_names,
            "checkpoint_dir": self.checkpoint_dir,
            "datasets": {},
        }
        for name, data in (("train", self.train), ("eval", self.eval)):
            if data is None:
                continue
            arrays = {f"input/{k}": v for k, v in data.arrays.items()}
            if data.labels is not None:
                arrays["labels"] = data.labels
            np.savez(folder / f"{name}.npz", **arrays)
            meta["datasets"][name] = {
                "batch_size": data.batch_size,
                "metric": data.metric,
                "shuffle": data.shuffle,
                "seed": data.seed,
            }
        # Whole modules, not state_dicts: a pruned student carries mask hooks and may be a shrunk copy of no known class.
        torch.save({"student": self.student, "teacher": self.teacher}, folder / "modules.pt")
        (folder / "config.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, folder: Path) -> TrainJob:
        from optcli.data import Dataset

        folder = Path(folder)
        meta = json.loads((folder / "config.json").read_text())
        datasets = {}
        for name, info in meta["datasets"].items():
            with np.load(folder / f"{name}.npz", allow_pickle=False) as z:
                arrays = {k.removeprefix("input/"): z[k] for k in z.files if k.startswith("input/")}
                labels = z["labels"] if "labels" in z.files else None
            datasets[name] = Dataset(
                name, arrays, labels, info["batch_size"], info["metric"], info["shuffle"], info["seed"]
            )
        # The file was written by save() in the parent process of this same run, so unpickling it is trusted.
        modules = torch.load(folder / "modules.pt", map_location="cpu", weights_only=False)
        return cls(
            config=Config.model_validate(meta["config"]),
            student=modules["student"],
            teacher=modules["teacher"],
            train=datasets["train"],
            eval=datasets.get("eval"),
            input_names=meta["input_names"],
            checkpoint_dir=meta["checkpoint_dir"],
        )


@dataclass
class TrainResult:
    student: nn.Module  # trained, unwrapped, on CPU, in eval mode (best epoch's weights when keep_best)
    epochs: list[dict]  # {"epoch", "loss", "metric", "seconds", "samples_per_s", "lr"}
    best_epoch: int | None
    metric: str | None  # what "metric" measures: data.eval's metric, or "eval_loss" when eval has no labels
    seconds: float
    samples_per_s: float
    steps: int
    stopped_early: bool = False
    resumed_from_epoch: int | None = None
    kept_zero_tensors: int = 0
    notes: list[str] = field(default_factory=list)


def replace_head(module: nn.Module, name: str, num_classes: int) -> nn.Module:
    """Swap the classifier `name` (an nn.Linear) for a fresh one with num_classes outputs."""
    if type(module).__name__ == "GraphModule":
        raise BadInput(
            "head.replace: the model is a torch.export graph, whose layers cannot be swapped; give it as a state_dict + model.factory"
        )
    old = dict(module.named_modules()).get(name)
    if old is None:
        linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
        raise BadInput(
            f"head.replace: the model has no module {name!r} (its Linear layers: {', '.join(linears[-5:]) or 'none'})"
        )
    if not isinstance(old, nn.Linear):
        raise BadInput(f"head.replace: {name!r} is a {type(old).__name__}; give the name of the final nn.Linear")
    parent_name, _, attr = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    setattr(parent, attr, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))
    return module


def freeze(module: nn.Module, patterns: list[str]) -> list[str]:
    """Stop gradients to parameters whose names match any glob; returns the frozen names."""
    frozen = []
    for pattern in patterns:
        hits = [n for n, _ in module.named_parameters() if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise BadInput(
                f"freeze: {pattern!r} matches no parameter (names look like {next(iter(dict(module.named_parameters())), '?')})"
            )
        frozen += hits
    for name, p in module.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    return frozen


def frozen_modules(module: nn.Module) -> list[nn.Module]:
    # A frozen module with BatchNorm must also keep its running statistics, so it stays in eval mode.
    return [
        m
        for m in module.modules()
        if list(m.parameters(recurse=False)) and not any(p.requires_grad for p in m.parameters(recurse=False))
    ]


def set_train_mode(module: nn.Module, frozen: list[nn.Module]) -> None:
    if type(module).__name__ == "GraphModule":
        return  # torch.export graphs are fixed in inference mode (BatchNorm uses its running stats)
    module.train()
    for m in frozen:
        m.eval()


def set_eval_mode(module: nn.Module) -> None:
    if type(module).__name__ != "GraphModule":
        module.eval()


def first_output(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return next(iter(out.values()))
    if hasattr(out, "logits"):
        return out.logits
    return first_output(out[0])


def eval_logits(module: nn.Module, inputs: tuple) -> torch.Tensor:
    """The module's first output for one batch, in eval mode and without gradients (the pass's fit checks)."""
    set_eval_mode(module)
    with torch.no_grad():
        return first_output(module(*inputs))


def to_tensors(feeds: dict, names: list[str], device: torch.device) -> tuple:
    """Arrays keyed by input name -> the model's positional input tensors on device."""
    return tuple(torch.from_numpy(np.ascontiguousarray(feeds[n])).to(device) for n in names)
