"""glibc's allocator, set for membershipd's uploads: their receive buffers reused, not mapped afresh.

An upload's body comes off the socket in pieces of up to 1 MiB: asyncio makes
a new ``bytes`` for every ``recv``, and aiohttp copies each piece into another.
The pieces are held until the staging threads have hashed and written them, 4
MiB at a time, and are then freed together. With glibc's defaults, pieces of
that size come from the heap once its ``mmap`` threshold has adapted to them,
but the heap's top is handed back to the kernel whenever more than twice that
threshold is free there, which is after nearly every hand-over. The next
pieces then land on fresh pages, each one a page fault: 42 to 56 faults per
MB received, measured with ``/proc/<pid>/stat`` on the 2-core VM of
docs/benchmarks.md. That VM reports freed pages to its host, so a fresh page
costs 2 to 3 µs there, and the faults took up to a tenth of membershipd's
CPU per MB uploaded (docs/benchmarks.md, "Blobs").

:func:`tune` sets, with ``mallopt``, a fixed ``mmap`` threshold of 4 MiB
(smaller blocks come from the heap: the pieces, and the 2 MiB that aiohttp
makes when it joins two of them) and a trim threshold of 32 MiB (up to that
much free memory at the top of a heap is kept for the next pieces). It is
called once, by ``membershipd serve``, before anything is allocated for a
request. The price is memory kept after uploads: up to 32 MiB at the top of
each of glibc's arenas (an upload's pieces are allocated in the event loop's
thread, so in one of them; worker threads may use others), 9 to 12 MiB more
resident after one upload in the measurement above. Free memory below a
heap's top is kept as with glibc's defaults.

The operator's environment wins: nothing is changed when it sets
``GLIBC_TUNABLES``, ``LD_PRELOAD`` (an allocator preloaded, say) or any
``MALLOC_*`` variable, even one about something else (``MALLOC_ARENA_MAX``).
Nothing is changed on a C library other than glibc, or one without
``mallopt``, either.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping

#: ``mallopt`` parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Blocks under this size come from the heap, never from a mapping of their own.
MMAP_THRESHOLD = 4 * 1024 * 1024
#: Free memory at the heap's top, up to this much, is kept rather than handed back.
TRIM_THRESHOLD = 32 * 1024 * 1024


def operator_settings(environ: Mapping[str, str]) -> list[str]:
    """The environment variables by which the operator set glibc's allocator, or chose another."""
    return sorted(k for k in environ if k in ("GLIBC_TUNABLES", "LD_PRELOAD") or k.startswith("MALLOC_"))


def glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError, AttributeError):  # a name this system does not know, or no confstr
        return False


def tune(environ: Mapping[str, str] = os.environ) -> str:
    """Set this process's allocator as the module says; what was done, in words (for the log)."""
    if not glibc():
        return "allocator left as it is: not glibc"
    mine = operator_settings(environ)
    if mine:
        return f"allocator left as the environment sets it ({', '.join(mine)})"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "allocator left as it is: no mallopt"
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # The mmap threshold first: a 32-bit glibc refuses 4 MiB (its limit is 512 KiB), and then
    # nothing is changed. The trim threshold takes any value.
    if not mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        return "allocator left as it is: mallopt refused"
    mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return (f"allocator: blocks under {MMAP_THRESHOLD >> 20} MiB from the heap, "
            f"up to {TRIM_THRESHOLD >> 20} MiB of a heap's free top kept")
