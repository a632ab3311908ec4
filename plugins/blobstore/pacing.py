"""What a download's client must keep up, and how a client that does not is dropped
(docs/blobstore.md, "Limits").

A download is held to what an upload is held to (:mod:`.limits`): past its first
body deadline its client must have taken :data:`~.limits.MIN_RATE` bytes per
second on average, and a client that takes nothing for two deadlines in a row
is disconnected. Two, as a client's kernel takes data in steps of up to a
receive buffer, so one deadline with nothing taken can still be a client
reading on (found by a red-team test). A dropped connection is reset, so what
waited to be sent to it is discarded too.

What "taken" means depends on how the body goes out:

- chunks written to the transport (the object store, or a file without TCP
  statistics): what was handed over minus what still waits to be sent, in the
  transport's buffer and the socket's send queue (:func:`unsent`);
- ``sendfile(2)`` (the fs backend): the file refills the send queue as the
  client reads, so what waits never shrinks; the bytes the client's kernel
  acknowledged are read from the socket instead (:func:`acked`, Linux
  ``TCP_INFO``). Before, such a download had no deadline at all, and each
  stalled one kept a descriptor on the blob's file and a send queue for as
  long as its client liked (found by a red-team test).

A download ends when its client has taken every byte, not when the last one
is handed to the kernel (:func:`drained`): a blob that fits in the socket's
buffers is handed over at once, and its download slot and the rules above
would otherwise end before the client read anything (found by a red-team
test: one member's unread downloads of small blobs held send queues with no
slot and no deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
import termios
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from unibus.aio import cancel_and_wait

from .limits import MIN_RATE

#: Offset of ``tcpi_bytes_acked`` (a u64) in Linux's ``struct tcp_info``
#: (include/uapi/linux/tcp.h, since Linux 4.1): 8 bytes of u8 fields, 24 u32
#: fields, then ``tcpi_pacing_rate`` and ``tcpi_max_pacing_rate``. The struct
#: only grows at its end, so the offset holds on every later kernel; a test
#: checks it against a real socket (tests/plugins/blobstore/test_download_pacing.py).
_BYTES_ACKED = 120


def unsent(transport: Any) -> int:
    """Bytes written to the connection that its client has not taken yet: the transport's
    buffer plus the socket's send queue (``SIOCOUTQ``; the kernel frees room in its queue
    in large steps, so its transport buffer alone can stay put while the client reads)."""
    if transport is None:
        return 0
    try:
        waiting = transport.get_write_buffer_size()
    except AttributeError:  # asyncio's TLS transport, closed twice, has let go of its protocol (red team)
        return 0
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            waiting += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    return waiting


def acked(transport: Any) -> int | None:
    """Bytes of this TCP connection its client's kernel has acknowledged so far, or None
    where the socket cannot say (not TCP, not Linux, closed)."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except (OSError, AttributeError, ValueError):
        return None
    if len(info) < _BYTES_ACKED + 8:
        return None
    return int(struct.unpack_from("=Q", info, _BYTES_ACKED)[0])


async def drained(transport: Any) -> None:
    """Return once nothing written to the connection waits to be sent (:func:`unsent` is 0).
    A client reading at speed takes the last bytes within milliseconds, so the polls start
    at 1 ms (and back off to 50 ms). A connection that is closing with bytes still waiting
    raises ``ConnectionResetError``: its client will never take them (it half-closed, which
    makes aiohttp close the connection), and the caller drops it."""
    delay = 0.001
    while transport is not None and (waiting := unsent(transport)) > 0:
        if transport.is_closing():
            raise ConnectionResetError(f"the connection closed with {waiting} bytes its client never took")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


def _linger(transport: Any, reset: bool) -> None:
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1 if reset else 0, 0))


@contextlib.contextmanager
def reset_if_closed(transport: Any) -> Iterator[None]:
    """While a download's body goes out, a close of its connection is a reset (a zero linger).

    A client that half-closes makes aiohttp close the connection at once, and a closed
    socket whose send queue still holds the blob is kept by the kernel, trying to deliver
    it, for minutes (an orphan; 333 s measured here), with no slot and no deadline: a
    red-team test held 11 MiB that way with six GETs. A reset discards the queue. The
    linger is restored once the download is over on a connection still open, so that a
    later close (keep-alive, ``Connection: close``) delivers what was sent."""
    _linger(transport, True)
    try:
        yield
    finally:
        if transport is not None and not transport.is_closing():
            _linger(transport, False)


