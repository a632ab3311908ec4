"""The filesystem backend's staging file: each chunk hashed and written at once, in two threads."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading

import pytest
from unibus.plugins.blobstore.backend import StagedFile


async def _cancel(task):
    """Cancel ``task`` and see it end cancelled."""
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def _hold(monkeypatch, obj, name):
    """Make ``obj.<name>`` (a method the worker threads run) wait for the returned event."""
    entered, release = threading.Event(), threading.Event()
    real = getattr(obj, name)

    def held(*args):
        entered.set()
        assert release.wait(30)
        return real(*args)

    monkeypatch.setattr(obj, name, held)
    return entered, release


async def _finish_cancelled_in_its_flush(monkeypatch, staged):
    """A finish of one written chunk, cancelled while its flush is held in the worker thread; the
    event that lets the flush go on."""
    await staged.write(b"x" * 1000)
    entered, release = _hold(monkeypatch, staged, "_finish_sync")
    finish = asyncio.create_task(staged.finish())
    assert await asyncio.to_thread(entered.wait, 30)
    await _cancel(finish)
    return release


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
    entered, release = _hold(monkeypatch, staged, "_write_sync")
    await staged.write(b"x" * 1000)
    assert await asyncio.to_thread(entered.wait, 30)
    second = asyncio.create_task(staged.write(b"y"))
    await asyncio.sleep(0.05)
    await _cancel(second)
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


async def test_a_finish_cancelled_during_its_flush_leaves_the_file_to_it(tmp_path, monkeypatch):
    """Red team: the flush closes the file, and a discard that did not wait for it closed the same
    descriptor again, by then sometimes another file's (rmtree's own directory descriptor)."""
    staged = StagedFile(tmp_path)
    release = await _finish_cancelled_in_its_flush(monkeypatch, staged)
    discard = asyncio.create_task(staged.discard())
    await asyncio.sleep(0.2)
    try:
        assert not discard.done()  # waiting for the flush, which closes the file itself
    finally:
        release.set()
    await asyncio.wait_for(discard, 30)  # no EBADF from a second close
    assert staged._fd is None
    assert not staged.dir.exists()


async def _discard_under_a_held_write(monkeypatch, staged):
    """A discard task started while a written chunk's write is held in its worker thread; the
    file's descriptor, the task, and the event that lets the write go on."""
    entered, release = _hold(monkeypatch, staged, "_write_sync")
    await staged.write(b"x" * 1000)
    assert await asyncio.to_thread(entered.wait, 30)
    return staged._fd, asyncio.create_task(staged.discard()), release


async def test_a_discard_cancelled_while_a_chunk_is_in_flight_still_closes_and_removes_it(tmp_path, monkeypatch):
    staged = StagedFile(tmp_path)
    fd, discard, release = await _discard_under_a_held_write(monkeypatch, staged)
    await asyncio.sleep(0.05)
    await _cancel(discard)
    os.fstat(fd)  # not closed under the write
    release.set()
    for _ in range(300):  # closed and removed once the write is done
        if not staged.dir.exists():
            break
        await asyncio.sleep(0.01)
    assert not staged.dir.exists()
    assert staged._fd is None
    with pytest.raises(OSError):
        os.fstat(fd)


def _cancel_every_task():
    """What the event loop's close does (unibus.daemon, asyncio.run): cancel every task but this one."""
    me = asyncio.current_task()
    for task in asyncio.all_tasks():
        if task is not me:
            task.cancel()


async def _closed_and_removed(staged):
    for _ in range(300):  # bounded: the worker thread that does it may still be running
        if staged._fd is None and not staged.dir.exists():
            return True
        await asyncio.sleep(0.01)
    return False


async def test_a_discard_under_a_write_survives_the_loop_s_close_and_the_last_thread_closes_the_file(
        tmp_path, monkeypatch):
    """Red team: the loop's close cancelled the cleanup task while it waited for a chunk's write (or
    before it ever ran); the descriptor then stayed open until the process exited."""
    staged = StagedFile(tmp_path)
    fd, discard, release = await _discard_under_a_held_write(monkeypatch, staged)
    await asyncio.sleep(0)  # it has started, and no more
    _cancel_every_task()
    with pytest.raises(asyncio.CancelledError):
        await discard
    os.fstat(fd)  # not closed under the write
    assert staged.dir.exists()
    release.set()
    assert await _closed_and_removed(staged)  # by the write's own thread, when it returned


