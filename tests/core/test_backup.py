"""membershipd backup and restore of a single node (and of a KV state, through one daemon's NATS).

Real daemons, real SQLite, real nats-server. The archive is attacked the way
a corrupted disk or a hostile file would: every refusal is exit 2 with one
line, and nothing is written anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import io
import json
import os
import sqlite3
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import pytest

from unibus.backup import manifest_digest
from unibus.cli import main
from unibus.client import UnibusClient
from unibus.client.blobs import get_raw_blob, put_raw_blob
from unibus.client.keys import generate_identity
from unibus.servicekey import ensure_service_nkey
from unibus.store.base import Conflict, NotFound
from unibus.store.fromkv import rows_from_kv
from unibus.store.kv import KvStore
from unibus.testing import MembershipdProcess, bootstrap_member, run_membershipd, run_membershipd_to_full_disk

from storecheck import assert_rows_match_log, read_store, replay, stored_blobs


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``membershipd ARGS`` in this process: the console script's code, without its start-up cost."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse
            code = e.code
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def one_line(proc: subprocess.CompletedProcess[str], code: int, needle: str) -> None:
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and needle in errors[0], proc.stderr


# --------------------------------------------------------------------------- archives


def members_of(archive: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(archive) as tar:
        return [(i, tar.extractfile(i).read() if i.isfile() else None) for i in tar.getmembers()]


def write_members(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], gz: bool = False) -> Path:
    with tarfile.open(path, "w:gz" if gz else "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info = _copy(info)
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return path


def _copy(info: tarfile.TarInfo) -> tarfile.TarInfo:
    new = tarfile.TarInfo(info.name)
    new.size, new.mode, new.mtime, new.type, new.linkname = info.size, info.mode, info.mtime, info.type, info.linkname
    return new


def manifest_of(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> dict[str, Any]:
    return json.loads(next(d for i, d in members if i.name == "manifest.json"))


def with_manifest(members: list[tuple[tarfile.TarInfo, bytes | None]], manifest: dict[str, Any], *,
                  redigest: bool = True) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    if redigest:
        manifest = {**manifest, "digest": manifest_digest(manifest)}
    body = json.dumps(manifest).encode()
    return [(i, body if i.name == "manifest.json" else d) for i, d in members]


def relisted(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """The same members with a manifest that lists them exactly, digest recomputed: only content checks remain."""
    manifest = manifest_of(members)
    manifest["files"] = [{"path": i.name, "sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
                         for i, d in members if i.name != "manifest.json" and d is not None]
    return with_manifest(members, manifest)


def regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o600
    return info, data


def special(name: str, kind: bytes, target: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


# --------------------------------------------------------------------------- a small source, backed up once


class Source:
    """A daemon with alice (admin), bob, a rekeyed room with a blob; its backup; its secrets."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.alice = generate_identity("alice")
        self.bob = generate_identity("bob")
        self.data_dir = root / "source"
        bootstrap_member(self.data_dir, self.alice, "admin")
        self.daemon = MembershipdProcess(self.data_dir).start()
        try:  # a failure after the start must not leave the daemon running: the fixture's finally never runs
            self.blob = os.urandom(150_000)
            asyncio.run(self._fill())
            self.archive = root / "source.tar"
            proc = cli("backup", "--out", str(self.archive), "--data-dir", str(self.data_dir))
            assert proc.returncode == 0, proc.stderr
            self.members = members_of(self.archive)
        except BaseException:
            self.daemon.stop()
            raise

    async def _fill(self) -> None:
        async with UnibusClient(self.daemon.base_url, self.alice) as a:
            await a.add_member("bob", self.bob.sign_pub_b64, self.bob.enc_pub_b64, bus_pub=self.bob.bus_pub)
            self.room = (await a.create_room("ops"))["room_id"]
            await a.add_room_member(self.room, "bob")
            await a.rekey(self.room)
            await a.remove_room_member(self.room, "bob")
            await a.rekey(self.room)
            self.other = (await a.create_room("other"))["room_id"]
            await a.rekey(self.other)
            path = self.root / "blob.bin"
            path.write_bytes(self.blob)
            self.blob_id = await put_raw_blob(a, self.room, path)

    def secrets(self) -> dict[str, bytes]:
        """Every secret in the data directory: none may be in an archive."""
        found = {}
        for name in ("service.nkey", "system.nkey", "plugins/auth_enforce/issuer.nkey"):
            path = self.data_dir / name
            if path.exists():
                found[name] = path.read_bytes().strip()
        return found


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Any:
    s = Source(tmp_path_factory.mktemp("backup-source"))
    try:
        yield s
    finally:
        s.daemon.stop()


def restore_into(archive: Path, data_dir: Path) -> subprocess.CompletedProcess[str]:
    return cli("restore", "--in", str(archive), "--data-dir", str(data_dir))


def assert_nothing_written(area: Path) -> None:
    """Nothing in the directory around the target: not the target, not a temporary directory, not ../x."""
    assert sorted(p.name for p in area.iterdir()) == ["archive"], sorted(p.name for p in area.iterdir())


# --------------------------------------------------------------------------- under load


class Workload:
    """Membership changes, rekeys and blob uploads, each recorded once acknowledged (2xx)."""

    def __init__(self, client: UnibusClient, files: Path) -> None:
        self.client = client
        self.files = files
        self.acked: list[tuple[Any, ...]] = []
        self.blobs: dict[tuple[str, str], bytes] = {}
        self.rooms: list[str] = []

    async def blob(self, room: str, size: int) -> str:
        data = os.urandom(size)
        path = self.files / f"{len(self.blobs)}.bin"
        path.write_bytes(data)
        blob_id = await put_raw_blob(self.client, room, path)
        self.blobs[(room, blob_id)] = data
        self.acked.append(("blob", room, blob_id))
        return blob_id

    async def round(self, i: int) -> None:
        c = self.client
        ident = generate_identity(f"m{i}")
        await c.add_member(ident.handle, ident.sign_pub_b64, ident.enc_pub_b64, bus_pub=ident.bus_pub)
        self.acked.append(("member", ident.handle))
        room = (await c.create_room(f"room {i}"))["room_id"]
        self.rooms.append(room)
        self.acked.append(("room", room))
        for r in self.rooms[-2:]:
            await c.add_room_member(r, ident.handle)
            self.acked.append(("roster", r, ident.handle))
            epoch = await c.rekey(r)
            self.acked.append(("epoch", r, epoch))
        await self.blob(room, 1 + (i * 7919) % 60_000)

    async def run(self, stop: asyncio.Event, start: int) -> int:
        i = start
        while not stop.is_set():
            await self.round(i)
            i += 1
        return i


async def writer_under_way(writer: asyncio.Task, ready: Callable[[], bool], timeout: float = 120) -> None:
    """Until ``ready()``: what stopped ``writer`` if it ended first, TimeoutError if it never gets there."""

    async def wait() -> None:
        while not ready():
            if writer.done():
                writer.result()  # raises what stopped it
                raise AssertionError("the writer stopped before it was under way")
            await asyncio.sleep(0.01)

    await asyncio.wait_for(wait(), timeout)


