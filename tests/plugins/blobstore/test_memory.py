"""Memory stays flat: a 1 GiB blob up and down grows membershipd's RSS by less than 64 MiB.

The daemon's peak resident set (VmHWM in /proc/<pid>/status, reset through
/proc/<pid>/clear_refs after a warm-up) is compared with its resident set
before the transfer. The test itself never holds the blob either: it writes
the file in 1 MiB pieces and hashes the download as it arrives.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import aiohttp
import pytest
import yarl
from unibus.client import UnibusClient
from unibus.client.blobs import put_raw_blob
from unibus.signing import sign_request

from .conftest import start_world

GIB = 1024 * 1024 * 1024
LIMIT = 64 * 1024 * 1024


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def write_random_file(path: Path, size: int) -> bytes:
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            piece = os.urandom(min(left, 1024 * 1024))
            h.update(piece)
            f.write(piece)
            left -= len(piece)
    return h.digest()


async def download_and_hash(client: UnibusClient, rid: str, blob_id: str) -> tuple[int, str]:
    url = client.url_for(f"/v1/rooms/{rid}/blobs/{blob_id}")
    headers = sign_request("GET", url.raw_path_qs, None, keyid=client.identity.handle,
                           private_key=client.identity.sign_key)
    h = hashlib.sha256()
    n = 0
    async with aiohttp.ClientSession() as s, s.get(yarl.URL(str(url), encoded=True), headers=headers,
                                                    timeout=aiohttp.ClientTimeout(total=None, sock_read=120)) as r:
        assert r.status == 200
        async for chunk in r.content.iter_chunked(1024 * 1024):
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


@pytest.mark.slow
async def test_one_gib_up_and_down_keeps_rss_flat(tmp_path):
    server, people = start_world(tmp_path / "daemon", "--blob-max-bytes", str(2 * GIB))
    try:
        pid = server.pid
        async with UnibusClient(server.base_url, people["bob"]) as bob:
            rid = (await bob.create_room("big"))["room_id"]
            # warm-up: thread pool, buffers, code paths
            warm = tmp_path / "warm"
            warm_sha = write_random_file(warm, 8 * 1024 * 1024)
            warm_id = await put_raw_blob(bob, rid, warm, sha256=warm_sha)
            assert (await download_and_hash(bob, rid, warm_id))[1] == warm_id
            warm.unlink()

            big = tmp_path / "big"
            sha = write_random_file(big, GIB)
            before = status_kib(pid, "VmRSS")
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            blob_id = await put_raw_blob(bob, rid, big, sha256=sha)
            assert blob_id == sha.hex()
            big.unlink()
            n, digest = await download_and_hash(bob, rid, blob_id)
            assert n == GIB and digest == blob_id
            peak = status_kib(pid, "VmHWM")
        grown = (peak - before) * 1024
        print(f"membershipd RSS before {before} KiB, peak {peak} KiB: {grown / 2**20:+.1f} MiB")
        assert grown < LIMIT, f"RSS grew by {grown / 2**20:.1f} MiB (from {before} KiB to a peak of {peak} KiB)"
    finally:
        server.stop()
