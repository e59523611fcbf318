"""Provenance: which code and which machine produced a result.

A result is trusted only if the code that made it can be named. `code_state()` reads the git
commit and a hash of every uncommitted change to the code (tracked diffs and untracked files
under src/, bench/ — results excluded —, configs/ and pyproject.toml), so "commit abc1234" means
exactly that tree and "abc1234+uncommitted" names which diff. Benchmarks take it when they start
and again when they write (`bench.common`): a run that began on other code than it ended on says so.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

#: the paths a result depends on (git pathspecs, relative to the repository's top)
CODE_PATHS = (":(top)src", ":(top)bench", ":(top)configs", ":(top)pyproject.toml",
              ":(top,exclude)bench/results", ":(top,exclude)bench/out")
_HERE = Path(__file__).parent


def code_state(where: Path = _HERE) -> dict | None:
    """{commit, dirty, diff, date} of the checkout holding `where` (default: this package's): the HEAD
    commit (short), whether the code differs from it, and the sha256 (16 hex) of that difference
    (None when clean); None outside a git checkout."""
    def _git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=where, capture_output=True, timeout=30)

    try:
        head = _git("rev-parse", "--short=7", "HEAD")
        if head.returncode or not head.stdout.strip():
            return None
        diff = _git("diff", "HEAD", "--binary", "--", *CODE_PATHS).stdout
        untracked = _git("ls-files", "--others", "--exclude-standard", "--full-name", "-z", "--", *CODE_PATHS).stdout
        top = Path(_git("rev-parse", "--show-toplevel").stdout.decode().strip())
    except (OSError, subprocess.SubprocessError):
        return None
    h = hashlib.sha256(diff)
    for name in sorted(n for n in untracked.split(b"\0") if n):
        h.update(b"\0untracked\0" + name + b"\0")
        h.update((top / name.decode()).read_bytes())
    dirty = bool(diff or untracked)
    return {"commit": head.stdout.decode().strip(), "dirty": dirty, "diff": h.hexdigest()[:16] if dirty else None,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def label(state: dict | None) -> str | None:
    """'abc1234', or 'abc1234+uncommitted' when the code differed from the commit."""
    if not state:
        return None
    return state["commit"] + ("+uncommitted" if state["dirty"] else "")


def environment() -> dict:
    """The commit (at the time of the call) and the machine a result was produced on."""
    return {
        "commit": label(code_state()), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(), "processor": platform.processor(), "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def span(start: dict | None, end: dict | None) -> dict:
    """The provenance of work that began at `start` and ended at `end` (two code_state()s)."""
    same = bool(start and end) and all(start.get(k) == end.get(k) for k in ("commit", "dirty", "diff"))
    return {"start": start, "end": end, "code_changed_during_run": not same}
