"""blobstore: streamed, content-addressed room blobs (docs/blobstore.md).

Routes (added by :func:`startup`, documented in ``/openapi.json``)::

    PUT    /v1/rooms/{room_id}/blobs              room members; streamed body, signed Content-Digest
    GET    /v1/rooms/{room_id}/blobs/{blob_id}    room members; streamed, Content-Digest + Content-Length
    DELETE /v1/rooms/{room_id}/blobs/{blob_id}    the uploader (while a member), the room's owner, admins

A blob is whatever the client sends, normally a file encrypted with the room
key (``unibus.client.blobs``; the server never sees plaintext). Its id is the
SHA-256 of its bytes, so uploading the same bytes again is idempotent.

The upload handler is marked streaming (``unibus_streaming``): the auth layer
checks the signature, including that a ``Content-Digest`` is covered, without
reading the body; the handler then streams the body into a staging file,
hashing it, and compares the hash with the signed digest at the end (400 and
nothing stored on a mismatch). ``Content-Length`` above ``--blob-max-bytes``
is refused with 413 before anything is read, and a body (chunked or not) that
runs over the limit is refused with 413 as soon as it does. A body that stalls
for longer than the body timeout (``UNIBUS_BODY_TIMEOUT``) is 408; every
refusal before the end closes the connection (docs/http-api.md). At most
``--blob-max-uploads`` uploads run at once on a node, a quarter of them per
member (:mod:`.limits`): the others are refused before their body is read.
Downloads take slots the same way (``--blob-max-downloads``), and a download
whose client does not keep up is dropped (:mod:`.pacing`).

Storage: :mod:`.fs` (``<data-dir>/blobs``) on a single node; :mod:`.objectstore`
(the JetStream object store ``unibus_blobs``, ``--kv-replicas`` replicas) in
cluster mode. Deleting a room deletes its blobs. See docs/blobstore.md.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from unibus import StashKey, hookimpl
from unibus.bus import CLUSTER_FORM_TIMEOUT, retry_until
from unibus.settings import Option, parse_positive_int

from .backend import RECV_SIZE, WRITE_CHUNK, BlobBackend, BlobError, BlobUnavailable, check_blob_id
from . import pacing
from .limits import DEFAULT_MAX_DOWNLOADS, DEFAULT_MAX_UPLOADS, Slots, check_rate

if TYPE_CHECKING:
    from unibus.problems import Problem

PLUGIN_NAME = "blobstore"
DEFAULT_MAX_BYTES = 104857600
#: The running :class:`BlobService`, in the plugin's stash (docs/plugins.md, "State").
SERVICE: StashKey[BlobService] = StashKey("service")
BLOBS_DIR = "blobs"

log = logging.getLogger("unibus.plugins.blobstore")


class BlobService:
    """The plugin's runtime: the backend and the limits."""

    def __init__(self, backend: BlobBackend, max_bytes: int, max_uploads: int = DEFAULT_MAX_UPLOADS,
                 max_downloads: int = DEFAULT_MAX_DOWNLOADS) -> None:
        #: removes :meth:`on_change` from the store's listeners (set at start-up)
        self.unsubscribe: Callable[[], None] = lambda: None
        self.backend = backend
        self.max_bytes = max_bytes
        self.uploads = Slots(max_uploads, "uploads")
        self.downloads = Slots(max_downloads, "downloads")

    def on_change(self, change: Any) -> Awaitable[int] | None:
        """Store listener: a deleted room takes its blobs with it (the DELETE waits for it)."""
        if change.kind == "room_deleted" and change.room_id:
            return self.backend.delete_room(change.room_id)
        return None


def make_backend(settings: Any, js: Any = None) -> BlobBackend:
    """The fs backend on a single node; the JetStream object store in cluster mode."""
    root = settings.data_dir / BLOBS_DIR
    if settings.clustered:
        from .objectstore import ObjectStoreBackend

        return ObjectStoreBackend(js, root, replicas=settings.kv_replicas)
    from .fs import FsBackend

    return FsBackend(root)


# --------------------------------------------------------------------------- hooks