async def test_a_discard_queued_behind_a_busy_executor_survives_the_loop_s_close(tmp_path):
    """Red team: with every worker thread busy, the close was still queued when the loop's close
    cancelled the task waiting for it, and was never run."""
    staged = StagedFile(tmp_path)
    await staged.write(b"x" * 1000)
    await staged.finish()
    loop, release = asyncio.get_running_loop(), threading.Event()
    blockers = []
    for _ in range(64):  # more than the default executor's threads
        blockers.append(loop.run_in_executor(None, release.wait, 30))
    await asyncio.sleep(0.05)
    discard = asyncio.create_task(staged.discard())
    await asyncio.sleep(0.05)
    assert staged.dir.exists()  # queued
    _cancel_every_task()
    with pytest.raises(asyncio.CancelledError):
        await discard
    release.set()
    await asyncio.gather(*blockers, return_exceptions=True)
    assert await _closed_and_removed(staged)


async def test_a_discard_after_the_executor_is_shut_down_closes_the_file_at_once(tmp_path):
    staged = StagedFile(tmp_path)
    await staged.write(b"x" * 1000)
    await staged.finish()
    await asyncio.get_running_loop().shutdown_default_executor()  # as the loop's close does
    await staged.discard()
    assert staged._fd is None
    assert not staged.dir.exists()


async def test_a_discard_retrieves_the_error_of_a_failed_write_nobody_waited_for(tmp_path):
    """Red team: a chunk's write failed while its caller waited for the next chunk, the caller was
    cancelled, and the discard, with no job running, left the failed future unretrieved."""
    import errno
    import gc

    staged = StagedFile(tmp_path)

    def no_space(parts):
        raise OSError(errno.ENOSPC, "No space left on device")

    staged._write_sync = no_space  # not monkeypatch: it would keep the file object alive past the test's gc
    lost = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: lost.append(context))
    await staged.write(b"x" * 1000)  # handed over; the write fails in its thread
    for _ in range(300):
        if not staged._jobs:
            break
        await asyncio.sleep(0.01)
    await staged.discard()
    assert not staged.dir.exists()
    del staged
    gc.collect()  # a future's lost exception is reported when it is collected
    await asyncio.sleep(0)
    assert lost == []


async def test_after_a_failed_write_every_later_call_fails_too(tmp_path):
    """Red team: a caller that went on after an error could finish a file that missed a chunk."""
    staged = StagedFile(tmp_path)
    good = staged._fd
    staged._fd = os.open(os.devnull, os.O_RDONLY)  # the next chunk's write fails
    await staged.write(b"x" * 1000)
    with pytest.raises(OSError):
        await staged.write(b"y")
    os.close(staged._fd)
    staged._fd = good
    with pytest.raises(OSError):
        await staged.write(b"z")
    with pytest.raises(OSError):
        await staged.finish()
    assert staged.digest is None
    await staged.discard()
    assert not staged.dir.exists()


async def test_a_second_discard_waits_for_the_first_instead_of_closing_again(tmp_path, monkeypatch):
    """Red team: a discard after a cancelled one raced the first one's late close (EBADF, or another
    file's descriptor closed)."""
    staged = StagedFile(tmp_path)
    entered, release = _hold(monkeypatch, staged, "_write_sync")
    await staged.write(b"x" * 1000)
    assert await asyncio.to_thread(entered.wait, 30)
    first = asyncio.create_task(staged.discard())
    await asyncio.sleep(0.05)
    await _cancel(first)
    second = asyncio.create_task(staged.discard())
    third = asyncio.create_task(staged.discard())
    await asyncio.sleep(0.05)
    assert not second.done() and not third.done()
    release.set()
    await asyncio.wait_for(asyncio.gather(second, third), 30)  # no EBADF
    assert staged._fd is None
    assert not staged.dir.exists()
    with pytest.raises(RuntimeError, match="discarded"):
        await staged.write(b"y")
    with pytest.raises(RuntimeError, match="discarded"):
        await staged.finish()


async def test_a_finish_called_again_after_a_cancelled_flush_gets_the_digest(tmp_path, monkeypatch):
    staged = StagedFile(tmp_path)
    release = await _finish_cancelled_in_its_flush(monkeypatch, staged)
    again = asyncio.create_task(staged.finish())
    await asyncio.sleep(0.05)
    assert not again.done()  # the same flush, not a second one
    release.set()
    assert await asyncio.wait_for(again, 30) == hashlib.sha256(b"x" * 1000).digest()
    await staged.discard()
    assert not staged.dir.exists()


# --------------------------------------------------------------------------- the filesystem backend's upload


async def _fs_backend(tmp_path):
    from unibus.plugins.blobstore.fs import FsBackend

    backend = FsBackend(tmp_path / "blobs")
    await backend.start()
    return backend


