"""Help pages and usage errors in optcli's voice: Click's texts adapted (by regex where Click gives only a string).

Help pages read like a CLI's (flags without a type beside them, RECIPE not {RECIPE}); usage errors are one
`error:` line on stderr like optcli's own errors, not Typer's boxed Rich panel.
"""

from __future__ import annotations

import re
import sys
from typing import TYPE_CHECKING

from typer.core import TyperCommand, TyperGroup

from optcli.cli.guard import err
from optcli.errors import EXIT_OK

if TYPE_CHECKING:  # a mixin over Typer's Command: the checker reads super() as that class
    _Command = TyperCommand
else:
    _Command = object


class FlagHelp(_Command):
    """Help pages that read like a CLI's: flags without a "<bool>" beside them, arguments shown by their metavar
    (RECIPE, MODEL) without Typer's "<path>" type and usage as `optcli run [OPTIONS] RECIPE`, not `{RECIPE}`."""

    def get_help_option(self, ctx):
        # --help is a flag: no "<bool>" type beside it on the help page
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if param.param_type_name == "argument":
                # the metavar says it; "<path>" is Python's word. A TyperArgument method, which the checker cannot
                # see on the click Parameter that get_params is typed to return
                param.display_type_rich = lambda ctx: None  # type: ignore[attr-defined]
            elif getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params

    def collect_usage_pieces(self, ctx):
        # Typer writes a required argument as {RECIPE}; a CLI's usage line says RECIPE (optional ones stay [NAME])
        return [re.sub(r"^\{(.*)\}((?:\.\.\.)?)$", r"\1\2", piece) for piece in super().collect_usage_pieces(ctx)]


class PlainCommand(FlagHelp, TyperCommand):
    """A command whose help page shows --help as a flag."""


class PlainErrorsGroup(FlagHelp, TyperGroup):
    """Usage errors (unknown option or command, bad value) as one `error:` line, like optcli's own errors.

    Typer draws them in a boxed Rich panel beside the plain lines optcli prints; a user (and a log grep) should
    meet one style. Help pages keep their Rich panels.
    """

    # Click declares main with typed, partly positional parameters; this one passes them on by keyword unchanged
    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # type: ignore[override]
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra)
        except Exception as e:
            # click's ClickException family (vendored inside typer): duck-typed, not imported from a private module
            if not (standalone_mode and hasattr(e, "format_message") and hasattr(e, "exit_code")):
                raise
            message = usage_message(e.format_message(), getattr(e, "ctx", None))
            if message:
                err(f"error: {message}")
            sys.exit(e.exit_code)
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else EXIT_OK)
        return rv


def usage_message(text: str, ctx) -> str:
    """click's usage text in optcli's voice: lower case, a did-you-mean, and where the options are listed."""
    text = " ".join(text.split())
    if not text:
        return ""  # no arguments: the help page was printed already
    command = (ctx.command_path if ctx is not None else "optcli") or "optcli"
    hit = re.match(r"No such option: (\S+) \(Possible options: ([^)]*)\)", text)
    if hit:
        return f"no such option {hit[1]}: did you mean {hit[2]}? (`{command} --help` lists the options)"
    hit = re.match(r"No such option: (\S+)", text)
    if hit:
        return f"no such option {hit[1]} (`{command} --help` lists the options)"
    hit = re.match(r"No such command '([^']*)'\. Did you mean '([^']*)'\?", text)
    if hit:
        return f"no such command {hit[1]!r}: did you mean {hit[2]!r}? (`optcli --help` lists the commands)"
    hit = re.match(r"No such command '([^']*)'", text)
    if hit:
        return f"no such command {hit[1]!r} (`optcli --help` lists the commands)"
    return f"{text[0].lower()}{text[1:]} (`{command} --help` for the usage)"
