"""Real-data quality: AR-NTP vs FV-MLE vs the parallel head on one backbone, full ranking.

    python -m bench.quality --dataset beauty --seeds 3

Per seed: FV-MLE once (it does not use semantic IDs), then AR-NTP and the parallel head for each
tokenizer (RQ-KMeans with the config's levels, and OPQ with `--parallel-levels` sub-spaces, on the
config's item embeddings). Test metrics with exact ranking (and beam
20 for AR), mean ± std over seeds, wall time, hardware and commit go to
bench/results/quality-<dataset>.json and .md (the .md rendered by bench.tables). Each run also
records the machine that trained it (`env` per run), since runs of one result may be spread over
machines and the file's own `env` is the machine that aggregated them. Hyper-parameters come from
configs/<dataset>.yaml, which were chosen on the validation split only. Headline results stay in
bench/results/; one-off ablations belong in bench/results/archive/ (`--results-dir`).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

from bench import common
from bench.common import RESULTS, ROOT, environment, write_result
from bench.tables import quality_markdown
from sidrec import io
from sidrec.config import load_config, resolve_path
from sidrec.data import SequenceData, prepare, read
from sidrec.errors import UserError
from sidrec import run as rundir
from sidrec.pipeline import (ensure_codebook, ensure_data, evaluate_run, head_config, model_inputs, train_one,
                             MIX_GRID, tune_joint_mix)
from sidrec.evaluate import mix_curve
from sidrec.train.config import pick_device
from sidrec.run import RunDir
from sidrec.run.layout import BENCH

DATASETS = ("beauty", "sports", "yelp", "ml-100k")  # configs/<name>.yaml says where the data is
KEYS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20", "mrr")
WIDE_BEAMS = (50, 100)  # a joint head's extra beam widths
TEST_CURVE = "test-mix-curve.json"  # a joint run's test metrics (seen items excluded) at every mix
io.register_entries("run", {TEST_CURVE})  # the benchmark's own records in a run are sidrec's, not the user's


def prepared(dataset: str, cfg: dict, work: Path, max_users: int | None) -> SequenceData:
    """The dataset as its config describes it; or, for plumbing tests, the first users of its file."""
    out = work / "data"
    if not max_users:
        return ensure_data(cfg, out)
    if (out / "sequences.npz").exists():
        return SequenceData.load(out)
    d = cfg["data"]
    if d["format"] != "seq":
        print("--max-users slices sequence files only (beauty, sports, yelp)", file=sys.stderr)
        raise SystemExit(2)
    lines = Path(resolve_path(cfg, d["path"])).read_text().splitlines()[:max_users]
    src = work / "slice.txt"
    io.write_text(src, "\n".join(lines) + "\n")
    prepare(read("seq", src, resolve_path(cfg, d["meta"])), kcore_k=0).save(out)
    return SequenceData.load(out)


def run(dataset: str, seeds: int, tokenizers: list[str], heads: list[str], overrides: list[str],
        max_users: int | None, out_root: Path, results_dir: Path, tag: str = "", name: str = "",
        only_seed: int | None = None, parallel_levels: int = 4) -> dict:
    work = out_root / f"quality-{dataset}"  # the prepared data (and its embedding cache) is shared by every tag
    runs_root = work / tag if tag else work
    name_out = f"quality-{dataset}" + (f"-{name or tag}" if name or tag else "")
    base = load_config(ROOT / "configs" / f"{dataset}.yaml", overrides)
    data = prepared(dataset, base, work, max_users)
    rows: dict[str, list[dict]] = {}
    walls = []
    for seed in range(seeds) if only_seed is None else [only_seed]:
        seed_wall = 0.0  # the runs' own wall times: also right when runs were made apart or in parallel
        for tok in tokenizers:
            cfg = copy.deepcopy(base)
            cfg["tokenizer"]["method"] = tok
            cfg["tokenizer"]["levels"] = parallel_levels if tok in ("pq", "opq") else cfg["tokenizer"]["levels"]
            cfg["tokenizer"]["seed"] = seed
            cfg["train"]["seed"] = seed
            cb = ensure_codebook(cfg, data, runs_root / f"seed{seed}" / tok / "codebook")  # refitted per seed
            for head in heads:
                if head == "fv" and tok != tokenizers[0]:
                    continue  # FV-MLE does not use the codebook: once per seed
                name = f"{head}" if head == "fv" else f"{head}/{tok}"
                run_dir = runs_root / f"seed{seed}" / name.replace("/", "-")
                wall = trained(head_config(cfg, head), data, cb, run_dir)
                seed_wall += wall
                rd = RunDir(run_dir)
                made = rd.read_json(BENCH)
                rec = {"seed": seed, "wall_s": wall, "env": made.get("env"), "provenance": made.get("provenance"),
                       **records(current_eval(rd, False), ""), **records(current_eval(rd, True), "_seen_excluded")}
                curve = rd.read_json(TEST_CURVE)
                if curve is not None:
                    rec["test_mix_curve_seen_excluded"] = curve
                rows.setdefault(name, []).append(rec)
        walls.append(round(seed_wall, 1))
        result = _result(dataset, data, len(walls), tokenizers, heads, overrides, max_users, walls, base, rows)
        result["tag"] = tag
        result["parallel_levels"] = parallel_levels if set(tokenizers) & {"pq", "opq"} else None
        if only_seed is None:  # one seed of a split-up run: the final call without it aggregates
            write_result(name_out, result, results_dir)  # after every seed: partial results survive
            io.write_text(results_dir / f"{name_out}.md", quality_markdown(result))
    return result


def trained(hc: dict, data: SequenceData, cb, run_dir: Path) -> float:
    """Train and evaluate (both protocols) one run; a finished run is reused only if it was made
    from these very inputs (its fingerprint, `sidrec.run`), otherwise it is trained again from scratch. Returns the run's wall time
    (training + both evaluations), as measured when it was made (for a resumed run: since the resume);
    bench.json also keeps the environment (machine, commit) the run was trained in."""
    want = {k: v for k, v in hc.items() if not k.startswith("_")}
    rd = RunDir(run_dir)
    made = rd.read_json(BENCH) or {}
    status, _ = rundir.stage_status(run_dir, "run", model_inputs(hc, data, cb))
    if status == "same" and made.get("wall_s") is not None:
        if evaluated(hc, rd):
            return made["wall_s"]
        t = time.perf_counter()  # evaluations gone stale; a joint run trained before its mix was chosen, or
        # evaluated before the wide beams
        if hc["model"]["head"] == "joint" and rd.joint_mix() is None:
            tune_joint_mix(run_dir, data=data, exclude_seen=hc["train"]["exclude_seen"])
        evaluate_both(hc, data, run_dir)
        wall = round(made["wall_s"] + time.perf_counter() - t, 1)
        rd.write_json(BENCH, {**made, "wall_s": wall, "re_evaluated": common.provenance()})
        return wall
    t = time.perf_counter()
    start = common.code_state()  # a resumed run: the code of its resumed part (the stamp says "resumed")
    with io.writer_session():  # the run is released once trained: a long benchmark holds only the current one
        train_one(hc, data, cb, run_dir, resume=status == "same", overwrite=status == "stale")
    rd.write_json(BENCH, {"config": want, "wall_s": None})  # a killed run resumes from its checkpoint
    evaluate_both(hc, data, run_dir)
    wall = round(time.perf_counter() - t, 1)
    rd.write_json(BENCH, {"config": want, "wall_s": wall, "env": environment(), "resumed": status == "same",
                               "provenance": common.span(start, common.code_state())})
    return wall


def current_eval(rd: RunDir, exclude_seen: bool) -> dict:
    """A run's stored evaluation of a protocol on the catalogue it was trained on, refused unless it
    scored the run's current weights."""
    ev = rd.read_eval(exclude_seen, version=None)
    if ev is None:
        raise RuntimeError(f"{rd.path}: no current evaluation (exclude_seen={exclude_seen}) after evaluating it")
    return ev


