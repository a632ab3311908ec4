"""glibc's allocator, set for membershipd's uploads: their receive buffers reused, not mapped afresh.

An upload's body comes off the socket in pieces of up to 1 MiB: asyncio makes
a new ``bytes`` for every ``recv``, and aiohttp copies each piece into another.
The pieces are held until the staging threads have hashed and written them, 4
MiB at a time, and are then freed together. With glibc's defaults, pieces of
that size come from the heap once its ``mmap`` threshold has adapted to them,
but the heap's top is handed back to the kernel whenever more than twice that
threshold is free there, which is after nearly every hand-over. The next
pieces then land on fresh pages, each one a page fault: 49 to 56 faults per
MB received, measured with ``/proc/<pid>/stat`` on the 2-core VM of
docs/benchmarks.md. That VM reports freed pages to its host, so a fresh page
costs about 2 µs there, and the faults were 7 to 10% of membershipd's CPU
per MB uploaded (docs/benchmarks.md, "Blobs").

:func:`tune` sets, with ``mallopt``, a fixed ``mmap`` threshold of 2 MiB
(smaller blocks come from the heap) and a trim threshold of 32 MiB (up to
that much free heap top is kept for the next pieces). It is called once, by
``membershipd serve``, before anything is allocated for a request. The price
is memory kept after uploads: at most the trim threshold, about 12 MiB more
resident after one upload in the measurement above.

An operator's own settings win: nothing is changed when the environment sets
``GLIBC_TUNABLES`` or any ``MALLOC_*`` variable (glibc reads them at start).
Nothing is changed on a C library other than glibc either.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping

#: ``mallopt`` parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Blocks under this size come from the heap, never from a mapping of their own.
MMAP_THRESHOLD = 2 * 1024 * 1024
#: Free memory at the heap's top, up to this much, is kept rather than handed back.
TRIM_THRESHOLD = 32 * 1024 * 1024


def operator_settings(environ: Mapping[str, str]) -> list[str]:
    """The environment variables by which the operator set glibc's allocator themselves."""
    return sorted(k for k in environ if k == "GLIBC_TUNABLES" or k.startswith("MALLOC_"))


def glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError):  # not a name this system knows: not glibc
        return False


def tune(environ: Mapping[str, str] = os.environ) -> str:
    """Set this process's allocator as the module says; what was done, in words (for the log)."""
    if not glibc():
        return "allocator left as it is: not glibc"
    mine = operator_settings(environ)
    if mine:
        return f"allocator left as the environment sets it ({', '.join(mine)})"
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return "allocator left as it is: mallopt refused"  # not expected: both values are in range
    return (f"allocator: blocks under {MMAP_THRESHOLD >> 20} MiB from the heap, "
            f"up to {TRIM_THRESHOLD >> 20} MiB of its free top kept")
