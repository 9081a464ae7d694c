"""The weight-only pass without a target: every MatMul / Gather weight at `weights`, or with ratio < 1 the most
sensitive MatMuls kept at `backup` (weight_mix ranks them). Above both weight_only (the writer) and weight_mix (the
choice of layers), so neither imports the other's caller: the two once imported each other.
"""

from __future__ import annotations

from pathlib import Path

from optcli.passes.quantize.weight_mix import backup_for_ratio
from optcli.passes.quantize.weight_only import (
    activation_aware,
    calibration_for,
    describe,
    float_weight_bytes,
    prepared,
    warn_if_nothing,
    write,
)


def quantize_weights(model, target: Path, config, exclude: set[str], ctx) -> dict:
    """The pass without a search: every weight at `weights`, or with ratio < 1 the most sensitive MatMuls at backup."""
    from optcli.artifact import save_onnx

    proto, ops, opset = prepared(model.path, config, ctx)
    calibration = calibration_for(model, config, ctx)
    awq = activation_aware(proto, config, exclude, ctx, calibration)
    backup: frozenset[str] = frozenset()
    mix = None
    if config.ratio < 1:
        backup, mix = backup_for_ratio(model, proto, config, exclude, ctx, calibration)
    before = float_weight_bytes(proto)
    out = write(proto, config, ops, exclude, backup, ctx, calibration)
    save_onnx(out, target)
    details = describe(out, config, ops, opset, before)
    warn_if_nothing(details, ops, ctx)
    if mix is not None:
        details["mixed"] = mix
    if awq is not None:
        details["awq"] = awq
    return details
