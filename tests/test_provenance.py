"""Provenance: commit and diff stamps taken at the start and end of a benchmark, the refusal to write
headline results from uncommitted code, source lines that say what the stamps say, and the audit of
result files written before start stamps existed."""

import argparse
import subprocess

import pytest

from bench import audit, common, tables
from sidrec.provenance import code_state, span


def _git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "src" / "m.py").write_text("x = 1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "c")
    return tmp_path


def test_code_state_names_the_commit_and_hashes_every_code_change(repo):
    clean = code_state(repo)
    assert clean["commit"] and not clean["dirty"] and clean["diff"] is None
    (repo / "bench" / "results" / "r.json").write_text("{}")  # results are not code
    assert not code_state(repo)["dirty"]
    (repo / "src" / "m.py").write_text("x = 2\n")
    edited = code_state(repo)
    assert edited["dirty"] and edited["commit"] == clean["commit"] and len(edited["diff"]) == 16
    (repo / "src" / "new.py").write_text("y = 1\n")  # an untracked module changes the hash
    untracked = code_state(repo)
    assert untracked["diff"] != edited["diff"]
    (repo / "src" / "new.py").write_text("y = 2\n")  # and so does its content
    assert code_state(repo)["diff"] != untracked["diff"]
    assert span(clean, clean)["code_changed_during_run"] is False
    assert span(clean, edited)["code_changed_during_run"] is True



def test_code_state_outside_a_checkout_is_none(tmp_path_factory):
    assert code_state(tmp_path_factory.mktemp("not-a-repo")) is None


def test_results_from_a_dirty_tree_are_refused_unless_allowed(monkeypatch, tmp_path, capsys):
    dirty = {"commit": "abc1234", "dirty": True, "diff": "0123456789abcdef", "date": "2026-12-02 00:00:00"}
    monkeypatch.setattr(common, "code_state", lambda: dirty)

    def parse(*argv):
        ap = argparse.ArgumentParser(prog="bench.x")
        ap.add_argument("--results-dir", default=str(common.RESULTS))
        return common.parse_args(ap, list(argv))

    with pytest.raises(SystemExit) as e:
        parse()
    assert e.value.code == 2 and "uncommitted changes (diff 0123456789abcdef)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse("--results-dir", str(common.ARCHIVE))  # the archive is part of bench/results
    assert parse("--allow-dirty").allow_dirty
    assert parse("--results-dir", str(tmp_path))  # anywhere else: allowed, and stamped
    out = common.write_result("x", {"a": 1}, tmp_path)
    r = __import__("json").loads(out.read_text())
    assert r["provenance"]["start"] == dirty and r["provenance"]["end"] == dirty
    assert "uncommitted changes (diff 0123456789abcdef)" in tables.code(r)


def test_source_lines_say_what_the_stamps_say():
    a = {"commit": "aaaaaaa", "dirty": False, "diff": None, "date": "d"}
    b = {"commit": "bbbbbbb", "dirty": False, "diff": None, "date": "d"}
    assert tables.code({"provenance": span(a, a)}) == "commit `aaaaaaa`"
    assert "the code changed while it ran" in tables.code({"provenance": span(a, b)})
    runs = {"summary": {"m": {}}, "provenance": span(b, b),
            "runs": {"m": [{"provenance": span(a, a)}, {"provenance": None}]}}
    assert tables.code(runs) == "commits `bbbbbbb`, `aaaaaaa`; some runs reused from before start stamps"
    legacy = {"env": {"commit": "ccccccc"}, "provenance_audit": {"verdict": ["ran on uncommitted code"]}}
    assert tables.code(legacy) == "commit `ccccccc`, end-of-run stamp (audit: ran on uncommitted code)"


def test_audit_finds_runs_started_before_their_commit():
    try:
        head = subprocess.run(["git", "log", "-1", "--format=%h %ct"], cwd=common.ROOT, capture_output=True,
                              text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs the git history")
    import time

    before = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(int(head[1]) + 100))
    r = {"summary": {"ar": {}}, "runs": {"ar": [{"seed": 0, "wall_s": 200, "env": {"commit": head[0], "date": before}},
                                               {"seed": 1, "wall_s": 50, "env": {"commit": head[0], "date": before}}]}}
    found = audit.findings(r)
    assert len(found) == 1 and found[0].startswith("ar seed 0 started") and audit.verdict(found) == [
        "runs started before that commit"]


def test_committed_legacy_results_carry_an_up_to_date_audit():
    if subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=common.ROOT, capture_output=True,
                      text=True).stdout.strip() != "false":
        pytest.skip("needs the full git history")
    assert audit.main(["--check"]) == 0


def test_audit_labels_seen_rankings_made_before_seen_meant_the_whole_history():
    if subprocess.run(["git", "cat-file", "-e", "5d49d97^{commit}"], cwd=common.ROOT).returncode != 0:
        pytest.skip("needs the git history")
    r = {"env": {"commit": "5d49d97"}, "summary": {"ar": {"exact_seen_excluded": {}}},
         "config": {"model": {"backbone": {"max_len": 50}}}}
    found = audit.findings(r)
    assert any("last 50 history items" in f for f in found) and "seen = history window" in audit.verdict(found)
    r["summary"] = {"ar": {"exact": {}}}  # no seen-excluded ranking: nothing to label
    assert audit.findings(r) == []
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=common.ROOT, capture_output=True,
                          text=True).stdout.strip()
    assert audit.findings({**r, "env": {"commit": head}, "summary": {"ar": {"exact_seen_excluded": {}}}}) == []
