"""Audit the provenance of result files written before start stamps existed.

    python -m bench.audit            # annotate every such file in bench/results/ (and archive/)
    python -m bench.audit --check    # write nothing; exit 1 if an annotation is missing or out of date

Such a file records only the commit seen when its runs *ended* (`env.commit`), which is wrong for a run
started on other code. Against the git history this finds, for each file:
- runs whose start (`env.date` − `wall_s`) precedes the commit they are stamped with (they ran on older,
  possibly uncommitted code);
- stamps that say the code was uncommitted;
- config keys the stamped commit's `src/sidrec/config.py` does not know (the run used later code);
- seen-excluded rankings made before "seen" meant the whole history (only the model's window was removed).
The findings go into the file as `provenance_audit`; `bench.tables` prints them in every source line of
the file. Files with start and end stamps (`provenance`) need no audit and are left alone.
"""

from __future__ import annotations

import argparse
import calendar
import functools
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.common import RESULTS, ROOT
from sidrec import io


def _git(*args: str) -> str | None:
    r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else None


@functools.lru_cache(maxsize=None)
def commit_time(commit: str) -> int | None:
    out = _git("show", "-s", "--format=%ct", commit.split("+")[0])
    return int(out.strip()) if out else None


def _epoch(date: str) -> int:
    return calendar.timegm(time.strptime(date, "%Y-%m-%d %H:%M:%S"))  # stamps are the machines' UTC time


def _leaf_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += _leaf_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]
    return out


@functools.lru_cache(maxsize=None)
def _known(commit: str, name: str) -> bool:
    """Whether the word `name` occurs anywhere in the commit's src/ (a config key its code reads)."""
    return subprocess.run(["git", "grep", "-q", "-w", "-F", name, commit, "--", "src"], cwd=ROOT).returncode == 0


def findings(r: dict) -> list[str]:
    """What the git history says about a result's end-of-run stamps."""
    out = []
    runs = r.get("runs") if isinstance(r.get("runs"), dict) and r.get("summary") else {}
    for model, recs in runs.items():
        for rec in recs:
            env = rec.get("env") or {}
            if not env.get("commit"):
                continue
            if env["commit"].endswith("+uncommitted"):
                out.append(f"{model} seed {rec['seed']} ran on uncommitted code ({env['commit']})")
                continue
            made, start = commit_time(env["commit"]), _epoch(env["date"]) - float(rec.get("wall_s") or 0)
            if made is not None and start < made:
                out.append(f"{model} seed {rec['seed']} started {time.strftime('%H:%M:%S', time.gmtime(start))}, "
                           f"before {env['commit']} existed ({time.strftime('%H:%M:%S', time.gmtime(made))})")
    commit = (r.get("env") or {}).get("commit") or ""
    if commit.endswith("+uncommitted"):
        out.append(f"written from uncommitted code ({commit})")
    base = commit.split("+")[0]
    if base and isinstance(r.get("config"), dict) and commit_time(base) is not None:
        keys = _leaf_keys({s: v for s, v in r["config"].items() if isinstance(v, dict)})
        unknown = [k for k in keys if not _known(base, k.rsplit(".", 1)[-1])]
        if unknown:
            out.append(f"its config uses keys {base} does not know ({', '.join(unknown)}): it ran on later code")
    if base and _seen_rankings(r) and commit_time(base) is not None and not _known(base, "seen_items"):
        window = ((r.get("config") or {}).get("model") or {}).get("backbone", {}).get("max_len", "max_len")
        out.append(f"its seen-excluded rankings removed only the last {window} history items (the history window; "
                   "seen means the whole history from 034ad51 on)")
    return out


def _seen_rankings(r: dict) -> bool:
    """Whether the file reports rankings with seen items excluded (the rule changed in 034ad51)."""
    return "seen_excluded" in json.dumps(r.get("summary") or {})


def verdict(found: list[str]) -> list[str]:
    """The findings in a few words each, for source lines."""
    kinds = (("uncommitted", "ran on uncommitted code"), ("before", "runs started before that commit"),
             ("later code", "ran on later code"), ("history window", "seen = history window"))
    return [short for key, short in kinds if any(key in f for f in found)]


def legacy_files() -> list[Path]:
    return [p for p in sorted([*RESULTS.glob("*.json"), *(RESULTS / "archive").glob("*.json")])
            if "provenance" not in json.loads(p.read_text())]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.audit", description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if an annotation is out of date")
    a = ap.parse_args(argv)
    if _git("rev-parse", "HEAD") is None:
        print("bench.audit: error: needs the git history of the repository", file=sys.stderr)
        return 2
    stale = []
    for path in legacy_files():
        r = json.loads(path.read_text())
        found = findings(r)
        want = {"findings": found, "verdict": verdict(found),
                "method": "bench.audit: end-of-run stamps against the git history"}
        if r.get("provenance_audit") != want:
            stale.append(path)
            if not a.check:
                io.write_json(path, {**r, "provenance_audit": want})
            print(f"{'differs' if a.check else 'annotated'}: {path.relative_to(ROOT)}: {want['findings'] or 'no finding'}")
    return 1 if a.check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
