"""The Typer application and its root options (--version); the verbs register on it in optcli.cli."""

from __future__ import annotations

import sys

import typer

from optcli import __version__
from optcli.cli.usage import PlainErrorsGroup

app = typer.Typer(
    cls=PlainErrorsGroup,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Optimize saved models (int8, pruning, distillation, export) and report size, latency and accuracy honestly.",
)


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"optcli {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, metavar="", help="print optcli's version and exit"
    ),
) -> None:
    """Optimize saved models (int8, pruning, distillation, export) and report size, latency and accuracy honestly."""
