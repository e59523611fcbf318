"""bench.tables: every generated table in the docs matches its result JSON, and the renderer itself."""

import json

from bench import tables

METRICS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20", "mrr")


def test_committed_docs_and_results_match_their_json(capsys):
    """The committed README.md, docs/*.md and kept bench/results/*.md are what the JSON renders
    (regenerate with `python -m bench.tables`)."""
    assert tables.main(["--check"]) == 0, capsys.readouterr().err


def quality(seeds: int = 3) -> dict:
    """A small bench.quality result: FV-MLE and AR-NTP on OPQ codes, both protocols."""
    def m(mean):
        return {k: {"mean": mean, "std": 0.001} for k in METRICS}

    summary = {"fv": {"exact_seen_excluded": m(0.05), "valid_exact_seen_excluded": m(0.06), "exact": m(0.04),
                      "valid_exact": m(0.045), "wall_s": 10.0},
               "ar/opq": {"exact_seen_excluded": m(0.045), "beam_seen_excluded": m(0.044),
                          "valid_exact_seen_excluded": m(0.058), "exact": m(0.042), "beam": m(0.041),
                          "valid_exact": m(0.05), "wall_s": 12.0}}
    stamp = {"commit": "abc1234", "dirty": False, "diff": None, "date": "2026-01-01 00:00:00"}
    prov = {"start": stamp, "end": stamp, "code_changed_during_run": False}
    runs = {name: [{"seed": 0, "env": {"cuda": None}, "provenance": prov}] for name in summary}
    return {"env": {"commit": "abc1234", "cuda": None, "cpu_count": 2, "torch": "2.0", "date": "2026-01-01 00:00"},
            "provenance": prov,
            "dataset": "beauty", "users": 10, "items": 20, "seeds": seeds, "wall_seconds_per_seed": [22.0],
            "config": {"tokenizer": {"levels": 3, "codebook_size": 256}, "eval": {"exclude_seen": True}},
            "summary": summary, "runs": runs, "comparisons": {"ar/opq_ndcg10_rel_gap_vs_fv_seen_excluded": -0.1}}


def test_quality_table_renders_rows_gaps_published_rows_and_source(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "ROOT", tmp_path)
    text = tables.quality_table(tmp_path / "quality-beauty.json", quality())
    lines = text.splitlines()
    # the config's protocol first; a result without parallel_levels had 4 OPQ sub-spaces
    assert "| FV-MLE | excluded | 0.0500 ± 0.0010 | 0.0500 ± 0.0010 | — | — | 0.0600 ± 0.0010 |" in lines
    assert "| AR-NTP, OPQ 4×256 | excluded | 0.0450 ± 0.0010 | 0.0450 ± 0.0010 | -10.0% | 0.0440 | " \
           "0.0580 ± 0.0010 |" in lines
    assert lines.index("| FV-MLE | excluded | 0.0500 ± 0.0010 | 0.0500 ± 0.0010 | — | — | 0.0600 ± 0.0010 |") < \
        next(i for i, x in enumerate(lines) if x.startswith("| FV-MLE | kept"))
    assert "| TIGER (published) | — | 0.0648 | 0.0384 | | | |" in lines
    assert lines[-1] == ("Source: `quality-beauty.json`; commit `abc1234`, CPU only, 2 cores, torch 2.0, 2026-01-01. "
                         "Runs trained on: CPU.")
    one = tables.quality_table(tmp_path / "q.json", {**quality(seeds=1), "parallel_levels": 2})
    assert "one seed" in one and "| AR-NTP, OPQ 2×256 | excluded | 0.0450 | 0.0450 | -10.0% |" in one
    legacy = {k: v for k, v in quality().items() if k != "provenance"}  # written before start stamps
    assert "commit `abc1234`, end-of-run stamp, CPU only" in tables.quality_table(tmp_path / "q.json", legacy)
    over = tables.quality_table(tmp_path / "q.json", {**quality(), "overrides": ["train.lr=0.001"]})
    assert over.splitlines()[0].endswith("exact ranking. Config overrides: `train.lr=0.001`.")


