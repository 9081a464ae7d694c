"""A sweep's search space: recipe keys and the values each may take, read from YAML (--space FILE) and --grid.

    passes.1.lr: {low: 1.0e-5, high: 1.0e-2, log: true}   # a float range (log-uniform)
    passes.1.epochs: {low: 2, high: 12}                   # integers: both ends are integers (step: 1 unless given)
    passes.0.sparsity: {low: 0.3, high: 0.8, step: 0.1}   # a float range on a grid
    passes.3.mode: [dynamic, static]                      # choices (plain YAML values)
    passes.3: [true, false]                               # pass 3 kept or dropped; its own keys apply when kept

A key is a recipe path as --set takes it. A trial's values become --set items (values_to_overrides), so a trial
is the recipe with those values, validated like any recipe.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from optcli.errors import BadInput

PASS_SWITCH = re.compile(r"passes\.(\d+)")
GRID_MAX = 1024  # the most points a grid sampler enumerates from a range with a step
_RANGE_KEYS = {"low", "high", "log", "step"}


@dataclass(frozen=True)
class Param:
    """One recipe key of the space: a range (float or int) or a list of choices."""

    key: str
    kind: str  # "float" | "int" | "choice"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()

    @property
    def switch(self) -> str | None:
        """The `passes.N` key this one depends on (its pass may be dropped), else None."""
        m = re.match(r"(passes\.\d+)\.", self.key)
        return m[1] if m else None

    def bounds(self) -> tuple[float, float]:
        """low and high of a range: parse_param sets both for every float or int key (only choices have neither)."""
        assert self.low is not None and self.high is not None, f"sweep space {self.key}: a {self.kind} range unset"
        return self.low, self.high

    def distribution(self):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "choice":
            return CategoricalDistribution(self.choices)
        low, high = self.bounds()
        if self.kind == "int":
            return IntDistribution(int(low), int(high), log=self.log, step=int(self.step or 1))
        return FloatDistribution(low, high, log=self.log, step=self.step)

    def grid_values(self) -> list:
        """Every value, for the grid sampler; a float range needs a step."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "float" and self.step is None:
            raise BadInput(
                f"sweep space {self.key}: the grid sampler needs a list of values or a step for a float range "
                f"(e.g. {{low: {self.low}, high: {self.high}, step: ...}}), or choose --sampler tpe"
            )
        low, high = self.bounds()
        step = self.step or 1
        n = math.floor((high - low) / step + 1e-9) + 1
        if n > GRID_MAX:
            raise BadInput(f"sweep space {self.key}: {n} grid points (more than {GRID_MAX}); give a larger step")
        values = [low + i * step for i in range(n)]
        return [int(v) for v in values] if self.kind == "int" else [round(v, 12) for v in values]

    def edge_values(self) -> list:
        """The values that prove the key is valid in the recipe: both ends of a range, every choice."""
        if self.kind == "choice":
            return list(self.choices)
        low, high = self.bounds()
        return [int(low), int(high)] if self.kind == "int" else [low, high]


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _plain(v) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def parse_param(key: str, spec: Any) -> Param:
    """One entry of the space; every mistake is a BadInput naming the key and how to write it."""
    if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][\w]*(\.\w+)+", key):
        raise BadInput(f"sweep space key {key!r}: write a recipe path as --set takes it, e.g. passes.1.lr")
    if isinstance(spec, dict) and set(spec) == {"choices"}:
        spec = spec["choices"]
    if isinstance(spec, list):
        if not spec:
            raise BadInput(f"sweep space {key}: give one choice or more")
        if not all(_plain(v) for v in spec):
            raise BadInput(f"sweep space {key}: choices must be plain values (numbers, strings, true/false, null)")
        if len(set(map(json.dumps, spec))) < len(spec):
            raise BadInput(f"sweep space {key}: a choice is listed twice")
        return Param(key, "choice", choices=tuple(spec))
    if isinstance(spec, dict):
        unknown = set(spec) - _RANGE_KEYS
        if unknown or not {"low", "high"} <= set(spec):
            raise BadInput(
                f"sweep space {key}: write a list of choices or a range {{low: L, high: H, log: true, step: S}}"
                + (f" (unknown: {', '.join(sorted(map(str, unknown)))})" if unknown else "")
            )
        low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
        if not (_number(low) and _number(high)) or low > high:
            raise BadInput(f"sweep space {key}: low and high must be numbers with low <= high (got {low}, {high})")
        if not isinstance(log, bool):
            raise BadInput(f"sweep space {key}: log is true or false")
        if step is not None and (not _number(step) or step <= 0):
            raise BadInput(f"sweep space {key}: step must be a number above 0")
        if log and (low <= 0 or step is not None):
            raise BadInput(f"sweep space {key}: a log range needs low > 0 and no step")
        is_int = isinstance(low, int) and isinstance(high, int) and (step is None or isinstance(step, int))
        return Param(key, "int" if is_int else "float", float(low), float(high), log, step)
    raise BadInput(f"sweep space {key}: write a list of choices or a range {{low: L, high: H}} (got {spec!r})")