async def test_an_upload_cancelled_while_its_staging_file_is_made_leaves_nothing(tmp_path, monkeypatch):
    """Red team: begin() makes the staging file in a worker thread, and a caller cancelled meanwhile
    (membershipd stopping) left its descriptor open and its directory behind until the next start."""
    from unibus.plugins.blobstore import fs

    backend = await _fs_backend(tmp_path)
    entered, release, made = threading.Event(), threading.Event(), []

    class HeldUpload(fs.FsUpload):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)
            entered.set()
            assert release.wait(30)

    monkeypatch.setattr(fs, "FsUpload", HeldUpload)
    begin = asyncio.create_task(backend.begin("room1"))
    assert await asyncio.to_thread(entered.wait, 30)
    await _cancel(begin)
    os.fstat(made[0].staged._fd)  # made, and still open: nobody holds it
    release.set()
    for _ in range(300):  # bounded: closed and removed once the thread is done
        if not backend.staging_entries() and made[0].staged._fd is None:
            break
        await asyncio.sleep(0.01)
    assert backend.staging_entries() == []
    assert made[0].staged._fd is None  # closed (set only once os.close returned)


async def test_a_commit_cancelled_during_its_rename_is_finished_before_abort_cleans_up(tmp_path, monkeypatch):
    """Red team: a commit cancelled while its rename ran in a thread let abort() remove the staged
    files under it (an empty blob directory), or left a stored blob out of the counters."""
    backend = await _fs_backend(tmp_path)
    upload = await backend.begin("room1")
    body = os.urandom(100_000)
    await upload.write(body)
    entered, release = _hold(monkeypatch, backend, "_install")
    commit = asyncio.create_task(upload.commit("alice"))
    assert await asyncio.to_thread(entered.wait, 30)
    await _cancel(commit)
    abort = asyncio.create_task(upload.abort())  # what the HTTP handler's finally does
    await asyncio.sleep(0.1)
    try:
        assert not abort.done()  # waiting for the rename
    finally:
        release.set()
    await asyncio.wait_for(abort, 30)
    blob_id = hashlib.sha256(body).hexdigest()
    info = await backend.info("room1", blob_id)
    assert info is not None and info.size == len(body)
    reader = await backend.open("room1", blob_id)
    async with reader:
        assert b"".join([c async for c in reader.chunks()]) == body
    assert backend.stats() == {"backend": "fs", "blobs": 1, "bytes": len(body)}
    assert backend.staging_entries() == []


async def test_a_commit_whose_rename_fails_removes_its_staging_directory(tmp_path, monkeypatch):
    from unibus.plugins.blobstore.backend import BlobError

    backend = await _fs_backend(tmp_path)
    upload = await backend.begin("room1")
    await upload.write(b"x" * 1000)

    def broken(*args):
        raise BlobError("cannot store blob: no space left on device")

    monkeypatch.setattr(backend, "_install", broken)
    with pytest.raises(BlobError, match="no space"):
        await upload.commit("alice")
    assert backend.staging_entries() == []  # the commit removed them itself, with no abort to count on
    await upload.abort()
    assert backend.staging_entries() == []
    assert backend.stats()["blobs"] == 0


async def test_a_failed_install_whose_every_waiter_was_cancelled_logs_no_lost_exception(tmp_path, monkeypatch):
    """Red team: a commit cancelled, then its abort cancelled too, and the rename failing: nobody
    retrieved the install's error, and asyncio logged "Task exception was never retrieved"."""
    from unibus.plugins.blobstore.backend import BlobError
    import gc

    backend = await _fs_backend(tmp_path)
    upload = await backend.begin("room1")
    await upload.write(b"x" * 1000)
    entered, release = threading.Event(), threading.Event()

    def held_then_broken(*args):
        entered.set()
        assert release.wait(30)
        raise BlobError("cannot store blob: input/output error")

    monkeypatch.setattr(backend, "_install", held_then_broken)
    lost = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: lost.append(context))
    commit = asyncio.create_task(upload.commit("alice"))
    assert await asyncio.to_thread(entered.wait, 30)
    await _cancel(commit)
    abort = asyncio.create_task(upload.abort())
    await asyncio.sleep(0.05)
    await _cancel(abort)
    installing = upload._committing
    release.set()
    await asyncio.wait([installing], timeout=30)
    assert installing.done() and not installing.cancelled()  # failed (reading its error here would retrieve it)
    del commit, abort, installing, upload
    gc.collect()  # the task's exception is reported when it is collected
    await asyncio.sleep(0)
    assert lost == []
    assert backend.staging_entries() == []


