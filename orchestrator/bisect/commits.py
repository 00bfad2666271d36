"""The commits `bench bisect` walks, read from a git repository: resolve, list good..bad, archive.

The list is bad's first-parent chain back to good when good lies on it (every commit a descendant of
the one before, so "bad from here on" is monotone and a binary search is exact); otherwise every
commit on an ancestry path from good to bad in topological order, which is exact for linear history
only (a warning says so). A commit's tree is `git archive --format=zip`: exactly the tracked files,
which Ray ships as the `working_dir` as they are (a zip is not filtered by .gitignore or Ray's default
excludes, so nothing the engine needs is left out).
"""

from __future__ import annotations

import logging
import re
import subprocess
from pathlib import Path

from worker.errors import UserError

log = logging.getLogger(__name__)

GIT_TIMEOUT_S = 120.0


def git(repo: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, timeout=GIT_TIMEOUT_S,
                              check=False)
    except FileNotFoundError:
        raise UserError("git is not installed: `bench bisect` reads the commits with it") from None
    except subprocess.TimeoutExpired:
        raise UserError(f"--repo {repo}: `git {' '.join(args)}` took over {GIT_TIMEOUT_S:g} s") from None
    if check and done.returncode != 0:
        raise UserError(f"--repo {repo}: `git {' '.join(args)}` failed: {_last_line(done.stderr)}")
    return done


def repo_root(repo: str) -> str:
    """The top of the work tree (or the git dir of a bare repository) at `repo`."""
    if not Path(repo).is_dir():
        raise UserError(f"--repo {repo}: no such directory")
    done = git(repo, "rev-parse", "--show-toplevel", check=False)
    if done.returncode == 0 and done.stdout.strip():
        return done.stdout.strip()
    bare = git(repo, "rev-parse", "--is-bare-repository", check=False)
    if bare.returncode == 0 and bare.stdout.strip() == "true":
        return str(Path(repo).resolve())
    raise UserError(f"--repo {repo}: not a git repository (give the checkout whose history holds the commits)")


def resolve(repo: str, ref: str, what: str) -> str:
    """The full sha of `ref` (a sha, a prefix, a branch or tag) in `repo`."""
    if not re.fullmatch(r"[\w./@^~{}-]+", ref) or ref.startswith("-"):
        raise UserError(f"{what} {ref!r}: not a commit name")
    done = git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False)
    if done.returncode != 0:
        raise UserError(f"{what} {ref}: no such commit in {repo} (fetch it, or point --repo at a clone that has it)")
    return done.stdout.strip()


def between(repo: str, good: str, bad: str) -> list[str]:
    """[good, ..., bad], oldest first: the commits a bisection of good..bad tests."""
    if good == bad:
        raise UserError(f"good and bad are the same commit {good[:12]}: the change is not in the code (a host, "
                        "driver or data change?), so there is nothing to bisect")
    if git(repo, "merge-base", "--is-ancestor", good, bad, check=False).returncode != 0:
        raise UserError(f"good commit {good[:12]} is not an ancestor of bad commit {bad[:12]}: give a --good that "
                        "the bad commit's history contains")
    chain = _lines(git(repo, "rev-list", "--first-parent", "--reverse", f"{good}..{bad}").stdout)
    if chain and _first_parent(repo, chain[0]) == good:
        return [good, *chain]
    path = _lines(git(repo, "rev-list", "--ancestry-path", "--topo-order", "--reverse", f"{good}..{bad}").stdout)
    log.warning("good %s is not on bad's first-parent chain: bisecting %d commits of the ancestry paths in "
                "topological order (exact for linear history only)", good[:12], len(path))
    return [good, *path]


def subjects(repo: str, commits: list[str]) -> dict[str, str]:
    """sha → the first line of its message."""
    out = git(repo, "log", "--no-walk=unsorted", "--format=%H %s", *commits).stdout
    return dict(line.split(" ", 1) if " " in line else (line, "") for line in _lines(out))


def archive(repo: str, commit: str, out_dir: Path) -> Path:
    """The tracked files of `commit` as a zip in `out_dir` (what Ray ships as the working_dir)."""
    path = out_dir / f"{commit}.zip"
    if not path.is_file():
        git(repo, "archive", "--format=zip", "-o", str(path), commit)
    return path


def _first_parent(repo: str, commit: str) -> str | None:
    parents = git(repo, "rev-list", "--parents", "-n", "1", commit).stdout.split()
    return parents[1] if len(parents) > 1 else None


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _last_line(text: str) -> str:
    lines = _lines(text)
    return lines[-1].strip() if lines else "no output"
