"""Magnitude pruning helpers: which layers to prune, exact masks, the cubic schedule.

Masks are torch.nn.utils.prune forward-pre-hooks (`weight_orig` * `weight_mask`),
one per layer, left on the module: they stay in force through a later fine-tune
(pruned weights get zero gradient and stay exactly zero) and
optcli.artifact.fold_pruning folds them into plain weights when an artifact is written.

Gradual pruning hook (for the fine-tune loop)
---------------------------------------------
With `schedule: {steps: N}` the prune pass starts at `initial_sparsity` and leaves a
`PruneSchedule` attached to the root module (optcli.passes.base.attach_training_hook). A training loop
that finds one must

    schedule = training_hooks(model)
    ...
    optimizer.step()
    if schedule is not None:
        schedule.step()          # advance the cubic ramp one optimizer step, raise masks
    ...
    if schedule is not None:
        schedule.finish()        # after the last step: reach the final sparsity even if fewer than N steps ran

`step()` and `finish()` return the sparsity now targeted; `schedule.per_layer_sparsity()`
gives the per-layer figures for a report, `schedule.describe()` a summary dict.
Masks only ever grow: a weight pruned once stays pruned (Zhu & Gupta 2017,
"To prune, or not to prune", arXiv:1710.01878).
"""

from __future__ import annotations

from optcli.layers import Layer, Plan, default_exclusions, make_plan  # noqa: F401 (the selection prune shares)


def cubic_sparsity(step: int, steps: int, final: float, initial: float = 0.0) -> float:
    """Zhu & Gupta's ramp: s_t = s_f + (s_i - s_f) * (1 - t/n)^3, fast at first, flat at the end."""
    if steps <= 0:
        return final
    t = min(max(step, 0), steps)
    return final + (initial - final) * (1.0 - t / steps) ** 3


# --------------------------------------------------------------------------- choosing layers


# --------------------------------------------------------------------------- masks


def ensure_mask(module, name: str = "weight") -> None:
    """Give the module a prune mask hook (all ones) unless it has one; masks are then raised in place."""
    from torch.nn.utils import prune

    if not prune.is_pruned(module) or not hasattr(module, f"{name}_mask"):
        prune.identity(module, name)


def raise_masks(members: list, sparsity: float, name: str = "weight") -> int:
    """Zero the smallest-|w| weights of the pooled modules until round(sparsity * n) are zero; returns that count.

    Uses torch's own L1Unstructured inside a PruningContainer, as prune.global_unstructured does, so already
    pruned weights stay pruned and the count is exact. Masks are written in place: one hook per layer however
    often a schedule raises them.
    """
    import torch
    from torch.nn.utils import prune

    for module in members:
        ensure_mask(module, name)
    masks = [getattr(module, f"{name}_mask") for module in members]
    origs = [getattr(module, f"{name}_orig") for module in members]
    total = sum(m.numel() for m in masks)
    target = int(round(sparsity * total))
    with torch.no_grad():
        current = torch.cat([m.reshape(-1) for m in masks])
        already = int((current == 0).sum())
        if target > already:
            scores = torch.cat([(o.detach() * m).reshape(-1) for o, m in zip(origs, masks, strict=False)])
            container = prune.PruningContainer()
            container._tensor_name = name
            method = prune.L1Unstructured(amount=target - already)
            method._tensor_name = name
            container.add_pruning_method(method)
            new = container.compute_mask(scores, default_mask=current)
            offset = 0
            for mask in masks:
                mask.copy_(new[offset : offset + mask.numel()].view_as(mask))
                offset += mask.numel()
        for module in members:  # the hook recomputes weight on the next forward; do it now for readers in between
            setattr(module, name, getattr(module, f"{name}_orig") * getattr(module, f"{name}_mask"))
    return max(target, already)


def apply_plan(plan: Plan) -> None:
    """One-shot pruning: raise every group's masks to its sparsity."""
    for members, sparsity in plan.groups:
        raise_masks([layer.handle for layer in members], sparsity)


def layer_sparsity(module, name: str = "weight") -> float:
    import torch

    weight = getattr(module, name)
    return float(1.0 - torch.count_nonzero(weight).item() / weight.numel()) if weight.numel() else 0.0


class PruneSchedule:
    """The gradual-pruning hook a fine-tune loop calls after each optimizer step (see the module docstring)."""

    def __init__(self, plan: Plan, steps: int, initial: float, every: int = 1):
        self.plan = plan
        self.steps = steps
        self.initial = initial
        self.every = every
        self.t = 0
        self.raised_at = -1
        self.current = 0.0  # the highest sparsity any group's masks were raised to, for logs and reports
        self._raise()

    def _target(self, final: float) -> float:
        return cubic_sparsity(self.t, self.steps, final, min(self.initial, final))

    def _raise(self) -> None:
        for members, final in self.plan.groups:
            raise_masks([layer.handle for layer in members], self._target(final))
        self.raised_at = self.t
        self.current = max((self._target(final) for _, final in self.plan.groups), default=0.0)

    @property
    def done(self) -> bool:
        return self.t >= self.steps

    def step(self) -> float:
        if not self.done:
            self.t += 1
            if self.t % self.every == 0 or self.done:
                self._raise()
        return self.current

    def finish(self) -> float:
        if self.raised_at < self.steps:
            self.t = self.steps
            self._raise()
        return self.current

    def per_layer_sparsity(self) -> dict[str, float]:
        return {layer.name: round(layer_sparsity(layer.handle), 6) for layer in self.plan.layers}

    def describe(self) -> dict:
        return {
            "steps": self.steps,
            "taken": self.t,
            "initial_sparsity": self.initial,
            "every": self.every,
            "targeted_sparsity": round(self.current, 6),
            "done": self.done,
        }
