"""membershipd keeps its large receive buffers on glibc's heap, unless the operator set the allocator."""

from __future__ import annotations

import os
import subprocess
import sys

from unibus import allocator
from unibus.testing import MembershipdProcess, nats_server_pids

#: What an upload does to the allocator: pieces of 1 MiB (asyncio's recv, aiohttp's copy), four at
#: a time (a 4 MiB hand-over), then all freed. The page faults of 20 such rounds, after 3 to warm up.
ROUNDS = """
import resource, sys
from unibus import allocator
print(allocator.tune() if sys.argv[1] == "tune" else "plain")
def one_round():
    pieces = [b"x" * (1 << 20) for _ in range(4)]
    del pieces
for _ in range(3):
    one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    one_round()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(how: str, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not allocator.operator_settings({k: v})}
    out = subprocess.run([sys.executable, "-c", ROUNDS, how], env={**clean, **env}, capture_output=True,
                         text=True, timeout=60, check=True).stdout.splitlines()
    return out[0], int(out[1])


def test_tuned_the_pieces_of_an_upload_reuse_the_heap_instead_of_faulting_in_fresh_pages():
    said, tuned = _page_faults("tune")
    _, plain = _page_faults("plain")
    if not allocator.glibc():
        assert said == "allocator left as it is: not glibc"
        return
    assert said == "allocator: blocks under 4 MiB from the heap, up to 32 MiB of a heap's free top kept"
    # glibc's defaults hand the heap's top back after each round, so every round faults its pieces
    # in afresh: 80 MiB of new pages (20,480 faults of 4 KiB pages; fewer where transparent huge
    # pages back the heap, but at least one a round). Tuned, the rounds reuse the same pages.
    assert plain >= 20, plain
    assert tuned < 20, tuned


def test_an_operator_s_own_allocator_settings_win():
    assert allocator.operator_settings({"MALLOC_ARENA_MAX": "2", "PATH": "/bin", "GLIBC_TUNABLES": "x",
                                        "LD_PRELOAD": "libjemalloc.so.2", "UNIBUS_MALLOC": "1"}) == [
        "GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_ARENA_MAX"]
    if not allocator.glibc():
        assert allocator.tune({"MALLOC_ARENA_MAX": "2"}) == "allocator left as it is: not glibc"
        return
    assert allocator.tune({"MALLOC_ARENA_MAX": "2"}) == "allocator left as the environment sets it (MALLOC_ARENA_MAX)"
    # glibc.malloc.perturb=0 is glibc's default: the allocator is as glibc leaves it, faults and all
    said, faults = _page_faults("tune", GLIBC_TUNABLES="glibc.malloc.perturb=0")
    assert said == "allocator left as the environment sets it (GLIBC_TUNABLES)"
    assert faults >= 20, faults


def test_membershipd_serve_says_what_it_did_to_the_allocator(tmp_path):
    daemon = MembershipdProcess(tmp_path / "d", ["--bus-auth", "off"], env={"UNIBUS_LOG_LEVEL": "INFO"})
    try:  # this environment's allocator settings, if any
        daemon.start()
        log = daemon.log_path.read_text()
    finally:
        daemon.stop()
    if not allocator.glibc():
        expected = "allocator left as it is: not glibc"
    elif mine := allocator.operator_settings(os.environ):
        expected = f"allocator left as the environment sets it ({', '.join(mine)})"
    else:
        expected = "allocator: blocks under 4 MiB from the heap, up to 32 MiB of a heap's free top kept"
    assert f"unibus.daemon: {expected}" in log
    assert not nats_server_pids(tmp_path)
