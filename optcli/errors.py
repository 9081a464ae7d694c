"""Errors that map onto the CLI's exit codes (see DESIGN.md).

Library code raises these with a message a user can act on; the CLI prints the
message on one line and exits with the code. Anything else is a bug.
"""

import contextlib
import errno

DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


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


class DiskFull(OptcliError):
    """The disk filled up while writing: exit 3 (the run could not finish), the file named."""

    exit_code = 3


@contextlib.contextmanager
def writing(path):
    """Turn OS write errors into one line naming the file: full disk -> exit 3, unwritable folder -> exit 2."""
    try:
        yield
    except OSError as e:
        if e.errno in DISK_FULL:
            raise DiskFull(
                f"disk full while writing {path}: free some space and rerun (--resume keeps the finished steps)"
            ) from e
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise BadInput(f"cannot write {path} ({e.strerror}); choose an output folder you can write to") from e
        raise


def first_line(error: BaseException | str, limit: int = 300) -> str:
    """The first non-empty line of an error, cut to `limit` characters: what a one-line message quotes."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else ""


EXIT_OK, EXIT_GATE, EXIT_BAD_INPUT, EXIT_PASS_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