@hookimpl
def cli_options() -> list[Option]:
    return [
        Option(
            "--blob-max-bytes",
            help=f"largest blob accepted, in bytes (default {DEFAULT_MAX_BYTES})",
            default=DEFAULT_MAX_BYTES,
            convert=parse_positive_int,
            metavar="N",
            doc="largest blob accepted",
        ),
        Option(
            "--blob-max-uploads",
            help=f"uploads in progress at once on this node, a quarter of them per member; the others are "
                 f"refused before their body is read (default {DEFAULT_MAX_UPLOADS})",
            default=DEFAULT_MAX_UPLOADS,
            convert=parse_positive_int,
            metavar="N",
            doc="uploads in progress at once, a quarter of them per member",
        ),
        Option(
            "--blob-max-downloads",
            help=f"downloads in progress at once on this node, a quarter of them per member; the others are "
                 f"refused before the blob is opened (default {DEFAULT_MAX_DOWNLOADS})",
            default=DEFAULT_MAX_DOWNLOADS,
            convert=parse_positive_int,
            metavar="N",
            doc="downloads in progress at once, a quarter of them per member",
        ),
    ]


@hookimpl
async def startup(app: web.Application) -> None:
    from unibus.app import BUS, METRICS, SETTINGS, STORE, stash

    settings = app[SETTINGS]
    store = app[STORE]
    backend = make_backend(settings, app[BUS].js)

    async def room_exists(room_id: str) -> bool:
        return await store.get_room(room_id) is not None

    # Blobs of rooms the store no longer knows are swept at start-up, but in a
    # cluster only when the store is cluster-wide: a node-local store (SQLite on
    # every node) does not know the rooms other nodes made, whose blobs share
    # the object store.
    sweep = not settings.clustered or bool(getattr(store, "cluster_wide", False))
    # A forming cluster elects the object store's stream leader after the
    # other buckets': retry like the core does for its own buckets.
    await retry_until(lambda: backend.start(room_exists if sweep else None),
                      CLUSTER_FORM_TIMEOUT if settings.clustered else 10.0, "blobstore: cannot open the blob store")
    service = BlobService(backend, int(settings.option("blob_max_bytes", DEFAULT_MAX_BYTES)),
                          int(settings.option("blob_max_uploads", DEFAULT_MAX_UPLOADS)),
                          int(settings.option("blob_max_downloads", DEFAULT_MAX_DOWNLOADS)))
    stash(app)[SERVICE] = service
    # Read at every scrape from the backend's in-memory counters (docs/operations.md, "Metrics").
    metrics = app[METRICS].plugin(PLUGIN_NAME)
    metrics.gauge("unibus_blobs", "blobs stored (on a cluster: by every node)", function=lambda: backend.blobs)
    metrics.gauge("unibus_blob_bytes", "bytes of the blobs stored (ciphertext)", function=lambda: backend.bytes)
    for kind, slots in (("uploads", service.uploads), ("downloads", service.downloads)):
        metrics.gauge(f"{kind}_in_progress", f"{kind} in progress on this node",
                      function=lambda slots=slots: slots.active)
        refused = metrics.counter(f"{kind}_refused", f"{kind} refused because the node (reason=node) or the "
                                  "member (reason=member) had as many in progress as allowed", ["reason"])
        for reason in ("node", "member"):
            refused.labels(reason)  # both series from the start
        slots.on_refused = lambda reason, refused=refused: refused.labels(reason).inc()
    service.unsubscribe = store.add_listener(service.on_change)
    register_routes(app)


@hookimpl
async def shutdown(app: web.Application) -> None:
    from unibus.app import stash

    service = stash(app, PLUGIN_NAME).pop(SERVICE)
    if service is not None:
        service.unsubscribe()
        await service.backend.close()


@hookimpl
def healthz_fields(app: web.Application) -> dict[str, Any]:
    from unibus.app import stash

    service = stash(app, PLUGIN_NAME).get(SERVICE)
    if service is None:
        return {"backend": None, "blobs": 0, "bytes": 0}
    return service.backend.stats()


# --------------------------------------------------------------------------- HTTP


