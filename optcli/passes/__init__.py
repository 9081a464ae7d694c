"""Pass registry. Adding a pass: one module under optcli/passes/ plus one line here."""

from __future__ import annotations

import importlib

from optcli.passes.base import PassSpec

_MODULES = {
    "export": "optcli.passes.export",
    "quantize": "optcli.passes.quantize",
    "finetune": "optcli.passes.finetune",
    "prune": "optcli.passes.prune",
    "prepare": "optcli.passes.quantize.prepare",
    "optimize": "optcli.passes.optimize",
    "cluster": "optcli.passes.cluster",
    "convert": "optcli.passes.convert",
    "save": "optcli.passes.save",
    "decoder": "optcli.llm.passes",
}


def pass_types() -> list[str]:
    return list(_MODULES)


def get_pass(type_: str) -> PassSpec:
    if type_ not in _MODULES:
        raise KeyError(type_)
    return importlib.import_module(_MODULES[type_]).PASS


def all_passes() -> list[PassSpec]:
    return [get_pass(t) for t in _MODULES]