async def test_backup_under_write_load_restores_exactly_one_instant(tmp_path, daemon_with_admin, alice,
                                                                    membershipd_factory):
    src = daemon_with_admin()
    files = tmp_path / "files"
    files.mkdir()
    async with UnibusClient(src.base_url, alice) as a:
        load = Workload(a, files)
        # Changes undone before the backup: the restored state must not have them.
        gone = generate_identity("gone")
        await a.add_member("gone", gone.sign_pub_b64, gone.enc_pub_b64, bus_pub=gone.bus_pub)
        doomed = (await a.create_room("doomed"))["room_id"]
        await a.add_room_member(doomed, "gone")
        await a.rekey(doomed)
        doomed_blob = await load.blob(doomed, 1000)
        for i in range(2):
            await load.round(i)
        dropped_blob = await load.blob(load.rooms[0], 2000)
        await a.request("DELETE", f"/v1/rooms/{load.rooms[0]}/blobs/{dropped_blob}")
        await a.remove_member("gone")
        await a.delete_room(doomed)

        stop = asyncio.Event()
        writer = asyncio.create_task(load.run(stop, 2))
        await writer_under_way(writer, lambda: len(load.acked) >= 15)
        acked_before = list(load.acked)
        archive = tmp_path / "under-load.tar.gz"
        backup = await asyncio.to_thread(cli, "backup", "--out", str(archive), "--data-dir", str(src.data_dir))
        acked_during = len(load.acked) - len(acked_before)
        stop.set()
        rounds = await writer
    assert backup.returncode == 0, backup.stderr
    print(f"{len(acked_before)} changes acknowledged before the backup, {acked_during} while it ran, "
          f"{rounds} rounds")
    src.stop()
    source = read_store(src.data_dir / "membershipd.db")
    source_blobs = stored_blobs(src.data_dir)

    restored_dir = tmp_path / "restored"
    proc = await asyncio.to_thread(restore_into, archive, restored_dir)
    assert proc.returncode == 0, proc.stderr
    manifest = manifest_of(members_of(archive))
    got = read_store(restored_dir / "membershipd.db")

    # The log: a byte-identical prefix of the source's, up to the head the manifest names, that replays.
    head = manifest["log_head"]
    assert got["log"] == source["log"][:head["seq"] + 1]
    assert got["log"][-1][:2] == (head["seq"], head["hash"])
    assert got["nonces"] == {k: v for k, v in source["nonces"].items() if v <= head["seq"]}
    state = replay(got["log"])
    # Rows and log are one instant.
    assert_rows_match_log(got, state)
    # Every row is the source's (the load only adds; keys of an epoch never change).
    for table in ("members", "keys", "epochs"):
        assert {k: source[table][k] for k in got[table]} == got[table], table
    for rid, row in got["rooms"].items():
        assert row[:2] == source["rooms"][rid][:2] and row[4] == source["rooms"][rid][4]
        assert row[2] <= source["rooms"][rid][2]
    # Everything acknowledged before the backup began is there.
    for change in acked_before:
        if change[0] == "member":
            assert change[1] in got["members"], change
        elif change[0] == "room":
            assert change[1] in got["rooms"], change
        elif change[0] == "roster":
            assert (change[1], change[2]) in got["rosters"], change
        elif change[0] == "epoch":
            assert got["rooms"][change[1]][2] >= change[2], change
    assert "gone" not in got["members"] and doomed not in got["rooms"]

    # The blobs: whole, of rooms the store has, everything acknowledged before, nothing deleted before.
    blobs = stored_blobs(restored_dir)
    assert {r for r, _b in blobs} <= set(got["rooms"])
    assert {k: source_blobs.get(k) for k in blobs} == blobs
    assert {(c[1], c[2]) for c in acked_before if c[0] == "blob" and c[1] != doomed} - {(load.rooms[0], dropped_blob)} \
        <= blobs.keys()
    assert (doomed, doomed_blob) not in blobs and (load.rooms[0], dropped_blob) not in blobs
    assert sorted(p.name for p in restored_dir.iterdir()) == ["blobs", "membershipd.db"]

    # A daemon serves the restored state.
    restored = membershipd_factory(data_dir=restored_dir)
    async with UnibusClient(restored.base_url, alice) as a:
        assert sorted(m["handle"] for m in await a.list_members()) == sorted(got["members"])
        assert await a.log_head() == head and a.reported_auth_skew == 60
        for rid, row in got["rooms"].items():
            room = await a.get_room(rid)
            assert room["epoch"] == row[2]
            if row[2]:
                key = await a.my_key(rid)
                assert key["sig"] is not None
                sealed, sig = got["keys"][(rid, row[2], "alice")]
                assert (key["sealed"], key["sig"]) == (_b64(sealed), _b64(sig))
                assert key["log_head"] == {"seq": got["epochs"][(rid, row[2])][1],
                                           "hash": got["epochs"][(rid, row[2])][2]}
        for (rid, blob_id), data in sorted(blobs.items())[:5]:
            out = tmp_path / f"{blob_id}.out"
            await get_raw_blob(a, rid, blob_id, out)
            assert out.read_bytes() == data == load.blobs[(rid, blob_id)]
        # ...and goes on from it: the next logged change follows the restored head.
        await a.create_room("after the restore")
        assert (await a.log_head())["seq"] == head["seq"] + 1


def _b64(raw: bytes) -> str:
    import base64

    return base64.b64encode(raw).decode()


# --------------------------------------------------------------------------- refusals


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def _blob_dir(s: Source) -> str:
    return f"blobs/{s.room}/{s.blob_id}"


