"""Waiting with a bound, and cancelling a task, without losing a cancellation.

On Python 3.11, ``asyncio.wait_for`` runs what it waits for in a task of its
own. When that task finishes in the same turn of the event loop as the caller
is cancelled, ``wait_for`` returns the result and the cancellation is gone
(CPython gh-86296, fixed in 3.12 by building ``wait_for`` on
``asyncio.timeout``). A loop that lost its cancellation runs on, and whoever
awaits it waits for ever: that is how ``membershipd`` once took longer than
its stop budget, when a health probe's answer arrived as the stop cancelled
the prober. ``tests/core/test_aio.py`` reproduces the race.

The same goes for ``with suppress(CancelledError): await task`` after
``task.cancel()``: if the caller is cancelled while it waits, the caller's own
cancellation is suppressed too.

So the daemon and its plugins use these two instead (a test keeps
``asyncio.wait_for`` out of ``core/`` and ``plugins/``):

- :func:`within` waits for an awaitable for at most ``timeout`` seconds, in
  the caller's own task (``asyncio.timeout``), where a cancellation cannot be
  lost; it raises ``TimeoutError`` as ``wait_for`` does.
- :func:`cancel_and_wait` cancels a task and waits until it has finished, for
  at most ``timeout`` seconds (``asyncio.wait``, which never raises what the
  task raised and never swallows the caller's cancellation). It cancels again
  every half second: libraries the daemon uses (nats-py) still call
  ``wait_for`` themselves, and a cancellation lost there is not lost for good.
- :func:`run_bounded` is the hard bound, for code that is not ours (a plugin's
  hook) or must not hold up a stop: the awaitable runs in a task of its own,
  and after ``timeout`` the caller goes on even if that task ignores its
  cancellation (:class:`Overran` says whether it still runs). One that ends
  with a ``CancelledError`` of its own, or raises ``KeyboardInterrupt``,
  ``SystemExit`` or ``GeneratorExit``, is a ``RuntimeError`` for the caller:
  only the caller's own cancellation propagates.
- :func:`close_nats` closes a nats-py client so that it stays closed: nats-py's
  own ``close()`` lets a reconnect that missed its cancellation connect again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["ESCAPING", "ForeignCancel", "Overran", "cancel_and_wait", "close_nats", "describe", "own_cancel_only",
           "run_bounded", "within"]


async def within(aw: Awaitable[T], timeout: float | None) -> T:
    """``await aw``, for at most ``timeout`` seconds (``None``: no bound); ``TimeoutError`` after that.

    A coroutine runs in the caller's task; a future or task is cancelled on the timeout, as
    with ``asyncio.wait_for``.
    """
    async with asyncio.timeout(timeout):
        return await aw


class ForeignCancel(RuntimeError):
    """A ``CancelledError`` that did not cancel the caller's task (:func:`own_cancel_only`)."""


async def own_cancel_only(aw: Awaitable[T]) -> T:
    """``await aw``, where only a cancellation of the caller's own task raises ``CancelledError``.

    A ``CancelledError`` also comes out of awaiting a future that another task cancelled.
    nats-py 2.16 does that on a close during a reconnect: its reconnect task waits for the
    old connection's close waiter (``StreamWriter.wait_closed``), ``close()`` cancels that
    task, and cancelling a task cancels the future it waits on, the waiter both share. The
    caller's ``await nc.close()`` then raised a bare ``CancelledError`` that no one had
    asked for (a red-team test's teardown, in CI), which ``except Exception`` lets through
    and which looks like a cancellation of the caller. Such a one is a :class:`ForeignCancel`
    here; a real one (``current_task().cancelling()``) propagates.
    """
    try:
        return await aw
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise
        raise ForeignCancel("a future it awaited was cancelled by another task") from None


#: :func:`cancel_and_wait` cancels again this often: a cancellation lost in code that is
#: not ours (nats-py's own ``wait_for``) is not lost for good. Long enough for the
#: clean-up a task does when it is cancelled (the daemon's are bounded at 1 s or less).
RECANCEL_EVERY = 0.5


async def cancel_and_wait(task: asyncio.Future[object], timeout: float | None = None) -> bool:
    """Cancel ``task`` and wait until it has finished, at most ``timeout`` seconds,
    cancelling it again every RECANCEL_EVERY seconds meanwhile.

    True once it has finished (cancelled, or ending with a result or an exception,
    which is retrieved, not raised); False when it is still running after ``timeout``
    (it ignores its cancellation). A cancellation of the caller propagates.
    """
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        task.cancel()
        wait = RECANCEL_EVERY if deadline is None else max(0.0, min(RECANCEL_EVERY, deadline - loop.time()))
        done, _ = await asyncio.wait({task}, timeout=wait)
        if done:
            retrieve_exception(task)  # no "exception was never retrieved" at exit
            return True
        if deadline is not None and loop.time() >= deadline:
            return False


