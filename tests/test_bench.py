"""The benchmarks' plumbing, end to end on tiny slices (the real runs are one command each)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import SHARED

ROOT = Path(__file__).resolve().parents[1]
#: The benchmarks read the real Beauty file (configs/beauty.yaml -> ../shared/data): without it they skip.
_skip = pytest.mark.skipif(not (SHARED / "amazon-beauty/s3rec/Beauty.txt").exists() or
                           not (ROOT.parent / "shared/data/amazon-beauty/s3rec/Beauty.txt").exists(),
                           reason="shared dataset missing: amazon-beauty (../shared/data)")


def needs_beauty(test):
    return pytest.mark.shared(_skip(test))


def _run(args, tmp_path):
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@needs_beauty
@pytest.mark.slow
def test_quality_bench_tiny_slice(tmp_path):
    _run(["bench.quality", "--dataset", "beauty", "--seeds", "1", "--max-users", "400", "--tokenizers", "rq-kmeans",
          "--set", "train.epochs=1", "tokenizer.embeddings=collab", "tokenizer.codebook_size=16",
          "--out-root", str(tmp_path / "out"), "--results-dir", str(tmp_path)], tmp_path)
    r = json.loads((tmp_path / "quality-beauty.json").read_text())
    assert set(r["summary"]) == {"fv", "ar/rq-kmeans", "parallel/rq-kmeans"}
    ar = r["summary"]["ar/rq-kmeans"]
    assert {"exact", "beam", "valid_exact", "exact_seen_excluded", "beam_seen_excluded"} <= set(ar)
    assert r["env"]["commit"] is not None
    for recs in r["runs"].values():  # every run carries the stamps of the code it started and ended on
        assert all(rec["provenance"]["start"]["commit"] and rec["provenance"]["end"] for rec in recs)
    assert r["provenance"]["start"] and r["provenance"]["end"]
    md = (tmp_path / "quality-beauty.md").read_text()
    assert "AR-NTP / rq-kmeans" in md and "exact, seen excluded" in md
    # a finished run is reused only with the identical config; --name writes its own results file
    weights = tmp_path / "out/quality-beauty/seed0/ar-rq-kmeans/model.safetensors"
    stamp = weights.stat().st_mtime_ns
    base = ["bench.quality", "--dataset", "beauty", "--seeds", "1", "--max-users", "400", "--tokenizers", "rq-kmeans",
            "--heads", "ar", "--out-root", str(tmp_path / "out"), "--results-dir", str(tmp_path)]
    _run([*base, "--name", "again", "--set", "train.epochs=1", "tokenizer.embeddings=collab",
          "tokenizer.codebook_size=16"], tmp_path)
    again = json.loads((tmp_path / "quality-beauty-again.json").read_text())
    assert weights.stat().st_mtime_ns == stamp
    assert again["runs"]["ar/rq-kmeans"][0]["wall_s"] == r["runs"]["ar/rq-kmeans"][0]["wall_s"]
    # FV-MLE on item IDs does not read the codebook: a call naming another tokenizer reuses its run
    fv = tmp_path / "out/quality-beauty/seed0/fv/model.safetensors"
    fv_stamp = fv.stat().st_mtime_ns
    _run([*base[:-8], "--tokenizers", "opq", "--heads", "fv", *base[-4:], "--name", "fv-opq", "--set",
          "train.epochs=1", "tokenizer.embeddings=collab", "tokenizer.codebook_size=16"], tmp_path)
    assert fv.stat().st_mtime_ns == fv_stamp
    _run([*base, "--name", "changed", "--set", "train.epochs=1", "tokenizer.embeddings=collab",
          "tokenizer.codebook_size=16", "train.lr=0.002"], tmp_path)
    assert weights.stat().st_mtime_ns != stamp
    # an ablation tag keeps its own results file and runs, and refits the codebook it asks for
    _run(["bench.quality", "--dataset", "beauty", "--seeds", "1", "--max-users", "400", "--tokenizers", "rq-kmeans",
          "--heads", "ar", "--tag", "cb20", "--set", "train.epochs=1", "tokenizer.embeddings=collab",
          "tokenizer.codebook_size=20", "--out-root", str(tmp_path / "out"), "--results-dir", str(tmp_path)], tmp_path)
    t = json.loads((tmp_path / "quality-beauty-cb20.json").read_text())
    assert t["tag"] == "cb20" and set(t["summary"]) == {"ar/rq-kmeans"}
    # a joint head: mix chosen on validation, wide beams, the test curve whose ends are AR and FV alone
    joint = [*base[:-6], "--heads", "joint", *base[-4:], "--name", "joint", "--set", "train.epochs=1",
             "tokenizer.embeddings=collab", "tokenizer.codebook_size=16"]
    _run(joint, tmp_path)
    j = json.loads((tmp_path / "quality-beauty-joint.json").read_text())["summary"]["joint/rq-kmeans"]
    assert {"beam50_seen_excluded", "beam100_seen_excluded", "mix"} <= set(j)
    assert [p["mix"] for p in j["test_mix_curve_seen_excluded"]] == [round(0.1 * i, 1) for i in range(11)]
    run = tmp_path / "out/quality-beauty/seed0/joint-rq-kmeans"
    stamp = (run / "model.safetensors").stat().st_mtime_ns
    (run / "joint-mix.json").unlink()  # a run trained before the mix was tuned: tuned, not retrained
    _run(joint, tmp_path)
    assert (run / "joint-mix.json").exists() and (run / "model.safetensors").stat().st_mtime_ns == stamp
    cb = json.loads((tmp_path / "out/quality-beauty/cb20/seed0/ar-rq-kmeans/codebook/codebook.json").read_text())
    assert cb["tokenizer"]["codebook_size"] == 20


@needs_beauty
@pytest.mark.slow
def test_sweep_and_split_seeds(tmp_path):
    """bench.sweep runs its variants side by side and ranks them; --only-seed runs one seed alone and
    a later call without it reuses those runs and aggregates."""
    tiny = ["tokenizer.embeddings=collab", "tokenizer.codebook_size=16", "train.epochs=1"]
    spec = tmp_path / "tiny.yaml"
    spec.write_text(json.dumps({"dataset": "beauty", "max_users": 300, "set": tiny, "variants": [
        {"tag": "a", "heads": "fv,ar"}, {"tag": "b", "heads": "ar", "set": ["model.head_hidden=32"]},
        {"tag": "c", "heads": "ar", "tokenizers": "opq", "parallel_levels": 3}]}))
    out = ["--out-root", str(tmp_path / "out"), "--results-dir", str(tmp_path)]
    _run(["bench.sweep", str(spec), "--jobs", "2", "--threads", "1", *out], tmp_path)
    rows = json.loads((tmp_path / "sweep-tiny.json").read_text())["rows"]
    assert {(r["tag"], r["model"]) for r in rows} == {("a", "fv"), ("a", "ar/rq-kmeans"), ("b", "ar/rq-kmeans"),
                                                    ("c", "ar/opq")}
    assert json.loads((tmp_path / "quality-beauty-c.json").read_text())["parallel_levels"] == 3
    cb = json.loads((tmp_path / "out/quality-beauty/c/seed0/ar-opq/codebook/codebook.json").read_text())
    assert cb["tokenizer"]["method"] == "opq" and cb["tokenizer"]["levels"] == 3
    assert all(0 <= r["valid_ndcg@10"] <= 1 for r in rows)
    assert "| ar/rq-kmeans | b | model.head_hidden=32 |" in (tmp_path / "sweep-tiny.md").read_text()
    q = ["bench.quality", "--dataset", "beauty", "--seeds", "2", "--max-users", "300", "--tokenizers", "rq-kmeans",
         "--heads", "ar", "--set", *tiny, *out]
    _run([*q, "--only-seed", "1"], tmp_path)
    assert not (tmp_path / "quality-beauty.json").exists()  # one seed alone writes no aggregate
    weights = tmp_path / "out/quality-beauty/seed1/ar-rq-kmeans/model.safetensors"
    stamp = weights.stat().st_mtime_ns
    _run(q, tmp_path)
    r = json.loads((tmp_path / "quality-beauty.json").read_text())
    assert r["seeds"] == 2 and weights.stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_scale_bench_smallest_size(tmp_path):
    _run(["bench.scale", "--sizes", "3000", "--repeats", "1", "--out-dir", str(tmp_path)], tmp_path)
    r = json.loads((tmp_path / "scale.json").read_text())
    row = r["rows"][0]
    for kind in ("fv-naive", "fv-streamed", "fv-sampled-uniform-256", "fv-sampled-uniform-4096",
                 "fv-sampled-popularity-4096", "fv-sampled-in-batch", "ar", "ar-token"):
        assert row[f"train_{kind}"]["step_seconds"] > 0, row[f"train_{kind}"]
    assert row["infer_ar"]["beam20_seconds"] > 0 and row["infer_fv"]["exact_seconds"] > 0
    assert row["infer_ar-token"]["beam20_seconds"] > 0
    assert row["train_ar"]["item_table_parameters"] == 3000 * 64 and row["train_ar-token"]["item_table_parameters"] == 0
    assert (tmp_path / "scale.md").exists() and (tmp_path / "scale.png").exists()
    assert (tmp_path / "scale.png").exists() and "| 3,000 |" in (tmp_path / "scale.md").read_text()


@pytest.mark.slow
def test_scale_fit_bench_smallest_size(tmp_path):
    """Fit to a known P* under one budget: every model trains, is scored against the truth, and the
    Bayes-optimal row bounds what any model can reach."""
    _run(["bench.scale_fit", "--sizes", "2000", "--users", "400", "--seeds", "2", "--budget-min", "0.1",
          "--eval-users", "100", "--out-root", str(tmp_path / "out"), "--results-dir", str(tmp_path)], tmp_path)
    row = json.loads((tmp_path / "scale-fit.json").read_text())["rows"][0]
    assert row["n"] == 2000 and row["users"] == 400 and len(row["models"]) == 8  # 4 models x 2 seeds
    for name, s in row["summary"].items():  # selected on validation NLL, every epoch's value kept
        assert s["seeds"] == 2 and s["kl_to_pstar"]["spread"] >= 0, name
    assert all("valid_nll" in c for m in row["models"] for c in m["kl_curve"])
    for m in row["models"]:
        assert m["steps"] > 0 and m["kl_to_pstar"] > 0 and m["kl_curve"], m["model"]
        assert 0 < m["nll"] < 2 * np.log(2000) and 0 <= m["recall@10"] <= 1
    assert "| 2,000 | Bayes-optimal" in (tmp_path / "scale-fit.md").read_text()


def test_scale_fit_bad_sizes_is_exit_2():
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "bench.scale_fit", "--sizes", "1e5"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--sizes" in r.stderr and "Traceback" not in r.stderr


@needs_beauty
def test_popularity_bench(tmp_path):
    _run(["bench.popularity", "--dataset", "beauty", "--out-root", str(tmp_path / "out"),
          "--results-dir", str(tmp_path)], tmp_path)
    r = json.loads((tmp_path / "popularity-beauty.json").read_text())
    assert r["valid"]["n_users"] == 22363 and 0 < r["test"]["recall@10"] < r["valid"]["recall@10"]


@pytest.mark.parametrize("text", ["dataset: beauty\n", "variants: [{heads: ar}]\n", "dataset: [\n"])
def test_sweep_rejects_a_bad_spec(tmp_path, text):
    spec = tmp_path / "bad.yaml"
    spec.write_text(text)
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "bench.sweep", str(spec), "--out-root", str(tmp_path / "out"),
                        "--results-dir", str(tmp_path / "results")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "bad.yaml" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--parallel-levels", "0"], "--parallel-levels must be >= 1"),
    (["--tokenizers", "opq", "--parallel-levels", "1", "--set", "tokenizer.codebook_size=4"], "cannot get distinct IDs"),
    (["--set", "model.no_such_key=1"], "unknown config key"),
])
@needs_beauty
def test_quality_bench_bad_input_is_exit_2(tmp_path, args, message):
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "bench.quality", "--dataset", "beauty", "--seeds", "1", "--max-users", "100",
                        "--heads", "ar", "--out-root", str(tmp_path / "out"), "--results-dir", str(tmp_path), *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_coldstart_bench_tiny_slice(tmp_path):
    """The cold-start protocol end to end on a slice of Beauty: warm data without the cold items,
    every row trained and evaluated, the cold items added with both vector rules."""
    _run(["bench.coldstart", "--max-users", "150", "--set", "train.epochs=1", "tokenizer.codebook_size=16",
          "--out-root", str(tmp_path / "out"), "--results-dir", str(tmp_path)], tmp_path)
    r = json.loads((tmp_path / "coldstart-beauty.json").read_text())
    rows = r["rows"]
    assert len(rows) == 7 and r["cold_items"] == round(0.05 * r["items"])
    for label in ("AR-NTP, collaborative IDs (no ID for a new item)", "FV-MLE (no content path)"):
        assert rows[label]["cold"]["recall@10"] == 0.0  # no catalogue entry: never ranked
    added = rows["AR-NTP, text IDs, cold items added (content vectors)"]
    assert added["catalogue_items"] == r["items"] and added["add_items"]["added"] == r["cold_items"]
    assert added["cold"]["users"] == r["cold_test_users"] and "Content only" in (tmp_path / "coldstart-beauty.md").read_text()
    # the vectors rule is chosen on validation, where every row is measured too
    assert r["cold_valid_users"] == added["valid"]["cold"]["users"]
    best = max(("content", "prefix-mean"), key=lambda k: rows[f"AR-NTP, text IDs, cold items added ({k} vectors)"]
               ["valid"]["overall"]["ndcg@10"])
    assert r["vectors_rule"]["chosen"] == best or rows[f"AR-NTP, text IDs, cold items added ({best} vectors)"][
        "valid"]["overall"]["ndcg@10"] == added["valid"]["overall"]["ndcg@10"]


def test_bench_stages_keep_their_layout(tmp_path):
    """The benchmarks' work directory: prepared data in work/data, a codebook in <its folder>/codebook,
    each reused on the next call (so earlier bench trees stay valid)."""
    from bench.quality import prepared
    from sidrec.config import load_config
    from sidrec.pipeline import ensure_codebook

    cfg = load_config(None, ["data.synthetic.n_items=60", "data.synthetic.n_users=300", "tokenizer.embeddings=latent",
                             "tokenizer.codebook_size=8", "tokenizer.levels=2"])
    data = prepared("synthetic", cfg, tmp_path, None)
    assert Path(data.path) == tmp_path / "data" and (tmp_path / "data" / ".sidrec.json").exists()
    cb = ensure_codebook(cfg, data, tmp_path / "seed0" / "rq-kmeans" / "codebook")
    assert (tmp_path / "seed0" / "rq-kmeans" / "codebook" / "codebook.npz").exists()
    again = prepared("synthetic", cfg, tmp_path, None)
    assert again.n_items == data.n_items
    assert np.array_equal(ensure_codebook(cfg, again, tmp_path / "seed0" / "rq-kmeans" / "codebook").codes, cb.codes)
