"""Red team r4: the object store's big chunks, against a real nats-server.

Found as a strict xfail by the red team; passes since the node-wide read-ahead
budget (``READ_AHEAD_BUDGET``, docs/blobstore.md, "Cluster mode").
"""

from __future__ import annotations

import asyncio
import os
import tracemalloc

import nats
from unibus.plugins.blobstore import objectstore
from unibus.plugins.blobstore.objectstore import ObjectStoreBackend

from .test_backend_contract import ROOM, put

MIB = 1024 * 1024
#: Downloads a member opens at once (one signed GET each, no bound on downloads: docs/blobstore.md).
DOWNLOADS = 64
#: What a node may hold for all of them together: the node's read-ahead budget, and 4 MiB to
#: spare. Before, each stalled read also held the chunk it had handed over: 48 MiB with
#: chunks of 512 KiB, 80 MiB with those of 1 MiB.
NODE_BUDGET = objectstore.READ_AHEAD_BUDGET * objectstore.CHUNK_SIZE + 4 * MIB


async def test_stalled_downloads_hold_a_bounded_amount_of_memory_together(nats_server, tmp_path):
    """A member uploads one 16 MiB blob, then opens many GETs of it and reads none past its
    first bytes (a TCP window kept shut: aiohttp has no send timeout). Each GET's reader has
    yielded its first chunk and keeps READ_AHEAD direct gets in flight, whose answers (1 MiB
    less 4 KiB each in 0.12, 256 KiB before) it holds until the client reads on: 4 MiB per
    download, docs/blobstore.md ("Downloads need no such bound: ... the object store holds
    at most 8 chunks (4 MiB) of a download at a time"). The bound is per download only:
    64 stalled downloads held 256 MiB, a few hundred took a node's memory. Now the
    read-ahead beyond one request per read comes from a node-wide budget, which every
    read gives back when it ends."""
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream(timeout=5)
    gens = []
    try:
        b = ObjectStoreBackend(js, tmp_path / "blobs")
        await b.start()
        info, _ = await put(b, os.urandom(16 * MIB), piece=MIB)
        assert b.chunk_size() == objectstore.CHUNK_SIZE == 1024 * 1024 - 4096
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            for _ in range(DOWNLOADS):
                reader = await b.open(ROOM, info.blob_id)
                assert reader is not None
                g = reader.chunks()
                await g.__anext__()  # the first chunk goes out; then the client stops reading
                gens.append(g)
            await asyncio.sleep(1.0)  # the read-ahead's answers arrive
            held = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        assert held <= NODE_BUDGET, (f"{DOWNLOADS} stalled downloads hold {held / MIB:.0f} MiB "
                                     f"({held / DOWNLOADS / MIB:.1f} MiB each)")
        for g in gens:
            await g.aclose()
        gens.clear()
        assert b.read_tokens == objectstore.READ_AHEAD_BUDGET  # every token given back
        # and a read on its own reads ahead fully again, and whole
        reader = await b.open(ROOM, info.blob_id)
        assert len(b"".join([c async for c in reader.chunks()])) == 16 * MIB
        assert b.read_tokens == objectstore.READ_AHEAD_BUDGET
    finally:
        for g in gens:
            await g.aclose()
        await nc.close()
