"""Errors that map onto the CLI's exit codes (see DESIGN.md).

Library code raises these with a message a user can act on; the CLI prints the
message on one line and exits with the code. Anything else is a bug.
"""


class OptcliError(Exception):
    exit_code = 3


class BadInput(OptcliError):
    """The recipe, a model or data file, or an option is wrong: exit 2."""

    exit_code = 2


class PassFailed(OptcliError):
    """A pass failed while running (export mismatch, worker crash): exit 3."""

    exit_code = 3

    def __init__(self, step: str, message: str):
        super().__init__(f"pass {step} failed: {message}")
        self.step = step


class GateFailed(OptcliError):
    exit_code = 1


EXIT_OK, EXIT_GATE, EXIT_BAD_INPUT, EXIT_PASS_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