def evaluate_both(hc: dict, data: SequenceData, run_dir: Path) -> None:
    """Both protocols, beam 20; a joint head also at the WIDE_BEAMS widths (how many AR candidates the
    FV rescoring needs to match the exact mixture)."""
    joint = hc["model"]["head"] == "joint"
    for excl in (False, True):
        evaluate_run(run_dir, beam=20, data=data, exclude_seen=excl, extra_beams=WIDE_BEAMS if joint else ())
    if joint:  # test metrics along the mix grid: its ends are the joint backbone's AR and FV heads alone
        device = pick_device("auto")
        model, _ = RunDir(run_dir).load_model(device, version=None)
        curve = mix_curve(model, data, list(MIX_GRID), split="test", exclude_seen=True, device=device)
        RunDir(run_dir).write_json(TEST_CURVE, [{"mix": m, **{k: v[k] for k in KEYS}} for m, v in curve.items()])


def evaluated(hc: dict, rd: RunDir) -> bool:
    """The run's weights are evaluated under both protocols; a joint run's also with its mix chosen on
    validation, at every beam width, and along the mix grid."""
    if hc["model"]["head"] != "joint":
        return all(rd.read_eval(excl, version=None) is not None for excl in (False, True))
    ev = [rd.read_eval(excl, 20, ("exact", "beam", *(f"beam{b}" for b in WIDE_BEAMS)), version=None)
          for excl in (False, True)]
    return rd.joint_mix() is not None and all(e is not None for e in ev) and rd.read_json(TEST_CURVE) is not None


def _result(dataset, data, seeds, tokenizers, heads, overrides, max_users, walls, base, rows) -> dict:
    summary = {name: aggregate(recs) for name, recs in rows.items()}
    return {"dataset": dataset, "users": data.n_users, "items": data.n_items, "seeds": seeds,
              "tokenizers": tokenizers, "heads": heads, "overrides": overrides, "max_users": max_users,
              "wall_seconds_per_seed": walls, "config": {k: v for k, v in base.items() if not k.startswith("_")},
              "summary": summary, "runs": rows, "comparisons": compare(summary, tokenizers)}


