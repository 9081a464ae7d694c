"""The Python API: what `optcli run`, `validate` and `sweep` do, for scripts and notebooks. The CLI is a thin
layer over these functions.

    from optcli import run
    report = run("recipe.yaml", out="out", overrides={"passes.1.mode": "static"})
    if not report.passed: ...

Errors raise optcli.errors types (BadInput, PassFailed, DiskFull), each carrying the CLI's exit code as
.exit_code; a gate that fails is a result (report.passed False, exit_code 1), not an error. Ctrl-C raises
KeyboardInterrupt, as Python code expects (the CLI maps it to 130).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optcli.report.model import Gate, Paths, Report, Step

__all__ = ["Gate", "Paths", "Report", "Step", "SweepReport", "Variant", "run", "sweep", "validate"]

Overrides = Mapping[str, Any] | list[str] | tuple[str, ...] | None


@dataclass(frozen=True)
class Variant:
    name: str
    values: dict
    size_bytes: int | None
    compressed_bytes: int | None
    latency_ms: float | None
    metric: float | None
    passed: bool
    pareto: bool
    best: bool
    error: str | None
    report: Path


@dataclass(frozen=True)
class SweepReport:
    """A sweep's result: the variants (grid values, figures, gates), the Pareto front, the best, and sweep.json."""

    variants: list[Variant]
    pareto: list[str]
    best: str | None
    passed: bool
    out: Path
    data: dict

    @property
    def exit_code(self) -> int:
        from optcli.verbs.sweeper import exit_code

        return exit_code(self.data)

    @classmethod
    def from_dict(cls, data: dict, out: Path) -> SweepReport:
        out = Path(out)
        variants = [
            Variant(
                **{k: r.get(k) for k in Variant.__dataclass_fields__ if k != "report"},
                report=out / r["name"] / "report.json",
            )
            for r in data["variants"]
        ]
        return cls(variants, data["pareto"], data["best"], data["passed"], out, data)


def set_items(overrides: Overrides) -> list[str]:
    """{"passes.1.mode": "static"} or ["passes.1.mode=static"] -> the --set items load_recipe takes."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]  # JSON is YAML: read back exactly
    return [str(o) for o in overrides]


def validate(recipe: str | Path, overrides: Overrides = None, trust_pickle: bool = False) -> dict:
    """Check a recipe and open its model and data files; return the resolved recipe (defaults filled in)."""
    from optcli.recipe import load_recipe
    from optcli.runner import preflight

    rec = load_recipe(recipe, overrides=set_items(overrides))
    preflight(rec, trust_pickle)
    return rec.model_dump(mode="json")


def run(
    recipe: str | Path,
    out: str | Path,
    overrides: Overrides = None,
    *,
    overwrite: bool = False,
    resume: bool = False,
    quiet: bool = True,
    trust_pickle: bool = False,
    log: Callable[[str], None] | None = None,
    progress=None,
    distributed: dict | None = None,
    debug: bool = False,
) -> Report:
    """Apply the recipe's passes; write the artifact and report.json|md|html to OUT; return the report.

    log: called with each progress line; progress: a report.terminal.Feedback (default: silent)."""
    from optcli.passes.finetune.launch import cli_overrides
    from optcli.recipe import load_recipe
    from optcli.runner import RunOptions, run_report
    from optcli.settings import RunSettings

    rec = load_recipe(recipe, overrides=set_items(overrides))
    launch = cli_overrides(rec, **(distributed or {}))
    settings = RunSettings(
        overwrite=overwrite, resume=resume, quiet=quiet, trust_pickle=trust_pickle, debug=debug, distributed=launch
    )
    options = RunOptions(
        out=Path(out),
        settings=settings,
        log=log or (lambda m: None),
        progress=progress,
        recipe_path=Path(recipe),
    )
    return run_report(rec, options)


def sweep(
    recipe: str | Path,
    out: str | Path,
    grid: Mapping[str, list] | list[str] | None = None,
    overrides: Overrides = None,
    *,
    jobs: int = 1,
    overwrite: bool = False,
    resume: bool = False,
    quiet: bool = True,
    trust_pickle: bool = False,
    log: Callable[[str], None] | None = None,
    progress=None,
) -> SweepReport:
    """Run every combination of the grid (merged over the recipe's sweep: block) as its own run under OUT."""
    from optcli.verbs.sweeper import SweepOptions, sweep_recipe

    items = [f"{k}={json.dumps(list(v))}" for k, v in grid.items()] if isinstance(grid, Mapping) else list(grid or [])
    options = SweepOptions(
        out=Path(out),
        grid=items,
        overrides=set_items(overrides),
        jobs=jobs,
        overwrite=overwrite,
        resume=resume,
        quiet=quiet,
        trust_pickle=trust_pickle,
        log=log or (lambda m: None),
        progress=progress,
    )
    return SweepReport.from_dict(sweep_recipe(Path(recipe), options), Path(out))
