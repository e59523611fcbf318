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
    runs = {name: [{"seed": 0, "env": {"cuda": None}}] for name in summary}
    return {"env": {"commit": "abc1234", "cuda": None, "cpu_count": 2, "torch": "2.0", "date": "2026-01-01 00:00"},
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
