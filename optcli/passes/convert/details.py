"""What a convert step writes under "details" in report.json (registered as PassSpec.details); pydantic only."""

from __future__ import annotations

from typing import Any

from optcli.report.model import StepDetails


class ConvertDetails(StepDetails):
    dtype: str | None = None
    keep_io_types: bool | None = None
    fp16_initializers: int | None = None
    fp32_initializers: int | None = None
    nodes_kept_fp32: dict[str, Any] | None = None
    casts_added: int | None = None
    fp16_round_trips_removed: Any = None
    parameters_cast: int | None = None
    overflow_guard: dict[str, Any] | None = None
    overflow_guard_inputs: str | None = None