async def close_nats(nc: Any, timeout: float = 3.0) -> bool:
    """Close a nats-py client so that it stays closed, even in the middle of a reconnect.

    nats-py 2.16's ``close()`` cancels a reconnect under way and waits for it at most
    ``reconnect_time_wait``. A reconnect that loses that cancellation (an
    ``asyncio.wait_for`` of nats-py's whose wait ends as it is cancelled) goes on after the
    close: closed at random moments of reconnects through a proxy to a server that stayed
    up, 2 clients in 1,400 were connected again on a new socket once ``close()`` had
    returned, their reconnect loops alive to try again whenever that socket went (and none of
    1,200 closed by this function; bench/probe_close_during_reconnect.py). Here the reconnect
    task is cancelled until it has ended (:func:`cancel_and_wait`), and a client it brought
    back, or left marked as reconnecting, is closed again. A client already closed is
    checked all the same: a close cut short (its caller cancelled) may have left a
    reconnect running.

    About ``timeout`` seconds at most (a part of nats-py's close that runs after a swallowed
    timeout is not bounded here); True once the client is closed with no reconnect running.
    An exception of nats-py's close, a ``CancelledError`` of its own included
    (:func:`own_cancel_only`), does not stop it. A cancellation of the caller propagates, also
    one that nats-py's close swallowed while it waited for its reconnect task.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    me = asyncio.current_task()
    cancelled_before = me.cancelling() if me is not None else 0
    for _ in range(3):
        try:
            await within(own_cancel_only(nc.close()), max(0.1, deadline - loop.time()))
        except Exception:  # noqa: BLE001 - closing: what is left is checked below
            pass
        if me is not None and me.cancelling() > cancelled_before:
            raise asyncio.CancelledError  # ours, swallowed in nats-py's close (its wait for the reconnect)
        task = getattr(nc, "_reconnection_task", None)  # nats-py's; None before any reconnect
        if task is not None and not task.done():
            await cancel_and_wait(task, max(0.1, deadline - loop.time()))
        task = getattr(nc, "_reconnection_task", None)
        if nc.is_closed and (task is None or task.done()):
            return True
        if loop.time() >= deadline:
            break
    return False


def retrieve_exception(fut: asyncio.Future[Any]) -> None:
    """Done-callback of a future that nobody may await any more: its exception, if any, counts as
    retrieved, where asyncio would log it as lost. Its failure is logged where it happens, or does
    not matter (a read-ahead nobody reads, a job whose caller is gone)."""
    if not fut.cancelled():
        fut.exception()


class Overran(TimeoutError):
    """:func:`run_bounded`: the awaitable did not finish within its time. ``task`` is it;
    ``task.done()`` is False when it ignored its cancellation and still runs."""

    def __init__(self, task: asyncio.Future[Any], timeout: float) -> None:
        super().__init__(f"did not finish within {timeout:g} s")
        self.task = task


#: What code that is not ours may raise that a task does not keep to itself: asyncio
#: re-raises KeyboardInterrupt and SystemExit out of the event loop, so a plugin's
#: ``sys.exit()`` would end the whole process mid-stop. (Not GeneratorExit: that is how
#: a coroutine left behind is closed at the end, and it must go through.)
ESCAPING = (KeyboardInterrupt, SystemExit)


async def _contained(aw: Awaitable[T]) -> T:
    try:
        return await aw
    except ESCAPING as e:
        raise RuntimeError(f"it raised {type(e).__name__}" + (f": {e}" if str(e) else "")) from e


async def run_bounded(aw: Awaitable[T], timeout: float, grace: float = 0.25) -> T:
    """``await aw`` in a task of its own, for at most ``timeout`` seconds, whatever it does.

    After ``timeout`` it is cancelled and given ``grace`` seconds to finish; then
    :class:`Overran` is raised either way, and a task that ignores its cancellation is
    left running (``Overran.task``, for the caller to name in its log). A
    cancellation of the caller cancels the task too, and propagates.
    """
    task = asyncio.ensure_future(_contained(aw))
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        await cancel_and_wait(task, grace)
        raise Overran(task, timeout)
    if task.cancelled():  # it let a CancelledError of its own out: for the caller, a failure
        raise RuntimeError("it ended with CancelledError, uncaught")
    error = task.exception()
    if error is not None and not isinstance(error, Exception):  # GeneratorExit raised by the code itself
        raise RuntimeError(f"it raised {type(error).__name__}") from error
    return task.result()


def describe(task: asyncio.Future[object], depth: int = 12) -> str:
    """One line for a log: the task's name and its chain of awaits, outermost first
    (``file:line in function``, at most ``depth`` of them)."""
    if not isinstance(task, asyncio.Task):
        return repr(task)
    where: list[str] = []
    coro: Any = task.get_coro()
    while coro is not None and len(where) < depth:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            break
        where.append(f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return f"task {task.get_name()!r} at " + (" > ".join(where) or "(no frame)")


def drop_tls_eof_warning(record: logging.LogRecord) -> bool:
    """A logging filter: drop asyncio's ``returning true from eof_received() has no effect when
    using ssl``.

    nats-py makes a TLS connection by upgrading a plain stream (``loop.start_tls``), whose
    protocol took the connection for plain and so answers an end of stream with True; asyncio
    warns of it each time the other side closes such a connection (every stop of a node with a
    ``tls://`` bus, every close of a client's). Nothing is wrong, and a WARNING trips alerts
    (an operator's walk-through); a program that configured no logging got it on stderr."""
    return not (isinstance(record.msg, str) and record.msg.startswith("returning true from eof_received()"))


def quiet_tls_eof_warnings() -> None:
    """Put :func:`drop_tls_eof_warning` on asyncio's logger (once: a filter is added only once)."""
    logging.getLogger("asyncio").addFilter(drop_tls_eof_warning)
