"""An earlier release of unibus, ready to run next to this code: the "before" of a before/after benchmark.

``prepare(ref)`` returns the python of a virtualenv in which the repository at
``ref`` (a tag such as ``v0.11.0``, a branch or a commit) is installed, so a
bench script can start that version's ``membershipd`` with
``[python, "-m", "unibus.cli", ...]``. It builds, under
``bench/.baselines/<ref>/`` (git-ignored):

* ``src/``: a detached ``git worktree`` of this repository at ``ref``
  (the checkout the bench runs from is never touched: the new tree is
  registered with git, nothing else changes);
* ``venv/``: a virtualenv made with this interpreter, holding
  ``pip install -e src`` (pip's own cache and configured index, as
  ``make install`` uses them);
* ``ready.json``: the commit it was built from (a release tag missing from
  the checkout names the last commit whose ``pyproject.toml`` has that
  version: see :func:`resolve`). A later ``prepare`` of the same
  ref reuses everything while ``ref`` still names that commit, and rebuilds
  when it moved.

Concurrent ``prepare`` calls of one ref wait for each other (a lock file).

Command line (standard library only, so any python 3.11 runs it)::

    python bench/baseline.py prepare v0.11.0   # build or reuse; prints the python
    python bench/baseline.py list              # what is cached
    python bench/baseline.py clean [REF]       # remove one baseline, or all of them

``clean`` (also ``make bench-clean``) unregisters the worktree
(``git worktree remove --force``) and deletes the directory; deleting
``bench/.baselines`` by hand is fine too, followed by ``git worktree prune``
to forget the stale registration.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINES = REPO / "bench" / ".baselines"
_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,99}$")
PIP_TIMEOUT = 1800.0


class BaselineError(RuntimeError):
    """A baseline that cannot be built; the message says which step failed and why."""


class BadRef(BaselineError):
    """A ref that is malformed or names no commit of this repository."""


def _run(argv: Sequence[str], what: str, timeout: float = 300.0, cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, cwd=cwd,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BaselineError(f"{what}: no answer within {timeout:.0f} s") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise BaselineError(f"{what} failed (exit {proc.returncode}): " + " / ".join(tail))
    return proc.stdout


def _git(*args: str, what: str) -> str:
    return _run(["git", "-C", str(REPO), *args], what).strip()


def _dirname(ref: str) -> str:
    if not _REF.match(ref) or ".." in ref:
        raise BadRef(f"{ref!r} is not a ref this script accepts; use a tag, branch or commit name")
    return ref.replace("/", "_")


_RELEASE_TAG = re.compile(r"^v(\d+\.\d+\.\d+)$")


def resolve(ref: str, repo: Path = REPO, *, log: Callable[[str], None] | None = None) -> str:
    """The commit ``ref`` names in the repository ``repo``.

    A release tag (``v0.11.0``) that this checkout lacks (a copy made
    without its tags, or a clone of a mirror that never had them) names the
    last commit of HEAD's history whose ``pyproject.toml`` says that version:
    the commit just before the one that changed it. So ``make bench`` measures
    against the same release on a clean checkout as on one with tags.
    """
    _dirname(ref)
    try:
        return _run(["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
                    f"git rev-parse {ref}").strip()
    except BaselineError:
        release = _RELEASE_TAG.match(ref)
        found = _release_commit(release.group(1), repo) if release else None
        if release is None or found is None:
            raise BadRef(f"{ref}: no such tag, branch or commit in {repo} (git fetch --tags?)") from None
        if log is not None:
            log(f"baseline {ref}: no such tag here; using {found[:12]}, the last commit whose pyproject.toml "
                f"says {release.group(1)}")
        return found


def _release_commit(version: str, repo: Path) -> str | None:
    """The newest commit of HEAD's history whose pyproject.toml has ``version = "<version>"``, or None."""
    line = f'version = "{version}"'

    def has_it(commit: str) -> bool:
        try:
            text = _run(["git", "-C", str(repo), "show", f"{commit}:pyproject.toml"], f"git show {commit}")
        except BaselineError:
            return False
        return any(x.strip() == line for x in text.splitlines())

    # the commits that added or removed the line, newest first; the newest is where it last changed
    changed = _run(["git", "-C", str(repo), "log", "--format=%H", "-S", line, "HEAD", "--", "pyproject.toml"],
                   f"git log -S '{line}'").split()
    if not changed:
        return None
    newest = changed[0]
    if has_it(newest):  # added there and never removed since: HEAD is still that version
        return _run(["git", "-C", str(repo), "rev-parse", "HEAD"], "git rev-parse HEAD").strip()
    parent = _run(["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", f"{newest}^"],
                  f"git rev-parse {newest}^").strip()
    return parent if has_it(parent) else None


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _venv_python(root: Path) -> Path:
    return root / "venv" / "bin" / "python"


