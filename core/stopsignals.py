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

In a coroutine the part is ``async with stoppable()``, and a signal there cancels its task at its
next ``await`` (the part turns the cancellation into :class:`StopSignal`), instead of raising
wherever the event loop is: a ``KeyboardInterrupt`` raised into the loop's own code or a
library's task left a connection's close cut short, exit 143 after a complete ``migrate-to-kv``,
and now and then a coroutine never awaited.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import Any

from .aio import RECANCEL_EVERY

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
        self.task: asyncio.Task[Any] | None = None  # the task of an ``async with stoppable()`` part
        self.loop: asyncio.AbstractEventLoop | None = None
        self.cancels = 0  # of that task, by us
        self.again: asyncio.TimerHandle | None = None  # the next cancellation of it


_state = _State()


def _on_signal(signum: int, _frame: Any) -> None:
    if _state.task is not None and _state.loop is not None:
        # In a coroutine's part: the loop cancels it (the handler may run in the middle of the
        # loop's own code, which must not be cut; call_soon_threadsafe wakes a loop waiting in
        # select()). A second signal cancels it again rather than being dropped.
        if _state.kept is None:
            _state.kept = signum
        _state.loop.call_soon_threadsafe(_cancel_part, _state.task)
        return
    if _state.raised or _state.kept is not None:
        return  # already stopping: a second signal changes nothing
    if _state.depth > 0:
        _state.raised = True
        raise StopSignal(signum)
    _state.kept = signum


def _cancel_part(task: asyncio.Task[Any]) -> None:
    """Run by the loop: cancel ``task`` while it is in its stoppable part, and again every
    ``RECANCEL_EVERY`` seconds until it has left it. A cancellation can be swallowed by code not
    ours: Python 3.11's ``asyncio.wait_for``, which nats-py's requests use, returns a reply that
    came as it was cancelled (a review saw 19 of 40 stopped ``migrate-to-kv`` runs copy to the
    end, deaf to further signals, then exit 143)."""
    if _state.task is not task or task.done() or _state.loop is None:
        return
    if _state.again is not None:
        _state.again.cancel()
    _state.raised = True
    _state.cancels += 1
    task.cancel()
    _state.again = _state.loop.call_later(RECANCEL_EVERY, _cancel_part, task)


@contextlib.contextmanager
def operator_command(*, restore: bool = True) -> Iterator[None]:
    """Within it, the stop signals behave as the module says; the handlers before are put back
    at the end (a test runs commands in its own process). A signal that an ignored disposition
    keeps out (``nohup``'s SIGHUP, a background job's SIGINT) stays ignored. Outside the main
    thread, nothing changes and nothing is stoppable.

    ``restore=False`` is for the command's own process: the handlers stay, dropping every
    signal, until :func:`exit_on_stop_signal` replaces them."""
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
        if restore:
            for sig, handler in before.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        _state.__init__()  # type: ignore[misc]


def exit_on_stop_signal(code: int) -> None:
    """For a command's own process once the command is done, its output written: a stop signal
    while the interpreter exits ends the process at once with ``code`` instead of as killed by
    the signal. That exit takes a tenth of a second or more once nats-py and alembic are loaded:
    a probe's SIGTERMs at random moments killed 6 of 60 complete ``migrate-to-kv`` runs there.
    What an exit skips this way (``atexit`` handlers, the wait for threads) holds nothing of an
    operator command's: each removes its staging before it returns. Signals ignored stay so.

    From the ``atexit`` handlers on, the signals are ignored: late in its exit the interpreter
    puts back the default action of every signal with a Python handler (one in 10 such
    SIGTERMs still killed the process), but not of an ignored one; nothing is left there that
    could hang."""

    def finish(_signum: int, _frame: Any) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)

    def ignore() -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    if threading.current_thread() is not threading.main_thread():
        return
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, finish)
    atexit.register(ignore)  # the last registered runs first


class stoppable:  # noqa: N801 - used as a context manager, like contextlib's
    """A part of an operator command that a stop signal may end (raising :class:`StopSignal` out
    of it): it must neither create what the command removes when it unwinds nor remove it. A
    signal that came before it raises at once.

    ``with stoppable():`` around synchronous code, which must not run an event loop or await
    within the part (the signal raises where it comes, which must be the part's own code);
    ``async with stoppable():`` in a coroutine (the signal cancels the task at its next ``await``
    inside the part, and the part raises :class:`StopSignal`; ``finally`` clauses within it run
    as for any cancellation). One coroutine's part at a time. Two consequences of the
    cancellation made again every ``RECANCEL_EVERY`` seconds: a clean-up inside the part gets at
    most that long once cancelled (one that must finish belongs after the part, or shielded),
    and a work in a worker thread (``to_thread``) is waited for by ``asyncio.run`` at the end,
    so a stop during a long one takes as long as it does.
    """

    def __enter__(self) -> None:
        if not _state.active:
            return
        _state.depth += 1
        if _state.kept is not None and not _state.raised:
            _state.depth -= 1
            _state.raised = True
            raise StopSignal(_state.kept)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if _state.active:
            _state.depth -= 1

    async def __aenter__(self) -> None:
        if not _state.active:
            return
        if _state.task is not None or _state.depth > 0:
            raise RuntimeError("stoppable(): one stoppable part at a time")
        # The task first: a signal from here on takes the part's path, so none is lost between
        # the test below and the part (a review's signal at that line was never delivered).
        _state.loop, _state.task = asyncio.get_running_loop(), asyncio.current_task()
        if _state.kept is not None and not _state.raised:
            _state.loop = _state.task = None
            _state.raised = True
            raise StopSignal(_state.kept)

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if not _state.active or _state.task is None:
            return
        task, _state.task, _state.loop = _state.task, None, None
        if _state.again is not None:
            _state.again.cancel()
            _state.again = None
        for _ in range(_state.cancels):
            task.uncancel()
        _state.cancels = 0
        if not _state.raised:
            return  # no cancellation reached the part (a signal at its very end stays kept)
        if exc_type is None:
            # Cancelled, and every cancellation swallowed before the part ended: its work is done.
            # The signal stays kept: the next stoppable part raises it, or the command finishes.
            _state.raised = False
            return
        raise StopSignal(_state.kept) from None


def checkpoint() -> None:
    """End the command here if a stop signal is kept (a stoppable part with nothing in it): the
    last point before a commit that no stop may cut, so that a stop which came during the checks
    before it (at their very end, or swallowed there) does not let the commit go ahead."""
    with stoppable():
        pass