def records(ev: dict, suffix: str) -> dict:
    """Test metrics per decode mode (and valid exact, the selection metric) of one eval file."""
    rec = {f"valid_{mode}{suffix}": {k: ev["valid"][mode][k] for k in KEYS}  # the served beam is chosen on these
           for mode in ("exact", "beam", *(f"beam{b}" for b in WIDE_BEAMS)) if mode in ev["valid"]}
    if ev.get("mix") is not None:
        rec["mix"] = ev["mix"]
    for mode in ("exact", "beam", *(f"beam{b}" for b in WIDE_BEAMS)):
        if mode in ev["test"]:
            rec[mode + suffix] = {k: ev["test"][mode][k] for k in KEYS}
            if ev["test"][mode].get("users_per_s"):  # the cost per user of this ranking (batch 1024)
                rec[mode + suffix]["ms_per_user"] = 1000 / ev["test"][mode]["users_per_s"]
    if "overlap@10" in ev["test"]:
        rec["overlap@10" + suffix] = ev["test"]["overlap@10"]
    return rec


MODES = tuple(v + m + sfx for sfx in ("", "_seen_excluded") for v in ("", "valid_")
              for m in ("exact", "beam", *(f"beam{b}" for b in WIDE_BEAMS)))


def aggregate(recs: list[dict]) -> dict:
    out = {}
    for mode in MODES:
        if mode in recs[0]:
            out[mode] = {k: {"mean": statistics.mean(r[mode][k] for r in recs),
                             "std": statistics.stdev(r[mode][k] for r in recs) if len(recs) > 1 else 0.0}
                         for k in recs[0][mode] if all(k in r[mode] for r in recs)}
    curves = [r["test_mix_curve_seen_excluded"] for r in recs if "test_mix_curve_seen_excluded" in r]
    if len(curves) == len(recs):  # mean over seeds at each mix
        out["test_mix_curve_seen_excluded"] = [
            {"mix": pts[0]["mix"], **{k: statistics.mean(p[k] for p in pts) for k in KEYS}} for pts in zip(*curves)]
    for key in ("overlap@10", "overlap@10_seen_excluded", "wall_s", "mix"):
        if key in recs[0]:
            out[key] = statistics.mean(r[key] for r in recs)
    return out


def compare(summary: dict, tokenizers: list[str]) -> dict:
    """Relative NDCG@10 gaps (test, mean over seeds): each SID head vs FV-MLE, beam vs exact."""
    def ndcg(name: str, mode: str) -> float | None:
        return summary.get(name, {}).get(mode, {}).get("ndcg@10", {}).get("mean")

    out = {}
    for sfx in ("", "_seen_excluded"):
        fv = ndcg("fv", "exact" + sfx)
        for name in (f"{head}/{tok}" for tok in tokenizers for head in ("ar", "parallel", "joint")):
            ex = ndcg(name, "exact" + sfx)
            if ex and fv:
                out[f"{name}_ndcg10_rel_gap_vs_fv{sfx}"] = (ex - fv) / fv
            for b in ("", *WIDE_BEAMS):
                bm = ndcg(name, f"beam{b}{sfx}")
                if ex and bm:
                    out[f"{name}_beam{b}_vs_exact_ndcg10_rel{sfx}"] = (bm - ex) / ex
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="beauty", choices=DATASETS)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tokenizers", default="rq-kmeans,opq")
    ap.add_argument("--heads", default="fv,ar,parallel")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides (key=value)")
    ap.add_argument("--max-users", type=int, default=None, help="tiny slice for plumbing tests")
    ap.add_argument("--out-root", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--results-dir", default=str(RESULTS))
    ap.add_argument("--tag", default="", help="name of an ablation: results go to quality-<dataset>-<tag>.json")
    ap.add_argument("--name", default="", help="results file quality-<dataset>-<name>.json instead (runs are "
                    "still shared by tag: a finished run with the same config is reused, not retrained)")
    ap.add_argument("--only-seed", type=int, default=None, help="train/evaluate this seed alone and write no "
                    "results (run seeds as parallel processes, then once without it to aggregate)")
    ap.add_argument("--parallel-levels", type=int, default=4, help="sub-spaces (tokens) of PQ/OPQ codes "
                    "(cascaded tokenizers take tokenizer.levels from the config)")
    a = common.parse_args(ap)
    if a.parallel_levels < 1:
        ap.error("--parallel-levels must be >= 1")
    try:
        r = run(a.dataset, a.seeds, a.tokenizers.split(","), a.heads.split(","), a.set, a.max_users,
                Path(a.out_root), Path(a.results_dir), a.tag, a.name, a.only_seed, a.parallel_levels)
    except UserError as e:  # a bad --set, a code too short for the catalogue, ...: one line, exit 2
        print(f"bench.quality: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(quality_markdown(r))


if __name__ == "__main__":
    main()
