"""Standard output of the command lines (``membershipd`` and ``unibus``): a write that fails is
an error that the command reports, never dropped.

argparse drops a failed write of ``--help`` or ``--version`` and exits 0 (a full disk, ``>
/dev/full``), so :class:`FailedWritesRaise` lets it raise; each command line's ``main`` turns
it into one error line, exit 1. A reader that went away (``| head``) is a ``BrokenPipeError``,
which each ``main`` takes as the end of the output, exit 0, after :func:`drop_stdout`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any


class FailedWritesRaise(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose writes to standard output raise ``OSError`` when they fail;
    to stderr (its errors, then exit 2) it keeps argparse's way."""

    def _print_message(self, message: str, file: Any = None) -> None:
        if file is not sys.stdout:
            return super()._print_message(message, file)
        if message:
            file.write(message)
            file.flush()
        return None


def drop_stdout() -> None:
    """Point standard output at /dev/null, so that the interpreter's flush at exit is silent
    (Python's documented recipe for a reader that went away)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