def _remove_worktree(src: Path) -> None:
    if (src / ".git").exists():
        with contextlib.suppress(BaselineError):
            _git("worktree", "remove", "--force", str(src), what=f"git worktree remove {src}")
    shutil.rmtree(src, ignore_errors=True)
    _git("worktree", "prune", what="git worktree prune")


def prepare(ref: str, *, log: Callable[[str], None] | None = None) -> Path:
    """The python of a virtualenv running unibus at ``ref``; built under ``bench/.baselines/<ref>/`` or reused."""
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    commit = resolve(ref, log=say)
    root = BASELINES / _dirname(ref)
    with _locked(root):
        stamp = root / "ready.json"
        python = _venv_python(root)
        with contextlib.suppress(OSError, ValueError):
            if json.loads(stamp.read_text()).get("commit") == commit and python.exists():
                return python
        say(f"baseline {ref}: building in {root} (git worktree at {commit[:12]}, venv, pip install -e)")
        stamp.unlink(missing_ok=True)
        src = root / "src"
        _remove_worktree(src)
        _git("worktree", "add", "--detach", str(src), commit, what=f"git worktree add {src} {ref}")
        shutil.rmtree(root / "venv", ignore_errors=True)
        _run([sys.executable, "-m", "venv", str(root / "venv")], "python -m venv")
        _run([str(python), "-m", "pip", "install", "--quiet", "-e", str(src)], f"pip install -e {src}",
             timeout=PIP_TIMEOUT)
        version = _run([str(python), "-c", "import unibus; print(unibus.__version__)"],
                       f"import unibus from the {ref} venv").strip()
        release = _RELEASE_TAG.match(ref)
        if release and version != release.group(1):
            raise BaselineError(f"{ref} at {commit[:12]} is unibus {version}, not {release.group(1)}")
        stamp.write_text(json.dumps({"ref": ref, "commit": commit, "version": version}) + "\n")
        say(f"baseline {ref}: unibus {version} ready ({python})")
        return python


def cached() -> list[dict[str, str]]:
    """What ``bench/.baselines`` holds: one dict per built baseline (ref, commit, version, dir)."""
    out = []
    for stamp in sorted(BASELINES.glob("*/ready.json")):
        with contextlib.suppress(OSError, ValueError):
            out.append({**json.loads(stamp.read_text()), "dir": str(stamp.parent)})
    return out


def clean(ref: str | None = None) -> list[Path]:
    """Remove one baseline (its worktree registration and its directory), or every one; the paths removed."""
    if ref is not None:
        roots = [BASELINES / _dirname(ref)]
    else:
        roots = [p for p in BASELINES.iterdir() if p.is_dir()] if BASELINES.is_dir() else []
    removed = []
    for root in roots:
        if not root.exists():
            continue
        with _locked(root):
            _remove_worktree(root / "src")
            shutil.rmtree(root, ignore_errors=True)
        (root.parent / f".{root.name}.lock").unlink(missing_ok=True)
        removed.append(root)
    if ref is None and BASELINES.is_dir():
        shutil.rmtree(BASELINES, ignore_errors=True)
    _git("worktree", "prune", what="git worktree prune")
    return removed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare", help="build or reuse a baseline; print its python").add_argument("ref")
    sub.add_parser("list", help="the cached baselines")
    sub.add_parser("clean", help="remove one cached baseline, or all").add_argument("ref", nargs="?")
    ns = parser.parse_args(argv)
    try:
        if ns.cmd == "prepare":
            print(prepare(ns.ref))
        elif ns.cmd == "list":
            for b in cached():
                print(f"{b.get('ref')}\t{b.get('version')}\t{b.get('commit', '')[:12]}\t{b['dir']}")
        else:
            for root in clean(ns.ref):
                print(f"removed {root}")
    except BaselineError as e:
        print(f"baseline.py: {e}", file=sys.stderr)
        return 2 if isinstance(e, BadRef) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
