"""bench/baseline.py: which commit a "before" ref names, on a real git repository without tags."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_baseline():
    spec = importlib.util.spec_from_file_location("bench_baseline", REPO / "bench" / "baseline.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


baseline = load_baseline()


def git(repo: Path, *args: str) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.invalid", "HOME": str(repo), "PATH": "/usr/bin:/bin"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env, timeout=30).stdout.strip()


def commit(repo: Path, version: str, message: str) -> str:
    (repo / "pyproject.toml").write_text(f'[project]\nname = "unibus"\nversion = "{version}"\n')
    (repo / "notes.txt").write_text(message + "\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def history(tmp_path):
    """0.10.0, two commits of 0.11.0, then 0.12.0 (bumped, then one more commit); no tags."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    commits = {
        "0.10.0": commit(repo, "0.10.0", "ten"),
        "0.11.0-first": commit(repo, "0.11.0", "eleven"),
        "0.11.0-last": commit(repo, "0.11.0", "eleven, fixed"),
        "0.12.0-bump": commit(repo, "0.12.0", "twelve"),
        "0.12.0-head": commit(repo, "0.12.0", "twelve, more"),
    }
    assert git(repo, "tag") == ""
    return repo, commits


def test_a_missing_release_tag_names_the_last_commit_of_that_version(history):
    repo, commits = history
    said = []
    assert baseline.resolve("v0.11.0", repo, log=said.append) == commits["0.11.0-last"]
    assert baseline.resolve("v0.10.0", repo) == commits["0.10.0"]
    assert said == [f"baseline v0.11.0: no such tag here; using {commits['0.11.0-last'][:12]}, the last commit "
                    "whose pyproject.toml says 0.11.0"]


def test_the_version_head_still_has_names_head(history):
    repo, commits = history
    assert baseline.resolve("v0.12.0", repo) == commits["0.12.0-head"]


def test_a_tag_a_branch_or_a_commit_is_taken_as_git_names_it(history):
    repo, commits = history
    git(repo, "tag", "v0.11.0", commits["0.11.0-first"])  # a real tag wins over the version search
    assert baseline.resolve("v0.11.0", repo) == commits["0.11.0-first"]
    assert baseline.resolve(commits["0.10.0"][:10], repo) == commits["0.10.0"]


@pytest.mark.parametrize("ref", ["v0.9.0", "release-0.11", "no-such-branch"])
def test_a_ref_that_names_nothing_says_so(history, ref):
    repo, _ = history
    with pytest.raises(baseline.BadRef, match=f"{ref}: no such tag, branch or commit"):
        baseline.resolve(ref, repo)


def test_a_malformed_ref_is_refused_before_git_sees_it(history):
    repo, _ = history
    with pytest.raises(baseline.BadRef, match="is not a ref this script accepts"):
        baseline.resolve("--upload-pack=x", repo)
