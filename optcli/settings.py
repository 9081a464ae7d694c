"""How one run was asked to behave: the command line's flags (or the Python API's keywords), typed once.

Not part of the recipe, so neither in the report's resolved recipe nor in the --resume key: the same recipe run
with --quiet or --debug makes the same artifact. The runner and every pass read them from here, never by string key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RunSettings:
    overwrite: bool = False  # replace what optcli wrote in OUT
    resume: bool = False  # reuse finished steps whose input and config are unchanged
    quiet: bool = False  # no progress display (errors still go to stderr)
    trust_pickle: bool = False  # allow unpickling a full torch module (runs code from the file)
    debug: bool = False  # full tracebacks, fine-tune workers' included
    # --nproc-per-node / --nnodes / --node-rank / --rdzv-endpoint, checked (passes.finetune.launch.cli_overrides):
    # laid over every finetune pass's distributed block.
    distributed: Mapping[str, Any] = field(default_factory=dict)
