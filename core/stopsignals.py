"""How membershipd's operator commands stop on a signal (docs/operations.md, "Exit codes and refusals").

Ctrl-C, SIGTERM (``systemctl stop``, ``timeout``) and SIGHUP (a closed session) end a command
such as ``backup`` or ``restore`` only inside the parts marked :func:`stoppable`: copying,
checking, extracting, a transfer over NATS. There they raise :class:`StopSignal`, the command
unwinds, removes what it staged, and exits 128 + the signal's number. Anywhere else a signal is
kept until the next stoppable part, or dropped once the command is done: so a stop never lands
between the creation of a staging file and the name that removes it, in the middle of that
removal, or past the commit point (an archive linked into place, a restored directory renamed),
where the command finishes and says what it did.

A first version raised wherever the signal came: a review stopped clean-ups half-way (a copy of
the database left beside the archive), left the process ignoring SIGTERM, and exited 143 after a
complete restore. The handler runs in the main thread whichever thread took the signal, so the
test of :data:`_state` is all it needs; no signal mask is changed.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopSignal(KeyboardInterrupt):
    """A stop signal that ended an operator command in a :func:`stoppable` part."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _State:
    def __init__(self) -> None:
        self.active = False
        self.depth = 0  # stoppable parts entered and not left
        self.kept: int | None = None  # a signal that came outside them
        self.raised = False


_state = _State()


def _on_signal(signum: int, _frame: Any) -> None:
    if _state.raised or _state.kept is not None:
        return  # already stopping: a second signal changes nothing
    if _state.depth > 0:
        _state.raised = True
        raise StopSignal(signum)
    _state.kept = signum


@contextlib.contextmanager
def operator_command() -> Iterator[None]:
    """Within it, the stop signals behave as the module says; the handlers before are put back
    at the end (a test runs commands in its own process). A signal that an ignored disposition
    keeps out (``nohup``'s SIGHUP, a background job's SIGINT) stays ignored. Outside the main
    thread, nothing changes and nothing is stoppable."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    _state.__init__()  # type: ignore[misc]
    _state.active = True
    try:
        for sig, handler in before.items():
            if handler is not signal.SIG_IGN:
                signal.signal(sig, _on_signal)
        yield
    finally:
        _state.active = False  # from here no handler of ours raises (stoppable parts are not entered)
        for sig, handler in before.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        _state.__init__()  # type: ignore[misc]


@contextlib.contextmanager
def stoppable() -> Iterator[None]:
    """A part of an operator command that a stop signal may end (raising :class:`StopSignal` out
    of it): it must neither create what the command removes when it unwinds nor remove it. A
    signal that came before it raises at once."""
    if not _state.active:
        yield
        return
    _state.depth += 1
    try:
        if _state.kept is not None and not _state.raised:
            _state.raised = True
            raise StopSignal(_state.kept)
        yield
    finally:
        _state.depth -= 1
