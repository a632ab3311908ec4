"""docs/benchmarks.md: every bench script owns one section between markers.

``write_section(path, name, heading, body)`` replaces the text between
``<!-- bench:NAME:start -->`` and ``<!-- bench:NAME:end -->`` (or appends the
section), leaving every other section as it is. ``section(name, heading, body)``
is that text, for a section nested in another one's body.
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


def section(name: str, heading: str, body: str) -> str:
    """The text of section ``name``, markers included: what ``write_section`` puts in the file.

    A script may nest one section inside another's body (a part it can rerun alone).
    """
    return f"<!-- bench:{name}:start -->\n{heading}\n\n{body}<!-- bench:{name}:end -->\n"


def write_section(path: Path, name: str, heading: str, body: str) -> None:
    start_mark, end_mark = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    section_text = section(name, heading, body)
    text = path.read_text() if path.exists() else INTRO
    start, end = text.find(start_mark), text.find(end_mark)
    if start != -1 and end != -1 and end > start:
        text = text[:start] + section_text + text[end + len(end_mark):].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section_text
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
