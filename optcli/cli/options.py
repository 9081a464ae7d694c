"""Options several verbs share, declared once as Annotated types: a verb's signature names them
(`json_out: JsonOut = False`) and every verb gets the same flag, metavar and help.

A verb whose option means something slightly different (sweep's --out holds one run per variant) declares its
own beside it.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

JSON_HELP = "print only JSON on stdout (human text goes to stderr)"
JUNIT_HELP = "also write the gates as JUnit XML test cases to this file (CI test reporters read it)"
DEBUG_HELP = "show the full traceback on errors"
TRUST_PICKLE_HELP = "allow unpickling a full torch module (runs code from the file)"
INCONCLUSIVE_HELP = (
    "pass | fail: how a speed gate counts when its confidence interval straddles the limit (a noisy machine); "
    "overrides gates.inconclusive (default pass)"
)


class Inconclusive(str, Enum):
    pass_ = "pass"
    fail = "fail"


RecipeArg = Annotated[Path, typer.Argument(metavar="RECIPE", help="YAML recipe")]
JsonOut = Annotated[bool, typer.Option("--json", metavar="", help=JSON_HELP)]
Quiet = Annotated[
    bool, typer.Option("--quiet", "-q", metavar="", help="no progress or table; errors still go to stderr")
]
Debug = Annotated[bool, typer.Option("--debug", metavar="", help=DEBUG_HELP)]
Sets = Annotated[
    list[str], typer.Option("--set", metavar="KEY=VALUE", help="override a recipe key: --set passes.1.per_channel=true")
]
Overwrite = Annotated[bool, typer.Option("--overwrite", metavar="", help="replace what optcli wrote in OUT")]
TrustPickle = Annotated[bool, typer.Option("--trust-pickle", metavar="", help=TRUST_PICKLE_HELP)]
Target = Annotated[
    str | None,
    typer.Option(
        "--target",
        metavar="NAME",
        help="cpu | cuda | tensorrt | openvino: where the report measures; overrides report.target",
    ),
]
Junit = Annotated[Path | None, typer.Option("--junit", metavar="FILE", help=JUNIT_HELP)]
InconclusivePolicy = Annotated[
    Inconclusive | None,
    typer.Option("--inconclusive", metavar="pass|fail", help=INCONCLUSIVE_HELP, case_sensitive=False),
]


def target_set(target: str | None) -> list[str]:
    return [f"report.target={target}"] if target else []


def inconclusive_set(choice: Inconclusive | None) -> list[str]:
    # Through the recipe key, so the report's resolved recipe records the choice the exit code followed.
    return [f"gates.inconclusive={choice.value}"] if choice is not None else []
