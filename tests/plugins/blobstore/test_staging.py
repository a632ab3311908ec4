"""The filesystem backend's staging file: each chunk hashed and written at once, in two threads."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading

import pytest
from unibus.plugins.blobstore.backend import StagedFile


async def test_the_digest_and_the_file_hold_every_part_in_order(tmp_path):
    staged = StagedFile(tmp_path)
    parts = [os.urandom(n) for n in (1, 4 << 20, 0, 65536, 3, 9 << 20)]
    for p in parts:
        await staged.write(p)
    await staged.write([b"ab", b"", memoryview(b"cd"), bytearray(b"e")])
    whole = b"".join(parts) + b"abcde"
    assert await staged.finish() == hashlib.sha256(whole).digest()
    assert staged.path.read_bytes() == whole
    assert staged.size == len(whole)


async def test_a_write_error_is_raised_by_the_next_call_after_both_threads_are_done(tmp_path):
    staged = StagedFile(tmp_path)
    os.close(staged._fd)
    staged._fd = os.open(os.devnull, os.O_RDONLY)  # the next chunk's write fails (EBADF), its hash does not
    try:
        await staged.write(b"x" * 1000)
        with pytest.raises(OSError):
            await staged.write(b"y")
        assert staged._pending == []
    finally:
        os.close(staged._fd)
        staged._fd = None
    await staged.discard()
    assert not staged.dir.exists()


async def test_a_write_cancelled_while_a_chunk_is_in_flight_leaves_it_for_discard_to_wait_for(tmp_path,
                                                                                                monkeypatch):
    """The threads cannot be stopped: a cancelled upload must not close the file under its last write
    (the descriptor's number could be another file's by then)."""
    staged = StagedFile(tmp_path)
    entered, release = threading.Event(), threading.Event()
    real = staged._write_sync

    def held(parts):
        entered.set()
        assert release.wait(30)
        real(parts)

    monkeypatch.setattr(staged, "_write_sync", held)
    await staged.write(b"x" * 1000)
    assert await asyncio.to_thread(entered.wait, 30)
    second = asyncio.create_task(staged.write(b"y"))
    await asyncio.sleep(0.05)
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    fd = staged._fd
    discard = asyncio.create_task(staged.discard())
    await asyncio.sleep(0.2)
    try:
        assert not discard.done()  # waiting for the write in flight
        os.fstat(fd)  # and the file is still open under it
    finally:
        release.set()
    await asyncio.wait_for(discard, 30)
    assert not staged.dir.exists()
