"""docs/benchmarks.md: every bench script owns one section between markers.

``write_section(path, name, heading, body)`` replaces the text between
``<!-- bench:NAME:start -->`` and ``<!-- bench:NAME:end -->`` (or appends the
section), leaving every other section as it is.
"""

from __future__ import annotations

from pathlib import Path

INTRO = """# Benchmarks

Run them all with `make bench` (each script also runs alone: `.venv/bin/python
bench/bench_NAME.py --help`). Figures are medians of several runs on the
2-core machine CI uses, reported as ratios against a baseline measured in the
same script, because these machines are noisy. Each section below is
rewritten by its own script.
"""


def write_section(path: Path, name: str, heading: str, body: str) -> None:
    start_mark, end_mark = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    section = f"{start_mark}\n{heading}\n\n{body}{end_mark}\n"
    text = path.read_text() if path.exists() else INTRO
    start, end = text.find(start_mark), text.find(end_mark)
    if start != -1 and end != -1 and end > start:
        text = text[:start] + section + text[end + len(end_mark):].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