def parse_space(data: Any, source: str = "sweep space") -> list[Param]:
    if data is None:
        return []
    if not isinstance(data, dict):
        raise BadInput(f"{source}: write a mapping of recipe keys to ranges or choices (e.g. passes.1.lr: [0.001])")
    return [parse_param(k, v) for k, v in data.items()]


def load_space(path: Path | None, grid: dict[str, list]) -> list[Param]:
    """The space from a YAML file (mapping, or its `space:` block) with --grid keys added as choices (last wins)."""
    params: dict[str, Param] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise BadInput(f"--space {path}: cannot read it ({e.strerror or e})") from None
        except yaml.YAMLError as e:
            raise BadInput(f"--space {path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if isinstance(data, dict) and set(data) == {"space"}:
            data = data["space"]
        params.update({p.key: p for p in parse_space(data, f"--space {path}")})
    for key, values in grid.items():
        params[key] = parse_param(key, list(values))
    for p in params.values():  # a switch's own keys must name a switch that can drop the pass
        s = params.get(p.switch or "")
        if s is not None and not (s.kind == "choice" and set(map(type, s.choices)) == {bool}):
            raise BadInput(f"sweep space {s.key}: a whole pass takes [true, false] (kept or dropped)")
    return list(params.values())


def grid_space(params: list[Param]) -> dict[str, list]:
    return {p.key: p.grid_values() for p in params}


def grid_size(params: list[Param]) -> int:
    return math.prod(len(v) for v in grid_space(params).values())


def suggest(trial, params: list[Param]) -> dict[str, Any]:
    """The trial's values, asked from the sampler in space order; a dropped pass's own keys are not asked
    (define-by-run: TPE and NSGA-II learn the conditional space), except by the grid sampler, which needs all."""
    values: dict[str, Any] = {}
    grid = type(trial.study.sampler).__name__ == "GridSampler"
    for p in params:
        if not grid and p.switch is not None and values.get(p.switch) is False:
            continue
        values[p.key] = _ask(trial, p)
    return values


def _ask(trial, p: Param):
    if p.kind == "choice":
        return trial.suggest_categorical(p.key, list(p.choices))
    low, high = p.bounds()
    if p.kind == "int":
        return trial.suggest_int(p.key, int(low), int(high), step=int(p.step or 1), log=p.log)
    return trial.suggest_float(p.key, low, high, step=p.step, log=p.log)


def values_to_overrides(values: dict[str, Any]) -> list[str]:
    """--set items: JSON is YAML, so each value reads back exactly; passes.N false drops pass N (null)."""
    dropped = {k for k, v in values.items() if PASS_SWITCH.fullmatch(k) and v is False}
    items = []
    for key, value in values.items():
        if PASS_SWITCH.fullmatch(key):
            if value is False:
                items.append(f"{key}=null")
            continue
        if any(key.startswith(d + ".") for d in dropped):
            continue  # the pass is gone: its keys have nothing to set
        if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
            value = float(value)
        items.append(f"{key}={json.dumps(value)}")
    return items


def value_text(value: Any) -> str:
    if value is True:
        return "on"
    if value is False:
        return "off"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def trial_folder(number: int, values: dict[str, Any], labels: dict[str, str]) -> str:
    """t007-sparsity-0.5_lr-0.0012: the trial number first (unique, so a retried trial never reuses a folder)."""
    text = "_".join(f"{labels.get(k, k.split('.')[-1])}-{value_text(v)}" for k, v in values.items())
    text = re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-.")[:80]
    return f"t{number:03d}" + (f"-{text}" if text else "")