async def test_a_blob_whose_room_directory_cannot_be_synced_is_counted_and_the_commit_fails(tmp_path, monkeypatch):
    """Red team: the rename had made the blob visible, and the fsync's OSError left it out of the counts
    (a raw OSError, where the backend raises BlobError)."""
    from unibus.plugins.blobstore import fs
    from unibus.plugins.blobstore.backend import BlobError

    backend = await _fs_backend(tmp_path)
    upload = await backend.begin("room1")
    await upload.write(b"x" * 1234)
    real = fs.fsync_dir

    def failing(path):
        if path.name == "room1":
            raise OSError(5, "Input/output error")
        return real(path)

    monkeypatch.setattr(fs, "fsync_dir", failing)
    with pytest.raises(BlobError, match="is stored, but its room directory could not be synced"):
        await upload.commit("alice")
    await upload.abort()
    assert backend.stats() == {"backend": "fs", "blobs": 1, "bytes": 1234}
    assert [i.size for i in await backend.list_room("room1")] == [1234]
    assert backend.staging_entries() == []
    monkeypatch.setattr(fs, "fsync_dir", real)
    again = await backend.begin("room1")  # the client's retry: the idempotent case
    await again.write(b"x" * 1234)
    info, created = await again.commit("alice")
    assert (info.size, created) == (1234, False)
    assert backend.stats()["blobs"] == 1


def test_a_staging_file_that_cannot_be_opened_leaves_no_directory(tmp_path, monkeypatch):
    """Red team: out of descriptors (EMFILE), the staging directory stayed until the next start."""
    import errno

    def no_descriptors(*args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "open", no_descriptors)
    with pytest.raises(OSError, match="Too many open files"):
        StagedFile(tmp_path)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


async def test_a_commit_whose_own_task_is_cancelled_still_renames_and_syncs_and_abort_removes_nothing(
        tmp_path, monkeypatch):
    """Review: a stop that overruns its limits closes the loop, which cancels every task, the commit's
    own too. Its thread still writes, renames and syncs; abort must not remove the files under it,
    and the next start counts the blob."""
    from unibus.plugins.blobstore import fs

    backend = await _fs_backend(tmp_path)
    upload = await backend.begin("room1")
    body = os.urandom(50_000)
    await upload.write(body)
    entered, release = _hold(monkeypatch, backend, "_install")
    synced = []
    real_fsync = fs.fsync_dir

    def fsync_dir(path):
        synced.append(path.name)
        return real_fsync(path)

    monkeypatch.setattr(fs, "fsync_dir", fsync_dir)
    commit = asyncio.create_task(upload.commit("alice"))
    assert await asyncio.to_thread(entered.wait, 30)
    await _cancel(commit)
    upload._committing.cancel()  # what the loop's close does to every task left
    abort = asyncio.create_task(upload.abort())
    await asyncio.wait_for(abort, 30)  # returns at once: nothing is removed under the rename
    assert len(backend.staging_entries()) == 1
    release.set()
    blob_id = hashlib.sha256(body).hexdigest()
    for _ in range(300):  # bounded: the thread goes on to the rename and the room directory's fsync
        if "room1" in synced:
            break
        await asyncio.sleep(0.01)
    assert "room1" in synced
    assert backend.staging_entries() == []
    again = await _fs_backend(tmp_path)  # the next start
    assert again.stats() == {"backend": "fs", "blobs": 1, "bytes": len(body)}
    reader = await again.open("room1", blob_id)
    async with reader:
        assert b"".join([c async for c in reader.chunks()]) == body


async def test_a_job_whose_thread_fails_to_start_is_withdrawn_and_never_runs(tmp_path, monkeypatch,
                                                                             second_thread_start_fails):
    """Red team: ``ThreadPoolExecutor.submit`` queues a job, then starts a thread for it; at the
    process's thread limit that start raises, and ``run_in_executor`` with it, but the job stays
    queued and runs once a busy thread is free. Counted out by the caller and run anyway, it made
    the job count negative, and the write ran on a file already closed. It is withdrawn: it never
    runs, the count stays right, and the last job that did run still closes the file."""
    staged = StagedFile(tmp_path)
    entered, release = _hold(monkeypatch, staged, "_hash_sync")  # the one thread stays busy
    ran = []
    write = staged._write_sync
    staged._write_sync = lambda parts: (ran.append(parts), write(parts))
    try:
        with pytest.raises(RuntimeError, match="can't start new thread"):
            await staged.write(b"x" * 1000)  # the hash's job started; the write's is queued, its thread not
        assert await asyncio.to_thread(entered.wait, 30)
        await staged.discard()  # the hash still runs: the file is left to it
        assert staged.dir.exists()
    finally:
        release.set()  # a failed check must not leave the thread waiting out its 30 s
    assert await _closed_and_removed(staged)  # by the hash's thread, the last job that ran
    stopping = threading.Thread(target=second_thread_start_fails.shutdown)  # waits for the queued write job
    stopping.start()
    for _ in range(300):  # bounded
        if not stopping.is_alive():
            break
        await asyncio.sleep(0.01)
    assert not stopping.is_alive()
    assert ran == []
    assert staged._jobs == 0