def _service(request: web.Request) -> BlobService:
    from unibus.app import stash

    return stash(request.app, PLUGIN_NAME)[SERVICE]


def _problem(status: int, detail: str, kind: str | None = None, **kw: Any) -> Problem:
    from unibus.problems import Problem

    return Problem(status, detail, kind=kind, **kw)


def _unavailable_as_503(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except BlobUnavailable as e:
            raise _problem(503, str(e), kind="blobstore-unavailable", headers={"Retry-After": "1"}) from None

    return wrapped


async def _room_for_member(request: web.Request) -> Any:
    """The room of the path; 404 if absent, 403 unless the caller is one of its members."""
    from unibus.api.rooms import load_room
    from unibus.auth import require_member

    room = await load_room(request)
    me = require_member(request)
    if me.handle not in room.handles:
        raise _problem(403, "only the room's members may use its blobs", kind="forbidden")
    return room, me


def _blob_id(request: web.Request) -> str:
    raw = request.match_info["blob_id"]
    try:
        return check_blob_id(raw.lower() if len(raw) == 64 else raw)
    except ValueError:
        from unibus.inputs import unnamed

        # a blob_id that breaks its syntax names no blob: 404, as the core answers a room_id's
        raise unnamed("blob_id", "must be 64 hex characters (the SHA-256 of the blob)") from None


def content_digest_value(blob_id: str) -> str:
    return "sha-256=:" + base64.b64encode(bytes.fromhex(blob_id)).decode("ascii") + ":"


async def put_blob(request: web.Request) -> web.Response:
    from unibus.auth import SIGNATURE_KEY, unauthorized

    service = _service(request)
    room, me = await _room_for_member(request)
    verified = request.get(SIGNATURE_KEY)
    expected = getattr(verified, "content_sha256", None)
    if expected is None:
        raise unauthorized("a blob upload needs a signed Content-Digest (sha-256) that names the body", "digest")
    limit = service.max_bytes
    length = request.content_length
    if length is not None and length > limit:
        raise _problem(413, f"the blob is {length} bytes; this server accepts at most {limit} (--blob-max-bytes)",
                       kind="too-large", max_bytes=limit)
    with service.uploads.hold(me.handle):  # 503/429 before a byte of the body is read
        return await _receive(request, service, room, me, expected, limit)


async def _receive(request: web.Request, service: BlobService, room: Any, me: Any, expected: bytes,
                   limit: int) -> web.Response:
    """Stream the body into the backend, check it against the signed digest, commit: 201."""
    from unibus.api.common import json_response
    from unibus.auth import BODY_TIMEOUT_KEY, DEFAULT_BODY_TIMEOUT, body_chunks

    grace = request.get(BODY_TIMEOUT_KEY, DEFAULT_BODY_TIMEOUT)
    started = time.monotonic()
    upload = await service.backend.begin(room.room_id)
    try:
        _large_reads(request)
        total = 0
        parts: list[bytes] = []
        buffered = 0
        async for data in body_chunks(request):  # 408 on a stalled body, 400 on broken framing
            total += len(data)
            if total > limit:
                raise _problem(413, f"the blob is larger than {limit} bytes, the most this server accepts "
                               "(--blob-max-bytes)", kind="too-large", max_bytes=limit)
            check_rate(total, time.monotonic() - started, grace)  # 408 for a trickle that would keep the slot
            parts.append(data)
            buffered += len(data)
            if buffered >= WRITE_CHUNK:
                await upload.write(tuple(parts))  # the pieces, not joined: written with writev
                parts.clear()
                buffered = 0
        if parts:
            await upload.write(tuple(parts))
        digest = await upload.finish()
        if not hmac.compare_digest(digest, expected):
            raise _problem(400, "the body does not match its signed Content-Digest; nothing was stored",
                           kind="digest-mismatch")
        # Checked before the commit, and again after it: a removal or a deletion during the upload
        # then never makes the blob visible, even for a moment, and only one that lands during the
        # commit itself relies on the check after it, which a stop skips (docs/blobstore.md).
        if (gone := await _gone_during_upload(request, room.room_id, me.handle)) is not None:
            raise gone
        info, created = await upload.commit(me.handle)
    finally:
        _default_reads(request)
        await upload.abort()  # no-op once committed
    if (gone := await _gone_during_upload(request, room.room_id, me.handle)) is not None:
        # A blob that was there already is someone else's upload: kept, unless the room is gone.
        if created or gone.status == 404:
            await service.backend.delete(room.room_id, info.blob_id)
        raise gone
    if created:
        log.info("blob %s stored in room %s by %s (%d bytes)", info.blob_id, room.room_id, me.handle, info.size)
    response = json_response({"blob_id": info.blob_id, "size": info.size}, status=201)
    response.headers["Location"] = f"/v1/rooms/{room.room_id}/blobs/{info.blob_id}"
    return response


async def _gone_during_upload(request: web.Request, room_id: str, handle: str) -> Problem | None:
    """The answer for an upload whose room was deleted (404), or whose uploader left it or was
    deleted (403), since the upload's checks; None while both still hold. One read of the room's
    record (``room_handles``), not of every member's, as ``get_room`` makes in a cluster, and one
    of the uploader's: on a cluster a room's record still names a deleted member for a moment
    after its deletion (docs/store.md, "Each operation"), and a review had a deleted member's
    upload stored in that moment."""
    from unibus.app import STORE

    store = request.app[STORE]
    handles, _revision = await store.room_handles(room_id)
    if handles is None:
        return _problem(404, f"room {room_id!r} was deleted during the upload; nothing was stored",
                        kind="not-found")
    if handle not in handles:
        return _problem(403, "only the room's members may use its blobs, and you left it during the upload; "
                             "nothing was stored", kind="forbidden")
    if await store.get_member(handle) is None:
        return _problem(403, "you were deleted during the upload; nothing was stored", kind="forbidden")
    return None


def _large_reads(request: web.Request) -> None:
    """While an upload streams in, its connection asks up to :data:`RECV_SIZE` bytes of the
    socket per ``recv`` (asyncio's default is 256 KiB): a quarter of the ``recv`` calls,
    parser callbacks and pieces to hand on. Measured with 128 MiB raw PUTs, this with
    the 4 MiB hand-offs to the writer thread took membershipd's CPU time per upload from
    0.49 s to 0.23 s (docs/benchmarks.md, "Blobs"); a larger read buffer as well
    (``set_read_chunk_size``) measured no better."""
    transport = request.transport
    if transport is not None and isinstance(getattr(transport, "max_size", None), int):
        transport.max_size = RECV_SIZE


def _default_reads(request: web.Request) -> None:
    transport = request.transport
    if transport is not None and "max_size" in getattr(transport, "__dict__", ()):
        del transport.max_size  # the class's default again (a kept-alive connection's next requests are small)


# The auth layer checks the signature without reading the body (unibus.auth.STREAMING_ATTR).
put_blob.unibus_streaming = True  # type: ignore[attr-defined]


class _SendfileResponse(web.StreamResponse):
    """A whole file with sendfile(2): no Range or conditional handling, so the
    Content-Digest always describes exactly the bytes sent. Its client must keep up
    what :mod:`.pacing` asks (it is dropped otherwise): ``dropped`` then says why."""

    def __init__(self, file: Any, size: int, headers: dict[str, str], deadline: float) -> None:
        super().__init__(status=200, headers=headers)
        self._file = file
        self._size = size
        self._deadline = deadline
        self.content_length = size
        self.dropped: str | None = None

    async def prepare(self, request: web.BaseRequest) -> Any:
        if self.prepared:  # aiohttp calls prepare() again after the handler returned
            return await super().prepare(request)
        writer = await super().prepare(request)
        if self._size == 0:
            return writer
        try:
            self.dropped = await pacing.sendfile_while_read(request, self._file, self._size, self._deadline)
        except OSError as e:  # the client went away (reset, broken pipe): nothing more to send
            self.dropped = f"the connection ended ({e.strerror or e})"
        except Exception as e:  # noqa: BLE001 - headers are gone: cut the connection short
            log.error("sendfile failed: %s", e)
            self.dropped = f"sendfile failed ({e})"
        if self.dropped is not None:
            pacing.drop(request.transport)
            return writer
        await super().write_eof()
        return writer


async def get_blob(request: web.Request) -> web.StreamResponse:
    service = _service(request)
    room, me = await _room_for_member(request)
    blob_id = _blob_id(request)
    with service.downloads.hold(me.handle), pacing.reset_if_closed(request.transport):  # 503/429 first
        return await _send(request, service, room, blob_id)


async def _send(request: web.Request, service: BlobService, room: Any, blob_id: str) -> web.StreamResponse:
    """The blob as the body of a 200, held to :mod:`.pacing` (a client that does not keep up
    is dropped: its download holds a descriptor or chunks, as an upload holds a slot)."""
    from unibus.auth import BODY_TIMEOUT_KEY, DEFAULT_BODY_TIMEOUT

    reader = await service.backend.open(room.room_id, blob_id)
    if reader is None:
        raise _problem(404, f"no blob {blob_id} in room {room.room_id}", kind="not-found")
    headers = {
        "Content-Type": "application/octet-stream",
        "Content-Digest": content_digest_value(blob_id),
        "Cache-Control": "no-store",
    }
    deadline = request.get(BODY_TIMEOUT_KEY, DEFAULT_BODY_TIMEOUT)
    try:
        if reader.file is not None and pacing.can_sendfile(request.transport):
            sendfile = _SendfileResponse(reader.file, reader.info.size, headers, deadline)
            try:
                await sendfile.prepare(request)
            except OSError as e:  # the client went away before the headers went out
                log.info("blob %s of room %s: the connection ended (%s)", blob_id, room.room_id, e)
                return sendfile
            if sendfile.dropped is not None:
                log.info("blob %s of room %s: %s; connection dropped", blob_id, room.room_id, sendfile.dropped)
            return sendfile
        response = web.StreamResponse(status=200, headers=headers)
        response.content_length = reader.info.size
        started = asyncio.get_running_loop().time()
        handed = 0
        try:
            await response.prepare(request)
            async for chunk in reader.chunks():
                why = await pacing.write_while_read(request, response, chunk, deadline, started, handed)
                if why is not None:
                    log.info("blob %s of room %s: %s; connection dropped", blob_id, room.room_id, why)
                    pacing.drop(request.transport)
                    return response
                handed += len(chunk)
            why = await pacing.drain_while_read(request, deadline, started, handed)
            if why is not None:
                log.info("blob %s of room %s: %s; connection dropped", blob_id, room.room_id, why)
                pacing.drop(request.transport)
                return response
        except OSError as e:  # the client went away (reset, broken pipe)
            log.info("blob %s of room %s: the connection ended (%s)", blob_id, room.room_id, e)
            pacing.drop(request.transport)
            return response
        except Exception as e:  # noqa: BLE001 - headers are gone: cut the connection short
            gone = False
            if isinstance(e, BlobError):
                with contextlib.suppress(Exception):
                    gone = await service.backend.info(room.room_id, blob_id) is None
            if gone:  # deleted while it was being sent: the uploader's right, not a fault
                log.info("blob %s of room %s: deleted while it was being sent; connection closed", blob_id,
                         room.room_id)
            else:
                log.error("blob %s of room %s: streaming failed: %s", blob_id, room.room_id, e)
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response
    finally:
        await reader.close()


async def delete_blob(request: web.Request) -> web.Response:
    from unibus.api.rooms import is_owner, load_room
    from unibus.auth import require_member

    service = _service(request)
    room = await load_room(request)
    me = require_member(request)
    if not (me.is_admin or me.handle in room.handles):
        raise _problem(403, "only the uploader, the room's owner and admins may delete a blob", kind="forbidden")
    blob_id = _blob_id(request)
    info = await service.backend.info(room.room_id, blob_id)
    if info is None:
        raise _problem(404, f"no blob {blob_id} in room {room.room_id}", kind="not-found")
    if not (me.is_admin or is_owner(room, me) or info.uploader == me.handle):
        raise _problem(403, "only the uploader, the room's owner and admins may delete a blob", kind="forbidden")
    if not await service.backend.delete(room.room_id, blob_id):
        raise _problem(404, f"no blob {blob_id} in room {room.room_id}", kind="not-found")
    log.info("blob %s of room %s deleted by %s", blob_id, room.room_id, me.handle)
    return web.Response(status=204)


#: ``blob_id``: the SHA-256 of the blob in hex (upper case accepted); the handlers check it (404).
BLOB_ID_SCHEMA = {"type": "string", "pattern": "^[0-9a-fA-F]{64}$", "description": "SHA-256 of the blob, hex"}
#: ``PUT .../blobs``: what was stored.
BLOB_RECORD = {"type": "object", "required": ["blob_id", "size"], "additionalProperties": False,
               "properties": {"blob_id": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                              "size": {"type": "integer", "minimum": 0}}}


def register_routes(app: web.Application) -> None:
    from unibus.app import add_route, add_schema
    from unibus.openapi import Response, header

    blob = add_schema(app, "Blob", BLOB_RECORD)
    common = {403: "not allowed", 404: "no such room or blob (also a room_id or blob_id that breaks its syntax)",
              503: "replay protection, the store or the blob store unavailable; try again after Retry-After"}
    path = "/v1/rooms/{room_id}/blobs"
    add_route(app, "PUT", path, _streaming(_unavailable_as_503(put_blob)),
              summary="Upload a blob (streamed; signed Content-Digest required; room members)",
              request_schema={"type": "string", "format": "binary",
                              "description": "the blob's bytes (normally unibus-blob-v1 ciphertext)"},
              request_content_type="application/octet-stream",
              responses={201: Response("{blob_id, size}; also for a re-upload of the same bytes", blob,
                                       headers={"Location": header("/v1/rooms/{room_id}/blobs/{blob_id}")}),
                         400: "the body does not match its signed Content-Digest (digest-mismatch), or its HTTP "
                              "framing is broken; nothing stored",
                         401: "missing or invalid signature, or a body whose Content-Digest is not signed",
                         408: "a part of the body did not arrive within the body deadline; nothing stored",
                         413: "larger than --blob-max-bytes; nothing stored",
                         429: "the member already has its share of --blob-max-uploads in progress (too-many-uploads)",
                         **common,
                         404: "no such room (also a room_id that breaks its syntax)",
                         503: common[503] + "; or --blob-max-uploads uploads in progress on this node "
                                            "(too-many-uploads)"},
              tags=["blobs"], namespaced=False)  # paths of docs/http-api.md
    blob_bytes = Response("the blob's bytes", {"type": "string", "format": "binary"}, "application/octet-stream",
                          headers={"Content-Digest": header("sha-256=:<base64>: of the bytes",
                                                            {"type": "string", "pattern": "^sha-256=:[A-Za-z0-9+/]{43}=:$"}),
                                   "Content-Length": header("the blob's size", {"type": "string", "pattern": "^[0-9]+$"})})
    add_route(app, "GET", path + "/{blob_id}", _unavailable_as_503(get_blob),
              summary="Download a blob (streamed, with Content-Digest and Content-Length; room members)",
              responses={200: blob_bytes,
                         429: "the member already has its share of --blob-max-downloads in progress "
                              "(too-many-downloads)",
                         **common,
                         503: common[503] + "; or --blob-max-downloads downloads in progress on this node "
                                            "(too-many-downloads)"},
              path_params={"blob_id": BLOB_ID_SCHEMA}, tags=["blobs"], namespaced=False)  # paths of docs/http-api.md
    add_route(app, "DELETE", path + "/{blob_id}", _unavailable_as_503(delete_blob),
              summary="Delete a blob (the uploader, the room's owner, admins)",
              responses={204: "deleted", **common},
              path_params={"blob_id": BLOB_ID_SCHEMA}, tags=["blobs"], namespaced=False)  # paths of docs/http-api.md


def _streaming(handler: Callable[..., Any]) -> Callable[..., Any]:
    handler.unibus_streaming = True  # type: ignore[attr-defined]
    return handler


__all__ = ["DEFAULT_MAX_BYTES", "PLUGIN_NAME", "BlobService", "make_backend"]
