"""The optcli command line: one module per verb beside this one, registered below in the order `--help` lists them.

Thin: a verb parses, calls one library function (optcli.api, optcli.verbs.*), renders. Shared options are
declared once in options.py, Click's help and usage texts adapted in usage.py, errors mapped to exit codes in
guard.py. torch / onnxruntime are imported inside commands only, so `optcli --help` stays instant.
"""

from __future__ import annotations

import signal

from optcli.cli import bench, compare, init, inspection, passes, run, schema, sweep, validate
from optcli.cli.app import app
from optcli.cli.usage import PlainCommand
from optcli.errors import EXIT_INTERRUPTED

for command in (
    run.run,
    validate.validate,
    inspection.inspect,
    bench.bench,
    passes.passes,
    schema.schema,
    init.init,
    compare.compare,
    sweep.sweep,
):
    app.command(cls=PlainCommand)(command)


def main() -> None:
    # A signal before a command's own handler is in place (start-up, option parsing) must still exit 130, not
    # click's "Aborted!" 1: note that one arrived, behave as the default handler does, and map the exit code.
    interrupted: list[int] = []

    def on_signal(signum, frame):
        interrupted.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        app()
    except SystemExit as e:
        if interrupted and e.code == 1:
            raise SystemExit(EXIT_INTERRUPTED) from None
        raise


__all__ = ["app", "main"]
