"""What a prune step writes under "details" in report.json (registered as PassSpec.details); pydantic only."""

from __future__ import annotations

from typing import Any

from optcli.report.model import Number, StepDetails


class PruneDetails(StepDetails):
    structured: str | None = None
    scope: str | None = None
    target_sparsity: Number | None = None
    pruned_layers_sparsity: Number | None = None
    per_layer_sparsity: dict[str, Number | None] | None = None  # the report's "most pruned layers"
    excluded_layers: dict[str, Any] | list[Any] | None = None  # layer -> why it was left alone
    parameters_before: int | None = None
    parameters_after: int | None = None
    nonzero_parameters_after: int | None = None
    schedule: Any = None  # a gradual schedule that a following finetune drives
    channels_removed: Number | None = None
    per_layer_channels_removed: dict[str, Any] | None = None
    shrunk_layers: Any = None
    output_shapes: list[Any] | None = None
