"""`unibus.client.seen.SeenIds`: the msg ids a member's listeners accepted, kept across runs.

Real files in a temporary directory; the clock is passed in (``now_ms``) where a test moves it.
"""

from __future__ import annotations

import os
import stat
import threading
import time

import pytest

from unibus.client import seen as seen_mod
from unibus.client.replica import ReplicaError
from unibus.client.seen import SeenIds

MIN = 60_000
NOW = int(time.time() * 1000) // MIN * MIN + 1000  # now, in unix ms, one second into its minute
ID = "A" * 22


def _id(n: int) -> str:
    return f"{n:022d}"


def _ids(tmp_path, room="r1", window_ms=300_000) -> SeenIds:
    return SeenIds(tmp_path / "root" / "seen" / "fp", room, window_ms)


def test_ids_added_are_loaded_by_a_later_run_and_files_are_private(tmp_path):
    one = _ids(tmp_path)
    one.load(NOW)
    one.add(ID, NOW - 1000)
    one.add(_id(2), NOW + 1000)
    later = _ids(tmp_path)
    assert sorted(later.load(NOW + 5000)) == [(NOW - 1000, ID), (NOW + 1000, _id(2))]
    for path in [later.directory, later.directory.parent, *later.directory.iterdir()]:
        mode = stat.S_IMODE(os.lstat(path).st_mode)
        assert mode & 0o077 == 0, (path, oct(mode))


def test_a_later_run_loads_ids_newer_than_its_window_too(tmp_path):
    """A second review: a run with a window of 300 s accepted a message stamped 25 s ahead, and a
    run with a window of 10 s loaded only ids within ±10 s of its clock, so the same message,
    published again, became fresh and was accepted 14 s later."""
    first = _ids(tmp_path, window_ms=300_000)
    first.load(NOW)
    first.add(ID, NOW + 25_000)
    assert _ids(tmp_path, window_ms=10_000).load(NOW) == [(NOW + 25_000, ID)]
    assert _ids(tmp_path, window_ms=10_000).load(NOW + 40_000) == []  # gone from the window: stale anyway


def test_old_files_are_removed_while_a_listener_runs_and_other_rooms_after_a_day(tmp_path):
    """A second review: files were removed only when a listener started (3.8 MB in 15 s of a
    flood, kept until the next start), and a room never listened to again kept its files."""
    mine, other = _ids(tmp_path, "r1"), _ids(tmp_path, "r2")
    mine.load(NOW)
    other.load(NOW)
    other.add(ID, NOW)
    mine.add(ID, NOW)
    start = NOW // MIN
    assert {p.name for p in mine.directory.iterdir()} == {f"r1.{start}", f"r2.{start}"}
    # an hour later, still running: the next add removes this room's old file, not the other room's
    later = NOW + 3_600_000
    mine._pruned = -1  # as when the wall clock's minute has moved on
    real = seen_mod.time.time
    try:
        seen_mod.time.time = lambda: later / 1000
        mine.add(_id(3), later)
    finally:
        seen_mod.time.time = real
    assert {p.name for p in mine.directory.iterdir()} == {f"r2.{start}", f"r1.{later // MIN}"}
    _ids(tmp_path, "r1").load(NOW + 86_400_000 + 3 * MIN)  # a day on: the other room's file goes too
    assert f"r2.{start}" not in {p.name for p in mine.directory.iterdir()}


def test_a_flood_is_kept_on_disk_up_to_a_bound_per_minute_of_the_clock(tmp_path, monkeypatch):
    """At most MAX_LINES_PER_MINUTE lines a minute of the listener's clock, whatever minutes the
    messages name (a third review spread a flood's times over eight files, when the bound was per
    file); the count starts again the next minute."""
    monkeypatch.setattr(seen_mod, "MAX_LINES_PER_MINUTE", 50)
    clock = [NOW / 1000]
    monkeypatch.setattr(seen_mod.time, "time", lambda: clock[0])
    ids = _ids(tmp_path)
    ids.load(NOW)
    for n in range(80):
        ids.add(_id(n), NOW + (n % 8 - 4) * MIN // 2)  # times over several minutes' files
    assert len(_ids(tmp_path).load(NOW)) == 50
    clock[0] += 60
    ids.add(_id(99), NOW)
    assert len(_ids(tmp_path).load(NOW + MIN)) == 51


def test_a_directory_removed_while_a_listener_runs_is_made_again(tmp_path):
    ids = _ids(tmp_path)
    ids.load(NOW)
    ids.add(ID, NOW)
    for path in ids.directory.iterdir():
        path.unlink()
    ids.directory.rmdir()
    ids.add(_id(1), NOW)
    assert _ids(tmp_path).load(NOW) == [(NOW, _id(1))]
    assert stat.S_IMODE(os.lstat(ids.directory).st_mode) == 0o700


def test_odd_entries_are_refused_or_skipped_never_waited_on(tmp_path):
    """A second review: a FIFO under a file's name hung the listener's start (and would hang an
    add); a name like ``r1.²`` passed ``isdigit`` and ended in an ``int()`` error."""
    ids = _ids(tmp_path)
    ids.load(NOW)
    minute = NOW // MIN
    (ids.directory / "r1.\u00b2").write_text("x")  # not an ASCII minute: not one of ours
    (ids.directory / "r1.12.tmp").write_text("x")
    with (ids.directory / f"r1.{minute}").open("w") as f:
        f.write(f"{NOW} {ID}\n{NOW} short\ngarbage\n{NOW} {_id(1)}")  # the last line cut short: kept (well formed)
    assert sorted(ids.load(NOW)) == [(NOW, _id(1)), (NOW, ID)]
    fifo = ids.directory / f"r1.{minute + 1}"
    os.mkfifo(fifo, 0o600)
    result: list[object] = []
    worker = threading.Thread(target=lambda: result.append(_try(lambda: _ids(tmp_path).load(NOW + MIN))), daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "load() waited on a FIFO"
    assert isinstance(result[0], ReplicaError) and "not a regular file" in str(result[0])
    ids.add(_id(5), NOW + MIN)  # logged, not raised, not waited on
    os.unlink(fifo)


def test_a_link_or_another_users_directory_is_refused(tmp_path):
    ids = _ids(tmp_path)
    ids.directory.parent.mkdir(parents=True, mode=0o700)
    (tmp_path / "elsewhere").mkdir()
    ids.directory.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ReplicaError, match="is not a directory"):
        ids.load(NOW)


def _try(fn):
    try:
        return fn()
    except Exception as exc:  # the test looks at it
        return exc
