"""Write the torch model in a layout users keep using: `format: hf` is a Hugging Face folder (save_pretrained)."""

from __future__ import annotations

from typing import Literal

from optcli.passes.base import Context, PassConfig, PassSpec
from optcli.report.model import StepDetails


class Config(PassConfig):
    type: Literal["save"] = "save"
    format: Literal["hf"] = "hf"


def check(config: Config, recipe, fmt: str) -> None:
    if not recipe.model.path.is_dir():
        raise ValueError("format: hf writes a Hugging Face folder; model.path must be one (config.json + weights)")


def apply(model, config: Config, ctx: Context):
    from optcli.hf.save import save_folder

    target = save_folder(model.module, ctx.recipe.model.path, ctx.step_dir / ctx.recipe.model.path.name)
    ctx.details["layout"] = "save_pretrained (model.safetensors + config.json + tokenizer)"
    return model.with_(path=target)


class SaveDetails(StepDetails):
    """What a save step writes under "details" in report.json (registered below as PassSpec.details)."""

    layout: str | None = None


PASS = PassSpec(
    type="save",
    config=Config,
    consumes=frozenset({"torch"}),
    apply=apply,
    check=check,
    summary="write the torch model back as a Hugging Face folder (format: hf, save_pretrained layout)",
    details=SaveDetails,
)
