"""What a cluster step writes under "details" in report.json (registered as PassSpec.details); pydantic only."""

from __future__ import annotations

from typing import Any

from optcli.report.model import StepDetails


class ClusterDetails(StepDetails):
    clustered_layers: dict[str, Any] | None = None
    clustered_weights: int | None = None
    excluded_layers: dict[str, Any] | list[Any] | None = None  # layer -> why it was left alone
    folded_batchnorm: Any = None
    storage: str | None = None
    session_create_ms: dict[str, Any] | None = None