CORRUPTIONS = {
    "flipped byte in the database": (
        lambda s, m: [(i, _flip(d, 4000) if i.name == "membershipd.db" else d) for i, d in m],
        "membershipd.db does not match its SHA-256"),
    "flipped byte in a blob": (
        lambda s, m: [(i, _flip(d, 77) if i.name.endswith("/data") else d) for i, d in m],
        "does not match its SHA-256"),
    "edited manifest": (
        lambda s, m: with_manifest(m, {**manifest_of(m), "node": "elsewhere"}, redigest=False),
        "manifest.json was altered"),
    "manifest listing another hash": (
        lambda s, m: with_manifest(m, {**manifest_of(m), "files": [
            {**f, "sha256": "0" * 64} if f["path"] == "membershipd.db" else f for f in manifest_of(m)["files"]]}),
        "membershipd.db does not match its SHA-256"),
    "missing file": (
        lambda s, m: [(i, d) for i, d in m if not i.name.endswith("meta.json")],
        "meta.json is listed in manifest.json but missing"),
    "missing manifest": (
        lambda s, m: [(i, d) for i, d in m if i.name != "manifest.json"],
        "has no manifest.json"),
    "extra file": (
        lambda s, m: m + [regular(f"blobs/{s.room}/{'a' * 64}/data", b"x")],
        "is in the archive but not in manifest.json"),
    "unknown file": (
        lambda s, m: m + [regular("notes.txt", b"hello")],
        "'notes.txt' is not a file a unibus backup contains"),
    "path traversal": (
        lambda s, m: m + [regular("../x", b"pwned")],
        "'../x' is not a file a unibus backup contains"),
    "path traversal listed in the manifest": (
        lambda s, m: relisted(m + [regular("../x", b"pwned")]),
        "'../x' is not a file a unibus backup contains"),
    "absolute path": (
        lambda s, m: m + [regular("/tmp/unibus-pwned", b"pwned")],
        "is not a file a unibus backup contains"),
    "symlink member": (
        lambda s, m: [(i, d) for i, d in m if not i.name.endswith("/data")]
        + [special(f"{_blob_dir(s)}/data", tarfile.SYMTYPE, "/etc/passwd")],
        "is a symbolic link"),
    "hard link member": (
        lambda s, m: m + [special("membershipd.db-wal", tarfile.LNKTYPE, "membershipd.db")],
        "is a hard link"),
    "directory member": (
        lambda s, m: [special("blobs", tarfile.DIRTYPE, "")] + m,
        "is a directory"),
    "duplicate member": (
        lambda s, m: m + [next((i, d) for i, d in m if i.name == "membershipd.db")],
        "'membershipd.db' is in the archive twice"),
    "newer format": (
        lambda s, m: with_manifest(m, {**manifest_of(m), "version": 99}),
        "archive format version 99"),
    "format version 0": (
        lambda s, m: with_manifest(m, {**manifest_of(m), "version": -5}),
        "archive format version -5"),
    # printed once the restore is done: a red team's manifest without them (digest recomputed) was
    # restored, then the summary raised KeyError, a traceback, and the directory was left full
    "manifest without its node": (
        lambda s, m: with_manifest(m, {k: v for k, v in manifest_of(m).items() if k != "node"}),
        "node must be a line of printable text"),
    "manifest whose version is an object": (
        lambda s, m: with_manifest(m, {**manifest_of(m), "unibus_version": {"a": 1}}),
        "unibus_version must be a line of printable text"),
    "manifest whose time holds a control character": (
        lambda s, m: with_manifest(m, {**manifest_of(m), "created": "2026\x1b[2J"}),
        "created must be a line of printable text"),
    "blob that is not its id": (
        lambda s, m: relisted([(i, b"other bytes" if i.name.endswith("/data") else d) for i, d in m]),
        "its data is not the blob its id names"),
    "database that is not SQLite": (
        lambda s, m: relisted([(i, os.urandom(8192) if i.name == "membershipd.db" else d) for i, d in m]),
        "membershipd.db is not a usable SQLite database"),
    "log head other than the manifest's": (
        lambda s, m: with_manifest(m, {**manifest_of(m), "log_head": {"seq": 1, "hash": "0" * 64}}),
        "not at the head its manifest names"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_damaged_archive_is_refused_and_nothing_is_written(source, tmp_path, case):
    damage, needle = CORRUPTIONS[case]
    area = tmp_path / "area"
    area.mkdir()
    archive = write_members(area / "archive", damage(source, source.members))
    one_line(restore_into(archive, area / "restored"), 2, needle)
    assert_nothing_written(area)
    assert not Path("/tmp/unibus-pwned").exists()


@pytest.mark.parametrize("cut", ["in the database", "at a member boundary", "gzip"])
def test_a_truncated_archive_is_refused(source, tmp_path, cut):
    area = tmp_path / "area"
    area.mkdir()
    raw = source.archive.read_bytes()
    if cut == "gzip":
        raw = gzip.compress(raw)
        raw = raw[:len(raw) // 2]
    elif cut == "in the database":
        raw = raw[:8192]
    else:  # after the manifest and the database: a tar reader sees a clean end there
        with tarfile.open(source.archive) as tar:
            infos = tar.getmembers()
        raw = raw[:infos[2].offset]
    (area / "archive").write_bytes(raw)
    needle = "missing from the archive" if cut == "at a member boundary" else "not a complete tar archive"
    one_line(restore_into(area / "archive", area / "restored"), 2, needle)
    assert_nothing_written(area)


def test_not_an_archive_is_refused(tmp_path):
    area = tmp_path / "area"
    area.mkdir()
    (area / "archive").write_bytes(os.urandom(5000))
    one_line(restore_into(area / "archive", area / "restored"), 2, "not a complete tar archive")
    assert_nothing_written(area)


def test_restore_only_into_an_empty_directory(source, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / ".hidden").write_text("keep me")
    # Through the console script once: the process exits 2.
    one_line(run_membershipd("restore", "--in", str(source.archive), "--data-dir", str(full)), 2, "is not empty")
    assert (full / ".hidden").read_text() == "keep me" and len(list(full.iterdir())) == 1
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_line(restore_into(source.archive, afile), 2, "exists and is not a directory")
    link = tmp_path / "link"
    (tmp_path / "empty").mkdir()
    link.symlink_to(tmp_path / "empty")
    one_line(restore_into(source.archive, link), 2, "is a symbolic link")
    one_line(restore_into(tmp_path / "absent.tar", tmp_path / "new"), 2, "--in")
    # An existing empty directory is fine, and is replaced whole.
    proc = restore_into(source.archive, tmp_path / "empty")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["blobs", "membershipd.db"]


def test_a_backup_or_restore_whose_output_cannot_be_written_says_so_and_what_it_did(source, tmp_path):
    """A red team: `restore > /dev/full` restored the directory, then exited 1 with "No space left
    on device" alone (the docs said exit 1 restored nothing) and the trust root it printed was lost.
    The change stands, and what it prints goes to stderr after a line that says so."""
    archive = tmp_path / "again.tar"
    proc = run_membershipd_to_full_disk("backup", "--out", str(archive), "--data-dir", str(source.data_dir))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == (f"membershipd: error: the backup {archive} is written, but standard output could not be "
                        "written (No space left on device); what it says follows here"), lines
    assert len(lines) == 2 and str(archive) in lines[1], lines
    assert sorted(i.name for i, _ in members_of(archive)) == sorted(i.name for i, _ in source.members)

    target = tmp_path / "restored"
    proc = run_membershipd_to_full_disk("restore", "--in", str(archive), "--data-dir", str(target))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == (f"membershipd: error: {target} is restored, but standard output could not be written "
                        "(No space left on device); what it says follows here"), lines
    assert [line for line in lines if line.startswith("trust root fingerprint: ")], lines
    assert lines[-1].startswith(f"start membershipd with --data-dir {target}"), lines
    assert sorted(p.name for p in target.iterdir()) == ["blobs", "membershipd.db"]


def test_archive_and_restored_files_are_private_and_hold_no_secret(source, tmp_path):
    secrets = source.secrets()
    assert {"service.nkey", "system.nkey", "plugins/auth_enforce/issuer.nkey"} <= secrets.keys()
    out = tmp_path / "open-umask.tar"
    env = {**os.environ}
    # umask 000: what another local user could read if the command relied on the umask.
    proc = subprocess.run([sys.executable, "-m", "unibus.cli", "backup", "--out", str(out), "--data-dir",
                           str(source.data_dir)], capture_output=True, text=True, env=env, timeout=60,
                          preexec_fn=lambda: os.umask(0))
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary file left beside it
    blobs_tmp = source.data_dir / "blobs" / ".tmp"
    assert not [p for p in blobs_tmp.iterdir() if p.name.startswith("backup-")]  # staging removed
    raw = out.read_bytes()
    names = [i.name for i, _d in members_of(out)]
    assert names[0] == "manifest.json"
    assert not [n for n in names if n.endswith((".nkey", ".conf", ".key", ".crt")) or "plugins/" in n]
    for name, secret in secrets.items():
        assert secret not in raw, f"{name} is in the archive"
    manifest = manifest_of(members_of(out))
    assert manifest["kind"] == "single" and manifest["db_revision"] == "0004"
    assert manifest["unibus_version"] == "0.12.0" and manifest["format"] == "unibus-backup"
    assert manifest["counts"] == {"members": 2, "rooms": 2, "log_entries": 9, "blobs": 1, "blob_bytes": 150_000}

    restored = tmp_path / "restored"
    proc = subprocess.run([sys.executable, "-m", "unibus.cli", "restore", "--in", str(out), "--data-dir",
                           str(restored)], capture_output=True, text=True, env=env, timeout=60,
                          preexec_fn=lambda: os.umask(0))
    assert proc.returncode == 0, proc.stderr
    for dirpath, dirs, names in os.walk(restored):
        for d in dirs:
            assert os.stat(os.path.join(dirpath, d)).st_mode & 0o777 == 0o700, d
        for n in names:
            assert os.stat(os.path.join(dirpath, n)).st_mode & 0o777 == 0o600, n
    assert restored.stat().st_mode & 0o777 == 0o700


def test_backup_refusals(source, tmp_path):
    d = str(source.data_dir)
    existing = tmp_path / "exists.tar"
    existing.write_text("an older backup")
    one_line(run_membershipd("backup", "--out", str(existing), "--data-dir", d), 2, "exists")  # the real process
    assert existing.read_text() == "an older backup"
    one_line(cli("backup", "--out", str(tmp_path / "no" / "dir.tar"), "--data-dir", d), 2,
             "is not a directory")
    one_line(cli("backup", "--out", str(tmp_path / "a.tar"), "--data-dir", str(tmp_path / "empty")), 2,
             "nothing to back up")
    one_line(cli("backup", "--out", str(tmp_path / "a.tar"), "--data-dir", d, "--ca", "x"), 2,
             "--ca goes with --nats-url")
    one_line(cli("backup", "--out", str(tmp_path / "a.tar"), "--nats-url", "nats://192.0.2.7:4250"), 2,
             "not a loopback address")
    one_line(cli("backup", "--out", str(tmp_path / "a.tar"), "--nats-url",
                             "nats://u:secret@127.0.0.1:4250"), 2, "credentials")
    node = tmp_path / "node"
    node.mkdir()
    (node / "membershipd.db").write_bytes(b"")
    (node / "nats.conf").write_text(json.dumps({"cluster": {"name": "c"}}))
    one_line(cli("backup", "--out", str(tmp_path / "a.tar"), "--data-dir", str(node)), 2,
             "belongs to a cluster node")
    assert not list(tmp_path.glob("a.tar*")) and not list(tmp_path.glob(".a.tar*"))


# --------------------------------------------------------------------------- a KV state, through one daemon


async def test_kv_state_backup_restores_to_a_single_node(source, tmp_path):
    """migrate-to-kv into a daemon's own NATS (blobs included), back that KV state up with
    --nats-url, restore it: the same members, rooms, keys, log and blobs as the SQLite store."""
    d, url = str(source.data_dir), source.daemon.nats_url
    migrate = await asyncio.to_thread(cli, "migrate-to-kv", "--data-dir", d, "--nats-url", url)
    assert migrate.returncode == 0, migrate.stderr
    again = await asyncio.to_thread(cli, "migrate-to-kv", "--data-dir", d, "--nats-url", url)
    assert again.returncode == 0 and "0 blob(s)" in again.stdout and "nothing to do" in again.stdout
    archive = tmp_path / "kv.tar"
    backup = await asyncio.to_thread(cli, "backup", "--out", str(archive), "--data-dir", d, "--nats-url", url)
    assert backup.returncode == 0, backup.stderr
    manifest = manifest_of(members_of(archive))
    assert manifest["kind"] == "cluster" and manifest["kv"]["exact"] is True
    room, blob_id = source.room, source.blob_id
    assert [i.name for i, _d in members_of(archive)] == [
        "manifest.json", "kv/unibus_state.jsonl", f"blobs/{room}/{blob_id}/data", f"blobs/{room}/{blob_id}/meta.json"]

    restored_dir = tmp_path / "restored"
    proc = await asyncio.to_thread(restore_into, archive, restored_dir)
    assert proc.returncode == 0, proc.stderr
    assert "restored the cluster backup" in proc.stdout and "migrate-to-kv" in proc.stdout
    assert sorted(p.name for p in restored_dir.iterdir()) == ["blobs", "membershipd.db"]
    want, got = read_store(source.data_dir / "membershipd.db"), read_store(restored_dir / "membershipd.db")
    for table in ("members", "rooms", "rosters", "keys", "epochs", "log", "nonces", "max_created"):
        assert got[table] == want[table], table
    assert_rows_match_log(got, replay(got["log"]))
    assert stored_blobs(restored_dir) == {(room, blob_id): source.blob}


async def test_a_0_11_cluster_state_backs_up_and_restores_with_a_new_entry_0(nats_server, tmp_path):
    """0.11 kept a cluster's state in KV with no membership log. This version's ``backup
    --nats-url`` reads it while 0.11 still runs, which is how a cluster upgrades
    (docs/operations.md, "Upgrading from 0.11"), and restore refused that archive: its rows were
    not what an empty log establishes (an upgrade rehearsal). Restore writes entry 0 now, a
    snapshot, as a node does for such a bucket: a new trust root, which --expect-root refuses."""
    import base64

    alice, bob = generate_identity("alice"), generate_identity("bob")
    room = "4eelbkievuswdsod2l7jyltn"
    at = "2026-11-20T10:00:00.000000+00:00"

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode("ascii")

    records = {"meta.admins": {"admins": ["alice"]},  # the records as 0.11 wrote them: no bus_pub, no log
               f"room.{room}": {"created_at": at, "epoch": 2, "members": ["alice", "bob"], "name": "ops",
                                "owner": "alice", "rekey_required": False, "room_id": room,
                                "sealed": {"alice": [1, 2], "bob": [2, 2]}},
               f"keys.{room}.1": {"epoch": 1, "room_id": room, "sealed": {"alice": b64(os.urandom(80))}},
               f"keys.{room}.2": {"epoch": 2, "room_id": room, "sealed": {h: b64(os.urandom(80))
                                                                          for h in ("alice", "bob")}}}
    for who, role in ((alice, "admin"), (bob, "member")):
        records[f"member.{who.handle}"] = {"created_at": at, "enc_pub": b64(who.enc_pub), "enc_suite": "X25519",
                                           "handle": who.handle, "role": role, "sign_pub": b64(who.sign_pub)}
        records[f"sign.{who.sign_pub.hex()}"] = {"handle": who.handle}
    nc = await nats.connect(nats_server.url)
    try:
        await KvStore(nc.jetstream(timeout=5.0), timeout=5.0).ensure()  # the bucket, empty: no entry 0 to write
        kv = await nc.jetstream(timeout=5.0).key_value("unibus_state")
        for key, record in records.items():
            await kv.put(key, json.dumps(record, separators=(",", ":"), sort_keys=True).encode())
    finally:
        await nc.close()
    node = tmp_path / "node"
    node.mkdir(mode=0o700)
    ensure_service_nkey(node)  # a 0.11 node's own (this bare nats-server asks for none)
    archive = tmp_path / "c011.tar"
    proc = await asyncio.to_thread(cli, "backup", "--out", str(archive), "--data-dir", str(node), "--nats-url",
                                   nats_server.url)
    assert proc.returncode == 0 and "2 member(s), 1 room(s), 0 log entries" in proc.stdout, proc
    root = hashlib.sha256(b"what the members pinned").hexdigest()
    one_line(await asyncio.to_thread(cli, "restore", "--in", str(archive), "--data-dir", str(tmp_path / "pinned"),
                                     "--expect-root", root),
             2, "--expect-root: the archive's trust root is none: its store predates the membership log")
    proc = await asyncio.to_thread(restore_into, archive, tmp_path / "restored")
    assert proc.returncode == 0, proc.stderr
    got = read_store(tmp_path / "restored" / "membershipd.db")
    assert [json.loads(text)["kind"] for _s, _h, text in got["log"]] == ["snapshot"]
    assert f"(new: members pin it with `unibus trust {got['log'][0][1]}`)" in proc.stdout
    assert {h: (row[0], row[1], row[5]) for h, row in got["members"].items()} == {
        "alice": ("admin", alice.sign_pub, None), "bob": ("member", bob.sign_pub, None)}
    assert got["rosters"] == {(room, "alice"), (room, "bob")} and got["rooms"][room][2] == 2
    assert sorted(got["keys"]) == [(room, 1, "alice"), (room, 2, "alice"), (room, 2, "bob")]
    assert_rows_match_log(got, replay(got["log"]))


# --------------------------------------------------------------------------- KV snapshots under writes


async def test_kv_snapshot_is_one_instant_under_concurrent_writes(nats_server):
    """Writers keep rekeying rooms (room record and key entry in one atomic batch) and changing
    rosters while snapshots are taken: no snapshot shows a key entry its room has not reached,
    or a room without the key entry of its epoch."""
    nc = await nats.connect(nats_server.url)
    try:
        kv = KvStore(nc.jetstream(timeout=5.0), timeout=5.0)
        await kv.ensure()
        people = [generate_identity(h) for h in ("alice", "bob", "carol")]
        from unibus.store.sqlite import new_member

        for p in people:
            await kv.add_member(new_member(p.handle, "admin", p.sign_pub, p.enc_pub, "X25519", p.bus_pub))
        rooms = [(await kv.create_room(f"r{i}", "alice")).room_id for i in range(3)]
        stop = asyncio.Event()

        async def rekeyer(room_id: str) -> int:
            n = 0
            while not stop.is_set():
                room = await kv.get_room(room_id)
                try:
                    await kv.put_keys(room_id, room.epoch + 1, {m.handle: os.urandom(32) for m in room.members})
                    n += 1
                except Conflict:
                    pass  # the roster changed under it: read again
            return n

        async def roster() -> int:
            n = 0
            while not stop.is_set():
                for room_id in rooms:
                    for change in (kv.add_room_member, kv.remove_room_member):
                        try:
                            await change(room_id, "bob")
                            n += 1
                        except Conflict:
                            pass  # the rekeyers won 12 times in a row (on two busy cores): the documented "try again"
                        except NotFound:
                            pass  # the add before this remove was the one outraced
            return n

        writers = [asyncio.create_task(rekeyer(r)) for r in rooms] + [asyncio.create_task(roster())]
        snaps = []
        try:
            while len(snaps) < 8:
                snaps.append(await kv.snapshot(exact_for=0.5))
        finally:
            stop.set()
            writes = await asyncio.gather(*writers)
        assert sum(writes) > 0
        for snap in snaps:
            entries = {k: raw for k, (raw, _rev) in snap.entries.items()}
            rows = rows_from_kv(entries)  # parses, every key
            assert assert_snapshot_consistent(entries) and rows.rooms
        print(f"{len(snaps)} snapshots, {sum(s.exact for s in snaps)} exact, "
              f"{sum(s.attempts for s in snaps)} reads, {sum(writes)} writes")
    finally:
        await nc.close()


async def test_kv_snapshot_under_a_tight_loop_of_logged_writes_is_a_state_of_the_log(nats_server):
    """Writers in another thread append to the log as fast as they can (rooms created, rosters
    changed, rooms deleted, each a logged batch). The read that waited for a moment without writes
    starved for its whole budget (a cluster backup in CI timed out so): every snapshot here is taken,
    and is one state: the rows are what its log establishes, at the head's message."""
    import threading

    from test_store_contract import add_logged, as_member, identity, signed

    from unibus.memberlog import LogState

    alice, bob = identity("alice"), identity("bob")
    stop = threading.Event()
    counts = [0, 0, 0]

    async def write() -> None:
        wnc = await nats.connect(nats_server.url)
        try:
            wkv = KvStore(wnc.jetstream(timeout=5.0), timeout=5.0)

            async def writer(n: int) -> None:
                lost = 0  # in a row: every logged write is a compare-and-set on the log head
                while not stop.is_set():
                    name = f"w{n}-{counts[n]}"
                    try:
                        rid = (await wkv.create_room(name, "alice", logged=signed(alice, "POST", "/v1/rooms",
                                                                                  {"name": name}))).room_id
                        await wkv.add_room_member(rid, "bob",
                                                  logged=signed(alice, "PUT", f"/v1/rooms/{rid}/members/bob"))
                        if counts[n] % 2:
                            await wkv.delete_room(rid, logged=signed(alice, "DELETE", f"/v1/rooms/{rid}"))
                    except Conflict as e:  # the other writers won 12 times: the documented "try again"
                        if "try again" not in str(e) or lost >= 20:
                            raise
                        lost += 1
                        continue
                    lost = 0
                    counts[n] += 1

            await asyncio.gather(*(writer(n) for n in range(3)))
        finally:
            await wnc.close()

    nc = await nats.connect(nats_server.url)
    try:
        kv = KvStore(nc.jetstream(timeout=5.0), timeout=5.0)
        await kv.ensure()
        await kv.add_member(as_member(alice, "admin"))
        await add_logged(kv, alice, bob)
        failed: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(write())
            except BaseException as e:  # noqa: BLE001 - reported by the test below
                failed.append(e)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        snaps = []
        try:
            for _ in range(3000):  # until the writers are under way (30 s at most)
                if sum(counts) >= 30 or failed:
                    break
                await asyncio.sleep(0.01)
            while len(snaps) < 6 and not failed:
                snaps.append(await kv.snapshot(budget=30.0))
        finally:
            stop.set()
            await asyncio.to_thread(thread.join, 30)
        assert not failed, failed
        assert not thread.is_alive() and sum(counts) > 30
        for snap in snaps:
            entries = {k: raw for k, (raw, _rev) in snap.entries.items()}
            rows = rows_from_kv(entries)
            state = LogState(skew=60)
            for row in rows.log_entries:
                assert state.apply(json.loads(row["entry"])) == row["hash"]
            assert {m["handle"]: m["role"] for m in rows.members} == {h: m.role for h, m in state.members.items()}
            assert {r["room_id"]: r["name"] for r in rows.rooms} == {rid: r.name for rid, r in state.rooms.items()}
            assert {(m["room_id"], m["handle"]) for m in rows.room_members} == {
                (rid, h) for rid, r in state.rooms.items() for h in r.members}
            if not snap.exact:  # a read under writes is the state at the head's own message
                assert snap.seq == snap.entries["meta.loghead"][1]
        print(f"{len(snaps)} snapshots, {sum(s.exact for s in snaps)} exact, "
              f"{sum(s.attempts for s in snaps)} reads, {sum(counts)} writers' rounds")
    finally:
        await nc.close()


def assert_snapshot_consistent(entries: dict[str, bytes]) -> bool:
    for key, raw in entries.items():
        if not key.startswith("room."):
            continue
        room = json.loads(raw)
        epochs = {int(k.split(".")[2]) for k in entries if k.startswith(f"keys.{room['room_id']}.")}
        assert epochs == set(range(1, room["epoch"] + 1)), (room["room_id"], room["epoch"], sorted(epochs))
        if room["epoch"]:
            last = json.loads(entries[f"keys.{room['room_id']}.{room['epoch']}"])
            assert {h for h, (_f, e) in room["sealed"].items() if e == room["epoch"]} == set(last["sealed"])
    return True


# --------------------------------------------------------------------------- revisions


def test_an_archive_from_before_the_log_is_migrated_on_restore(tmp_path):
    """A store at revision 0002 (0.11, offline: backup needs no daemon) restores at the current
    revision, with entry 0 written by the migration, whose fingerprint restore prints as new."""
    from unibus.store.db import migrate

    data = tmp_path / "old"
    data.mkdir()
    migrate(data / "membershipd.db", "0002")  # 0.11's revision
    alice = generate_identity("alice")
    with contextlib.closing(sqlite3.connect(data / "membershipd.db")) as conn, conn:
        conn.execute("insert into members (handle, role, sign_pub, enc_pub, enc_suite, created_at) values "
                     "('alice', 'admin', ?, ?, 'X25519', '2026-01-01T00:00:00+00:00')", (alice.sign_pub, alice.enc_pub))
    archive = tmp_path / "old.tar"
    proc = cli("backup", "--out", str(archive), "--data-dir", str(data))
    assert proc.returncode == 0, proc.stderr
    manifest = manifest_of(members_of(archive))
    assert manifest["db_revision"] == "0002" and manifest["log_head"] is None and manifest["trust_root"] is None
    proc = restore_into(archive, tmp_path / "new")
    assert proc.returncode == 0, proc.stderr
    got = read_store(tmp_path / "new" / "membershipd.db")
    assert [json.loads(text)["kind"] for _s, _h, text in got["log"]] == ["snapshot"]
    assert f"(new: members pin it with `unibus trust {got['log'][0][1]}`)" in proc.stdout
    assert list(got["members"]) == ["alice"]


def test_a_database_of_a_newer_revision_is_refused(source, tmp_path):
    area = tmp_path / "area"
    area.mkdir()
    db = tmp_path / "newer.db"
    db.write_bytes(next(d for i, d in source.members if i.name == "membershipd.db"))
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("update alembic_version set version_num = '0099'")
    newer = relisted([(i, db.read_bytes() if i.name == "membershipd.db" else d) for i, d in source.members])
    one_line(restore_into(write_members(area / "archive", newer), area / "restored"), 2,
             "revision '0099', which this membershipd does not know")
    assert_nothing_written(area)


def test_a_recovery_bootstrap_is_restored_once_the_operator_accepts_it(tmp_path):
    """A recovery (``membershipd member add`` on a store that has a log: every admin lost its keys)
    writes a bootstrap entry that no member signed. Clients take it only once trusted; restore
    refused it for good, so no backup of a deployment that ever recovered could be restored. backup
    now names it, and restore takes it with --accept-bootstrap. Without the flag, or with another
    fingerprint, it is still refused: whoever can write archives could append such an entry."""
    alice, carol = generate_identity("alice"), generate_identity("carol")
    data_dir = tmp_path / "recovered"
    bootstrap_member(data_dir, alice, "admin")
    bootstrap_member(data_dir, carol, "admin")  # alice lost her keys: the operator adds carol offline
    area = tmp_path / "area"
    area.mkdir()
    archive = area / "archive"
    proc = cli("backup", "--out", str(archive), "--data-dir", str(data_dir))
    assert proc.returncode == 0, proc.stderr
    fingerprint = manifest_of(members_of(archive))["log_head"]["hash"]
    assert proc.stderr.count("warning:") == 1 and f"--accept-bootstrap {fingerprint}" in proc.stderr

    target = area / "restored"
    one_line(restore_into(archive, target), 2, f"recovery bootstrap at seq 1, which no member signed (an offline "
                                               f"membershipd member add); if your operator made it, add "
                                               f"--accept-bootstrap {fingerprint}")
    assert_nothing_written(area)
    other = hashlib.sha256(b"another recovery").hexdigest()
    one_line(cli("restore", "--in", str(archive), "--data-dir", str(target), "--accept-bootstrap", other), 2,
             f"--accept-bootstrap {fingerprint}")
    one_line(cli("restore", "--in", str(archive), "--data-dir", str(target), "--accept-bootstrap", "3f1c…e9"), 2,
             "--accept-bootstrap: '3f1c…e9' is not a fingerprint")
    assert_nothing_written(area)

    proc = cli("restore", "--in", str(archive), "--data-dir", str(target), "--accept-bootstrap", other,
               "--accept-bootstrap", fingerprint.upper())  # as printed, or copied in capitals
    assert proc.returncode == 0, proc.stderr
    # Nothing in an archive proves whose deployment it is: restore says so rather than "unchanged"
    # (red team: an archive made by someone else with their own admin was announced as unchanged).
    assert "(the archive's: members keep their pin if it is the one they pinned; compare it" in proc.stdout
    got = read_store(target / "membershipd.db")
    assert {h: m[0] for h, m in got["members"].items()} == {"alice": "admin", "carol": "admin"}
    assert [text for _s, _h, text in got["log"]] == [text for _s, _h, text in read_store(data_dir / "membershipd.db")["log"]]


def test_restore_expect_root_refuses_an_archive_of_another_deployment(tmp_path):
    """Adversary: someone who can write where the backups are kept and puts there a backup of a
    deployment of their own (their admin, their log: every check of the archive against itself
    passes). --expect-root FINGERPRINT, the root the members pinned, refuses it, writing nothing."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    bootstrap_member(ours, generate_identity("alice"), "admin")
    bootstrap_member(theirs, generate_identity("mallory"), "admin")
    root = read_store(ours / "membershipd.db")["log"][0][1]
    their_root = read_store(theirs / "membershipd.db")["log"][0][1]
    area = tmp_path / "area"
    area.mkdir()
    archive = area / "archive"
    proc = cli("backup", "--out", str(archive), "--data-dir", str(theirs))
    assert proc.returncode == 0, proc.stderr
    target = area / "restored"
    one_line(cli("restore", "--in", str(archive), "--data-dir", str(target), "--expect-root", root), 2,
             f"--expect-root: the archive's trust root is {their_root}, not {root}: it is not a backup of the "
             "deployment your members pinned; nothing was restored")
    one_line(cli("restore", "--in", str(archive), "--data-dir", str(target), "--expect-root", "91f9…"), 2,
             "--expect-root: '91f9…' is not a fingerprint")
    assert_nothing_written(area)

    archive.unlink()
    proc = cli("backup", "--out", str(archive), "--data-dir", str(ours))
    assert proc.returncode == 0, proc.stderr
    proc = cli("restore", "--in", str(archive), "--data-dir", str(target), "--expect-root", root.upper())
    assert proc.returncode == 0, proc.stderr
    assert f"trust root fingerprint: {root} (as --expect-root: members keep their pin)" in proc.stdout
    assert list(read_store(target / "membershipd.db")["members"]) == ["alice"]


def test_restore_expect_root_refuses_an_archive_from_before_the_log(tmp_path):
    """A store older than the membership log gets a new entry 0 at restore: no root a member
    pinned can be that one, so --expect-root refuses it rather than start a new trust root."""
    from unibus.store.db import migrate

    data = tmp_path / "old"
    data.mkdir()
    migrate(data / "membershipd.db", "0002")  # 0.11's revision
    area = tmp_path / "area"
    area.mkdir()
    proc = cli("backup", "--out", str(area / "archive"), "--data-dir", str(data))
    assert proc.returncode == 0, proc.stderr
    root = hashlib.sha256(b"what the members pinned").hexdigest()
    one_line(cli("restore", "--in", str(area / "archive"), "--data-dir", str(area / "restored"), "--expect-root", root),
             2, "--expect-root: the archive's trust root is none: its store predates the membership log, not "
                f"{root}")
    assert_nothing_written(area)


def test_an_archive_whose_rows_disagree_with_its_log_is_refused(source, tmp_path):
    """Adversary: someone who can write where the backups are kept (not the secrets: an archive holds
    none), who adds eve as admin to the archived database and rehashes the manifest."""
    eve = generate_identity("eve")
    work = tmp_path / "work.db"
    work.write_bytes(next(d for i, d in source.members if i.name == "membershipd.db"))
    with contextlib.closing(sqlite3.connect(work)) as conn:
        row = conn.execute("SELECT * FROM members WHERE handle = 'bob'").fetchone()
        columns = [c[1] for c in conn.execute("PRAGMA table_info(members)")]
        forged = dict(zip(columns, row, strict=True))
        forged.update(handle="eve", role="admin", sign_pub=eve.sign_pub, enc_pub=eve.enc_pub, bus_pub=eve.bus_pub)
        conn.execute(f"INSERT INTO members ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                     [forged[c] for c in columns])
        conn.commit()
    members = [(i, work.read_bytes() if i.name == "membershipd.db" else d) for i, d in source.members]
    archive = write_members(tmp_path / "tampered.tar", relisted(members))
    proc = restore_into(archive, tmp_path / "restored")
    one_line(proc, 2, "membership log")


@pytest.mark.parametrize("edit, needle", [
    ("UPDATE rooms SET owner = 'bob'", "room"),  # bob could then manage a room the log says he does not own
    ("UPDATE rooms SET epoch = epoch + 3", "room"),  # the next rekey would be one no client takes
    ("UPDATE rooms SET rekey_required = 1 - rekey_required", "room"),
    ("UPDATE rooms SET name = 'renamed'", "room"),
    ("DELETE FROM log_nonces", "log nonces"),  # each logged request could be sent again
    ("UPDATE unibus_meta SET value = '0' WHERE key = 'log.max_created'", "largest `created`"),
])
def test_an_archive_whose_rooms_or_nonces_disagree_with_its_log_is_refused(source, tmp_path, edit, needle):
    """The same adversary, editing what the first check did not compare (red team): a room's owner,
    epoch, rekey flag or name, the log's nonces, its largest `created`. The restored server would
    have accepted requests every client refuses (a member managing a room it does not own, a
    replayed nonce), so every client of the deployment would stop at that entry for good."""
    work = tmp_path / "work.db"
    work.write_bytes(next(d for i, d in source.members if i.name == "membershipd.db"))
    with contextlib.closing(sqlite3.connect(work)) as conn:
        assert conn.execute(edit).rowcount > 0
        conn.commit()
    members = [(i, work.read_bytes() if i.name == "membershipd.db" else d) for i, d in source.members]
    archive = write_members(tmp_path / "tampered.tar", relisted(members))
    area = tmp_path / "area"
    area.mkdir()
    one_line(restore_into(archive, area / "restored"), 2, needle)
    assert not (area / "restored").exists() and not list(area.iterdir())


def tampered_schema(source, tmp_path: Path, *sql: str) -> Path:
    """The source's archive with ``sql`` run on its database, manifest rehashed."""
    work = tmp_path / "work.db"
    work.write_bytes(next(d for i, d in source.members if i.name == "membershipd.db"))
    with contextlib.closing(sqlite3.connect(work)) as conn:
        for statement in sql:
            conn.execute(statement)
        conn.commit()
    members = [(i, work.read_bytes() if i.name == "membershipd.db" else d) for i, d in source.members]
    return write_members(tmp_path / "tampered.tar", relisted(members))


@pytest.mark.parametrize("sql, needle", [
    (["CREATE TRIGGER promote AFTER INSERT ON members BEGIN "
      "UPDATE members SET role = 'admin' WHERE handle = NEW.handle; END"], "holds a trigger 'promote'"),
    (["CREATE VIEW admins AS SELECT handle FROM members WHERE role = 'admin'"], "holds a view 'admins'"),
    (["CREATE TABLE stash (x)"], "holds a table 'stash'"),
    (["DROP TABLE log_entries"], "does not fit unibus's schema (no such table: archived.log_entries)"),
    (["ALTER TABLE log_nonces RENAME TO nonces_old"], "holds a table 'nonces_old'"),
    # the second red team: a type spelt in capitals (SQLite loads it as a trigger all the same),
    # a revision that names no one revision, a row whose parent is gone
    (["CREATE TRIGGER promote AFTER INSERT ON members BEGIN "
      "UPDATE members SET role = 'admin' WHERE handle = NEW.handle; END", "PRAGMA writable_schema = ON",
      "UPDATE sqlite_master SET type = 'Trigger' WHERE name = 'promote'"], "holds a trigger 'promote'"),
    (["UPDATE alembic_version SET version_num = 'head'"], "at revision 'head', which this membershipd does not know"),
    (["INSERT INTO alembic_version VALUES ('0002')"], "names 2 schema revisions (alembic_version), not one"),
    (["INSERT INTO sealed_keys (room_id, epoch, handle, sealed, sig) SELECT 'gone', 1, handle, x'00', NULL "
      "FROM members LIMIT 1"], "has a row of 'sealed_keys' whose 'rooms' does not exist"),
])
def test_an_archive_may_bring_rows_but_never_schema(source, tmp_path, sql, needle):
    """Red team: with --expect-root matching, an archive whose database held a trigger (every
    member added later became an admin) restored, trigger and all: a single node's restore took
    the archived database's schema as it was. Now that schema is looked at before anything is
    written to it (the migration would fire a trigger), and the rows go into a database this
    membershipd made: one line, exit 2, nothing written, never a traceback."""
    archive = tampered_schema(source, tmp_path, *sql)
    area = tmp_path / "area"
    area.mkdir()
    target = area / "new1" / "new2" / "restored"  # the directories restore makes above it go too
    one_line(restore_into(archive, target), 2, needle)
    assert not list(area.iterdir()), list(area.rglob("*"))


def test_a_restored_database_has_this_membershipd_s_schema(source, tmp_path):
    """What an archive's schema says beyond its rows (a default, a looser constraint, an index
    dropped) does not reach the restored node: the schema is the one a fresh migration makes."""
    from unibus.store.db import migrate

    archive = tampered_schema(source, tmp_path, "DROP INDEX IF EXISTS ix_room_members_handle",
                              "ALTER TABLE members ADD COLUMN note TEXT DEFAULT 'x'")
    proc = restore_into(archive, tmp_path / "restored")
    assert proc.returncode == 0, proc.stderr
    migrate(tmp_path / "fresh.db")

    def schema(db: Path) -> list[tuple[str, str, str]]:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            return sorted(conn.execute("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"))

    assert schema(tmp_path / "restored" / "membershipd.db") == schema(tmp_path / "fresh.db")
    original = tmp_path / "original.db"
    original.write_bytes(next(d for i, d in source.members if i.name == "membershipd.db"))
    restored, archived = read_store(tmp_path / "restored" / "membershipd.db"), read_store(original)
    assert restored["members"] and restored["log"] and restored["members"] == archived["members"]
    assert restored["log"] == archived["log"] and restored["rooms"] == archived["rooms"]


def test_backup_refuses_a_state_that_restore_would_refuse(tmp_path):
    """Red team: a state whose rows contradict its log (there, from a migrate-to-kv cut short) was
    backed up with exit 0, and restore refused the archive: the operator learnt it when they needed
    the backup. backup now runs restore's checks first: exit 1 naming the member, no archive."""
    alice, carol = generate_identity("alice"), generate_identity("carol")
    data_dir = tmp_path / "d"
    bootstrap_member(data_dir, alice, "admin")
    bootstrap_member(data_dir, carol, "member")
    with contextlib.closing(sqlite3.connect(data_dir / "membershipd.db")) as conn:
        conn.execute("UPDATE members SET role = 'admin' WHERE handle = 'carol'")  # behind the log's back
        conn.commit()
    out = tmp_path / "out.tar"
    one_line(cli("backup", "--out", str(out), "--data-dir", str(data_dir)), 1,
             "the state cannot be backed up, as restore would refuse it: member 'carol' in the store is not what "
             "its membership log establishes")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["d"]


# --------------------------------------------------------------------------- stop signals


def _wait_for(found: Callable[[], bool], proc: Any, timeout: float = 60) -> bool:
    """Poll ``found()`` every millisecond until it holds (True) or ``proc`` ended first (False)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.001)
    raise AssertionError("neither the staging nor the end of the command came")


@pytest.fixture(scope="module")
def large_source(tmp_path_factory) -> Path:
    """A stopped node's data directory with a 24 MiB blob: a compressed backup of it takes long
    enough to be stopped in the middle."""
    root = tmp_path_factory.mktemp("backup-large")
    alice = generate_identity("alice")
    data_dir = root / "node"
    bootstrap_member(data_dir, alice, "admin")
    daemon = MembershipdProcess(data_dir).start()
    try:
        async def fill() -> None:
            async with UnibusClient(daemon.base_url, alice) as a:
                room = (await a.create_room("big"))["room_id"]
                await a.rekey(room)
                (root / "big.bin").write_bytes(os.urandom(24 * 1024 * 1024))
                await put_raw_blob(a, room, root / "big.bin")

        asyncio.run(fill())
    finally:
        daemon.stop()
    return data_dir


def _stopped_while_staging(args: list[str], staging: Callable[[], bool], sig: int, undo: Callable[[], None]) -> int:
    """``membershipd ARGS`` sent ``sig`` once ``staging()`` holds; its exit status. A command that
    ended before it was seen staging is undone and run again, up to 5 times."""
    from unibus import forkrun

    for _attempt in range(5):
        proc = forkrun.spawn("unibus.cli", args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            staged = _wait_for(staging, proc)
            if staged:
                proc.send_signal(sig)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        if staged:
            return code
        assert code == 0
        undo()
    raise AssertionError(f"membershipd {args[0]} was not seen staging in 5 tries")


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_a_backup_stopped_by_a_signal_leaves_nothing_behind(large_source, tmp_path, sig):
    """SIGTERM (``systemctl stop``, ``timeout``) or SIGHUP (a dropped session) ends ``backup`` while
    it writes, as Ctrl-C does: exit 128 + the signal, and neither its ``.part`` file, its copy of
    the database nor its links in ``blobs/.tmp`` are left (they were, before)."""
    import signal

    out = tmp_path / "out"
    out.mkdir()
    signum = getattr(signal, sig)
    code = _stopped_while_staging(["backup", "--data-dir", str(large_source), "--out", str(out / "b.tar.gz")],
                                  lambda: any(p.name.endswith(".part") for p in out.iterdir()), signum,
                                  lambda: (out / "b.tar.gz").unlink())
    assert code == 128 + signum
    assert list(out.iterdir()) == []
    tmp_blobs = large_source / "blobs" / ".tmp"
    assert not tmp_blobs.exists() or list(tmp_blobs.iterdir()) == []


def test_a_restore_stopped_by_a_signal_leaves_nothing_behind(large_source, tmp_path):
    import shutil
    import signal

    archive = tmp_path / "archive"
    archive.mkdir()
    made = cli("backup", "--data-dir", str(large_source), "--out", str(archive / "b.tar.gz"))
    assert made.returncode == 0, made.stderr
    area = tmp_path / "area"
    area.mkdir()
    code = _stopped_while_staging(["restore", "--in", str(archive / "b.tar.gz"), "--data-dir", str(area / "node")],
                                  lambda: any(".restore-" in p.name for p in area.iterdir()), signal.SIGTERM,
                                  lambda: shutil.rmtree(area / "node"))
    assert code == 128 + signal.SIGTERM
    assert list(area.iterdir()) == []