def drop(transport: Any) -> None:
    """Close the connection at once, discarding what waits to be sent: ``abort()`` drops the
    transport's buffer, and a zero linger makes the kernel reset the connection instead of
    sending its queue on to a client that reads too slowly (a few MiB on loopback)."""
    if transport is None:
        return
    _linger(transport, True)
    transport.abort()


def _verdict(taken: int, elapsed: float, deadline: float, still: int) -> str | None:
    """Why a client that took ``taken`` bytes in ``elapsed`` seconds, nothing over the last
    ``still`` deadlines, is dropped; None while it keeps up."""
    if still >= 2:
        return f"the client read nothing for {2 * deadline:g} s"
    if elapsed > deadline and taken < MIN_RATE * (elapsed - deadline):
        return (f"the client read {taken / elapsed:.0f} bytes/s; a download must average at least "
                f"{MIN_RATE} bytes/s after its first {deadline:g} s")
    return None


async def _watch(send: Awaitable[Any], deadline: float, taken: Callable[[], int], started: float,
                 last: int) -> str | None:
    """Await ``send``; None once it is done, else why its client is dropped (``send``
    cancelled): checked every ``deadline`` against ``taken()``, the bytes the client has
    taken since the download began at loop time ``started`` (``last`` of them before
    ``send`` began). A client that keeps up the rate is never cut off, however long one
    send takes (found by a red-team test: a deadline per write cut off a client reading
    steadily but slowly)."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(send)
    still = 0  # deadlines in a row over which the client took nothing
    while True:
        try:
            done, _ = await asyncio.wait({task}, timeout=deadline)
        except asyncio.CancelledError:  # the handler is cancelled (shutdown): so is the send
            task.cancel()
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # its error, if any, is taken
            raise
        if done:
            task.result()
            return None
        now = taken()
        still = still + 1 if now <= last else 0
        why = _verdict(now, loop.time() - started, deadline, still)
        if why is not None:
            await cancel_and_wait(task)
            return why
        last = now


async def write_while_read(request: Any, response: Any, chunk: bytes, deadline: float, started: float,
                           handed: int) -> str | None:
    """``response.write(chunk)``; None once written, else why the client is dropped (the write
    cancelled). ``started`` is when the download began (loop time); ``handed`` the bytes
    handed over before this chunk. What the client took is what was handed over, this chunk
    included, minus what still waits to be sent (:func:`unsent`)."""
    transport = request.transport
    before = handed - unsent(transport)
    return await _watch(response.write(chunk), deadline, lambda: handed + len(chunk) - unsent(transport), started,
                        before)


async def drain_while_read(request: Any, deadline: float, started: float, handed: int) -> str | None:
    """Wait until the client has taken all ``handed`` bytes (:func:`drained`); None then, else
    why it is dropped, by the same rules as :func:`write_while_read`."""
    transport = request.transport

    def taken() -> int:
        return handed - unsent(transport)

    return await _watch(drained(transport), deadline, taken, started, taken())


async def sendfile_while_read(request: Any, file: Any, size: int, deadline: float) -> str | None:
    """The whole ``file`` (``size`` bytes) to the client with ``sendfile(2)``, until the client
    has taken it all (:func:`drained`); None then, else why the client is dropped. What the
    client took is read from the socket (:func:`acked`): the caller checks that it can be and
    that the connection is plain TCP (else :func:`write_while_read` per chunk: asyncio's
    fallback for TLS fails on a reset with an error of its own); a connection that stopped
    reporting it since has ended."""
    loop = asyncio.get_running_loop()
    transport = request.transport
    base = acked(transport)
    if base is None:
        return "the connection ended"

    def taken() -> int:
        now = acked(transport)
        return 0 if now is None else now - base  # None: the connection is gone, and so is the send

    async def send() -> None:
        await loop.sendfile(transport, file, 0, size, fallback=False)
        await drained(transport)

    return await _watch(send(), deadline, taken, loop.time(), 0)


def can_sendfile(transport: Any) -> bool:
    """Whether :func:`sendfile_while_read` can serve this connection: plain TCP (no TLS) that
    reports what its client acknowledged."""
    return (transport is not None and not transport.is_closing()
            and transport.get_extra_info("sslcontext") is None and acked(transport) is not None)


__all__ = ["acked", "can_sendfile", "drain_while_read", "drained", "drop", "reset_if_closed", "sendfile_while_read",
           "unsent", "write_while_read"]
