"""What every pass is: a typed config, the formats it takes and gives, one apply().

A pass module defines `Config` (a StrictModel with a literal `type`) and a
`PASS = PassSpec(...)`. It imports torch/onnxruntime only inside its functions so
validating a recipe or printing `optcli passes` stays fast.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from optcli.config import StrictModel
from optcli.report.model import StepDetails
from optcli.settings import RunSettings

if TYPE_CHECKING:
    from optcli.model import Model

# The validated recipe (optcli.recipe.Recipe). Not imported: the recipe is built from this registry's configs,
# so the contract stays below it; a pass reads only the sections it documents (data, report, seed).
Recipe = Any

Format = Literal["torch", "onnx"]


class PassConfig(StrictModel):
    type: str


@dataclass
class Context:
    """What a pass may use besides the model: the recipe, the original model, data, a folder of its own."""

    recipe: Recipe
    step_name: str
    step_dir: Path
    reference: Model
    data: Any  # optcli.data.DataCatalog
    seed: int = 0
    log: Callable[[str], None] = print
    # Anything the pass wants in its report step (exporter used, max error, training curve ...).
    details: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # The run's flags (--quiet, --debug, --nproc-per-node ...), typed.
    settings: RunSettings = field(default_factory=RunSettings)
    # The step's folder once finished, set by the runner: a pass that resumes (fine-tune epochs) keeps its state
    # beside it. None outside a run.
    resume_dir: Path | None = None
    # An optcli.progress.Feedback: `with ctx.progress.task("calibration", total=n) as t: ... t.advance()`.
    progress: Any = field(default_factory=lambda: silent_feedback())

    @property
    def quiet(self) -> bool:
        return self.settings.quiet

    def warn(self, message: str) -> None:
        self.warnings.append(f"{self.step_name}: {message}")


@dataclass(frozen=True)
class PassSpec:
    type: str
    config: builtins.type[PassConfig]  # `type` is the field above inside this class body
    consumes: frozenset[str]
    apply: Callable[[Model, Any, Context], Model]
    summary: str
    produces: str | None = None  # None: same format as its input
    # Checks against the whole recipe at load time (data present, options compatible); raises ValueError.
    check: Callable[[Any, Recipe, str], None] | None = None
    # Checks against the loaded original model (validate and run, before any work): (config, recipe, model); raises BadInput.
    preflight: Callable[[Any, Recipe, Model], None] | None = None
    # Cheap passes whose in-memory result (mask hooks, a prune schedule) the written artifact cannot carry: --resume re-runs them.
    rerun_on_resume: bool = False
    # Writes an int8 graph (quantize); a pass that cannot edit one (takes_int8 False) is refused after it at load.
    makes_int8: bool = False
    takes_int8: bool = False
    # What the step's output depends on besides its config and input: a decision made from this machine (the int8
    # types chosen from the CPU). It joins the --resume key, so a step is never reused from a CPU that decides otherwise.
    machine_key: Callable[[Any, Recipe], str] | None = None
    # The keys its step writes under "details" in report.json (a StepDetails model declared beside the pass): the
    # runner validates each step's details with it and `optcli schema --report` publishes it.
    details: builtins.type[StepDetails] = StepDetails  # `type` is the field above inside this class body

    def output_format(self, input_format: str) -> str:
        return self.produces or input_format


# --------------------------------------------------------------------------- hooks a later fine-tune drives
# A torch pass whose effect must hold while a following finetune trains (a gradual prune schedule raising
# masks, weight sharing re-tied after each update) attaches a hook to the module it returns. The fine-tune
# loop calls step() after every optimizer step and finish() after the last one; `done` says whether the
# hook has reached its final state (an epoch is kept as "best" only then). Passes never import each other:
# this contract is the only thing they share.
TRAINING_HOOKS = "optcli_training_hooks"


class TrainingHooks:
    """Every hook attached to one module, driven as one."""

    def __init__(self) -> None:
        self.hooks: list[Any] = []

    def step(self) -> None:
        for hook in self.hooks:
            hook.step()

    def finish(self) -> None:
        for hook in self.hooks:
            hook.finish()

    @property
    def done(self) -> bool:
        return all(getattr(hook, "done", True) for hook in self.hooks)


def attach_training_hook(module: Any, hook: Any) -> None:
    hooks = getattr(module, TRAINING_HOOKS, None)
    if hooks is None:
        hooks = TrainingHooks()
        setattr(module, TRAINING_HOOKS, hooks)
    hooks.hooks.append(hook)


def training_hooks(module: Any) -> TrainingHooks | None:
    """The hooks a fine-tune must drive for this module, or None."""
    hooks = getattr(module, TRAINING_HOOKS, None)
    return hooks if hooks is not None and hooks.hooks else None


def silent_feedback():
    """Progress that shows nothing (a Context built outside a run: tests, scripts)."""
    from optcli.progress import SILENT

    return SILENT


def check_details(spec: PassSpec, name: str, details: dict) -> None:
    """A step's details against its pass type's details model (the report contract): a pass that wrote a declared key
    with the wrong shape is a bug of that pass, said as its failure rather than as a report no reader can trust."""
    from pydantic import ValidationError

    from optcli.errors import PassFailed

    try:
        spec.details.model_validate(details)
    except ValidationError as e:
        where = ".".join(str(x) for x in e.errors()[0]["loc"])
        raise PassFailed(
            name, f"its report details break the contract at details.{where}: {e.errors()[0]['msg']}"
        ) from None