def test_regions_and_kept_md_are_rewritten_and_checked(tmp_path, monkeypatch, capsys):
    results = tmp_path / "bench" / "results"
    (results / "archive").mkdir(parents=True)
    (results / "archive" / "quality-beauty.json").write_text(json.dumps(quality()))
    (results / "quality-beauty.json").write_text(json.dumps(quality()))
    (results / "quality-beauty.md").write_text("stale\n")
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- table: quality-beauty -->\nold\n<!-- /table -->\noutro\n")
    monkeypatch.setattr(tables, "ROOT", tmp_path)
    monkeypatch.setattr(tables, "RESULTS", results)
    monkeypatch.setattr(tables, "DOCS", [doc])

    assert tables.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "doc.md: table quality-beauty differs" in err and "quality-beauty.md" in err
    assert doc.read_text().count("old") == 1  # --check writes nothing

    assert tables.main([]) == 0
    assert tables.main(["--check"]) == 0
    text = doc.read_text()
    assert text.startswith("intro\n<!-- table: quality-beauty -->\nTest split")
    assert text.endswith("<!-- /table -->\noutro\n")
    assert (results / "quality-beauty.md").read_text() == tables.quality_markdown(quality())

    doc.write_text("<!-- table: quality-nowhere -->\n<!-- /table -->\n")  # a region naming no result file
    assert tables.main(["--check"]) == 2
    assert "quality-nowhere" in capsys.readouterr().err


def joint(tok: str = "opq") -> dict:
    """A small bench.quality result of the joint head: exact mixture, beam widths, the test mix curve."""
    def m(mean, ms=None):
        out = {k: {"mean": mean, "std": 0.001} for k in METRICS}
        return {**out, "ms_per_user": {"mean": ms, "std": 0.0}} if ms else out

    curve = [{"mix": x / 10, "recall@10": 0.04 + x / 1000, "ndcg@10": 0.04 + x / 1000} for x in range(11)]
    summary = {f"joint/{tok}": {"exact_seen_excluded": m(0.05, 0.5), "beam_seen_excluded": m(0.045, 0.3),
                                "beam100_seen_excluded": m(0.0499, 1.5), "test_mix_curve_seen_excluded": curve,
                                "valid_exact_seen_excluded": m(0.06), "valid_beam_seen_excluded": m(0.05),
                                "valid_beam100_seen_excluded": m(0.0595)}}
    r = quality()
    return {**r, "summary": summary, "parallel_levels": 4,
            "runs": {f"joint/{tok}": [{"seed": s, "mix": 0.6, "env": None} for s in range(3)]}}


def test_joint_table_any_tokenizer_with_the_matched_sasrec_row(tmp_path, monkeypatch):
    """The joint table names its codebook, gives each beam's gap to the exact mixture, the ends of the
    test curve (each head alone), and the SASRec+SS recipe trained by sidrec when its result exists."""
    monkeypatch.setattr(tables, "ROOT", tmp_path)
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    lines = tables.joint_table(tmp_path / "quality-beauty-joint-opq.json", joint()).splitlines()
    assert "AR-NTP + FV rescoring (joint), OPQ 4×256: one model" in lines[0] and "(0.6, 0.6, 0.6)" in lines[0]
    assert "| exact mixture over all items | 0.0500 ± 0.0010 | 0.0500 ± 0.0010 | — | 0.500 | 0.0600 ± 0.0010 |" in lines
    # beam 20 is 17% below the exact mixture on validation, beam 100 within 1%: beam 100 is served
    assert "| AR beam 20 + FV rescoring | 0.0450 ± 0.0010 | 0.0450 ± 0.0010 | -10.0% | 0.300 | 0.0500 ± 0.0010 |" in lines
    assert "| AR beam 100 + FV rescoring (served) | 0.0499 ± 0.0010 | 0.0499 ± 0.0010 | -0.2% | 1.500 | " \
           "0.0595 ± 0.0010 |" in lines
    assert "| its AR-NTP head alone (exact) | 0.0400 | 0.0400 | -20.0% | | |" in lines
    assert "| its FV-MLE head alone (exact) | 0.0500 | 0.0500 | +0.0% | | |" in lines
    assert not any("trained by sidrec" in x for x in lines)
    matched = quality()
    matched["summary"] = {"fv": matched["summary"]["fv"]}
    (tmp_path / "quality-beauty-sasrec-ss.json").write_text(json.dumps(matched))
    lines = tables.joint_table(tmp_path / "quality-beauty-joint-opq.json", joint()).splitlines()
    assert "| SASRec+SS recipe, trained by sidrec (3 seeds) | 0.0500 | 0.0500 | | | 0.0600 |" in lines


def test_the_served_beam_is_chosen_on_validation_never_on_test():
    """The narrowest width within 1% of the exact mixture on validation; test figures play no part, and a
    result without validation beams says that no width was chosen on it."""
    def m(x):
        return {"ndcg@10": {"mean": x, "std": 0.0}}

    s = {"valid_exact": m(0.100), "valid_beam": m(0.095), "valid_beam50": m(0.0992), "valid_beam100": m(0.0999),
         "beam": m(0.2), "exact": m(0.1)}  # test says beam 20: ignored
    assert tables.served_beam(s, "") == ("beam50", True)
    assert tables.served_beam({**s, "valid_beam50": m(0.098)}, "") == ("beam100", True)
    assert tables.served_beam({"exact": m(0.1), "beam100": m(0.1)}, "") == ("beam100", False)
