"""bench/bench_blobs.py --no-sha-ext: its refusals, and the section a masked run writes.

The figures themselves come from ``make bench`` (docs/benchmarks.md); here only what the script
decides from them: which aim applies, what the machine line says and where the section goes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "bench_blobs.py"
MIB = 1024 * 1024


def run(*args: str, mask: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "OPENSSL_ia32cap"}
    if mask is not None:
        env["OPENSSL_ia32cap"] = mask
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env=env, stdin=subprocess.DEVNULL, cwd=REPO)


@pytest.mark.parametrize(("args", "mask", "says"), [
    ((), "0x0", "OPENSSL_ia32cap is set (0x0): the figures would not be this CPU's"),
    (("--no-sha-ext",), ":~0x4", "OPENSSL_ia32cap is already set (:~0x4); unset it"),
])
def test_a_mask_the_run_would_not_report_is_refused_with_one_line(args, mask, says, tmp_path):
    out = tmp_path / "benchmarks.md"
    proc = run(*args, "--out", str(out), mask=mask)
    assert proc.returncode == 2
    assert proc.stdout == "" and proc.stderr.count("\n") == 1 and says in proc.stderr
    assert not out.exists()


def _data(masked: bool) -> dict:
    big = 256 * MIB
    sizes = (MIB, big)

    def secs(size: int, mb_s: float) -> list[float]:
        return [size / (mb_s * 1e6)] * 3

    floors = {"copy+fsync": 1400, "copy": 3000, "sha256": 400 if masked else 1900, "chacha": 2500, "aesgcm": 7000}
    after = {"put": 120, "get": 330, "raw_put": 280, "raw_get": 340}
    return {
        "date": "2026-12-06", "command": "bench", "cpu": "a CPU", "sha_ext": not masked,
        "sha_masked": ":~0x20000000" if masked else None, "writes": "unibus-blob-v2", "sha_piece": MIB, "cpus": 2,
        "python": "3.11.7", "kernel": "Linux", "fs": "a temp dir", "big": big, "runs": 3, "loads": [0.5, 0.7],
        "floors": {str(s): {k: secs(s, v) for k, v in floors.items()} for s in sizes},
        "after": {"version": "0.12.0", "seconds": {str(s): {p: secs(s, v) for p, v in after.items()} for s in sizes},
                  "client_peak_kib": {p: 1024 for p in after}, "daemon_hwm_kib": 2048, "daemon_rss_before_kib": 1024},
        "before": None,
    }


def test_a_masked_run_is_judged_against_the_sha_floor_in_a_section_of_its_own(tmp_path):
    import json

    out = tmp_path / "benchmarks.md"
    kept = tmp_path / "kept.json"
    kept.write_text(json.dumps(_data(masked=False)))
    assert run("--render", str(kept), "--out", str(out), mask=None).returncode == 0
    kept.write_text(json.dumps(_data(masked=True)))
    proc = run("--render", str(kept), "--out", str(out), mask=None)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    plain = text[text.index("<!-- bench:blobs:start -->"):text.index("<!-- bench:blobs:end -->")]
    masked = text[text.index("<!-- bench:blobs-no-sha:start -->"):text.index("<!-- bench:blobs-no-sha:end -->")]
    assert "SHA extensions **yes**" in plain and "**50% of copy+fsync**" in plain
    assert "SHA extensions **no: masked**" in masked and "OPENSSL_ia32cap=:~0x20000000" in masked
    assert "**80% of SHA-256**" in masked and "### Without SHA extensions: 256 MiB" in masked
    # get 330 of a 400 MB/s floor is 82%, put 120 is 30%: the aim needs both
    assert "put 30% and get 82% of one-core SHA-256 (aim 80%): **not met**." in masked
    assert "half the one-core SHA-256 rate, 200 MB/s, 50% of one-core SHA-256 (under the aim of 80%)" in masked


def test_the_mask_is_refused_where_it_would_mean_nothing():
    """On a CPU without SHA extensions the plain run already measures that aim (and writes the
    main section); on arm the mask is another variable, which replaces the whole word."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import bench_blobs
    finally:
        sys.path.remove(str(REPO / "bench"))
    problem = bench_blobs._sha_mask_problem
    assert problem(True, None, "x86_64", True) is None
    assert problem(True, bench_blobs.NO_SHA_MASK, "x86_64", True) is None
    assert "has no SHA extensions" in problem(True, None, "x86_64", False)
    assert "only x86 has (this is aarch64)" in problem(True, None, "aarch64", True)
    assert problem(False, None, "aarch64", True) is None
