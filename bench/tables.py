"""Markdown tables rendered from the result JSON files, so a table in the docs cannot drift from its file.

    python -m bench.tables           # rewrite every marked region, and each bench/results/NAME.md
    python -m bench.tables --check   # write nothing; exit 1 naming each table that differs

A marked region in README.md or docs/*.md is

    <!-- table: NAME -->
    ...generated...
    <!-- /table -->

where NAME is a result file's stem (bench/results/NAME.json, else bench/results/archive/NAME.json) or
`headline` (the README's datasets x models table). The stem's prefix picks the renderer. Every region
ends with a source line (file, commit, machine, date) taken from the file itself, because a commit
or machine typed by hand drifts as easily as a number. This is the only place result tables are
rendered: bench.quality, bench.sweep and bench.scale import their .md renderers from here.
Standard library only, so the check runs anywhere in well under a second.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
REGION = re.compile(r"(<!-- table: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)

#: Published rows (Recall@10, NDCG@10 on the test split), copied from the papers, not re-run here:
#: TIGER: Rajput et al., "Recommender Systems with Generative Retrieval", NeurIPS 2023;
#: ActionPiece: Hou et al., "ActionPiece: Contextually Tokenizing Action Sequences for Generative
#: Recommendation", ICML 2025; RPG: Hou et al., "Generating Long Semantic IDs in Parallel for
#: Recommendation", KDD 2025 (its Recall@10 is not carried here).
PUBLISHED: dict[str, dict[str, tuple[float | None, float]]] = {
    "beauty": {"TIGER (published)": (0.0648, 0.0384), "ActionPiece (published)": (0.0775, 0.0424),
               "RPG (published)": (None, 0.0464)},
    "sports": {"TIGER (published)": (0.0400, 0.0225), "ActionPiece (published)": (0.0500, 0.0264)},
}
HEADLINE = ("quality-beauty", "quality-sports", "quality-yelp")
#: bench.quality --name of the published SASRec+SS recipe trained by sidrec (a row of the joint tables)
MATCHED_SASREC = "sasrec-ss"
#: Tuned ID-based sequential models under the same protocol (seen items excluded, S3-Rec data),
#: copied, not re-run: SASRec with sampled softmax (256 negatives) and eSASRec from the eSASRec
#: paper's benchmark (github.com/blondered/transformer_benchmark); BSARec from its official Beauty log.
TUNED: dict[str, dict[str, tuple[float, float]]] = {
    "beauty": {"SASRec+SS, 256 negatives (published)": (0.0921, 0.0531), "eSASRec (published)": (0.0928, 0.0523),
               "BSARec (published log)": (0.1008, 0.0611)},
    "sports": {"SASRec+SS, 256 negatives (published)": (0.0569, 0.0314), "eSASRec (published)": (0.0560, 0.0323)},
}


def load(name: str) -> tuple[Path, dict]:
    """A result file by stem: the curated top level first, then the archive."""
    for path in (RESULTS / f"{name}.json", RESULTS / "archive" / f"{name}.json"):
        if path.exists():
            return path, json.loads(path.read_text())
    raise KeyError(f"no result file bench/results/{name}.json or bench/results/archive/{name}.json")


def stamps(r: dict) -> list[dict | None]:
    """The provenance spans of a result: the process that wrote it and every run it aggregates (None for a
    run recorded before runs kept their stamps)."""
    runs = r.get("runs") if r.get("summary") else None  # bench.quality: {model: [one record per seed]}
    return [r.get("provenance"), *(rec.get("provenance") for recs in (runs or {}).values() for rec in recs)]


def code(r: dict) -> str:
    """How a source line names the code behind a result, from its stamps alone: the commit(s) taken when
    each part started and ended, "uncommitted" (with the diff's hash) where the code differed from its
    commit, and a warning when the code changed during a run. A file written before start stamps existed
    names its end-of-run commit as such, with what `bench.audit` found against the git history."""
    spans = stamps(r)
    if spans[0] is None:  # written before start stamps
        audit = r.get("provenance_audit") or {}
        what = f"commit `{(r.get('env') or {}).get('commit') or '?'}`, end-of-run stamp"
        return what + (f" (audit: {', '.join(audit['verdict'])})" if audit.get("verdict") else "")
    states = [st for sp in spans if sp for st in (sp["start"], sp["end"]) if st]
    commits = list(dict.fromkeys(st["commit"] for st in states))
    diffs = list(dict.fromkeys(st["diff"] for st in states if st["dirty"]))
    out = ("commit" if len(commits) == 1 else "commits") + " " + ", ".join(f"`{c}`" for c in commits)
    if diffs:
        out += " + uncommitted changes (diff " + ", ".join(diffs) + ")"
    if any(sp and sp["code_changed_during_run"] for sp in spans):
        out += "; the code changed while it ran"
    if any(sp is None for sp in spans[1:]):
        out += "; some runs reused from before start stamps"
    return out


def machine(r: dict) -> str:
    """One phrase for the code and machine of a result (the machine of the process that wrote the file)."""
    env = r.get("env")
    if not env:
        return "no commit or machine recorded"
    dev = env.get("cuda") or "CPU only"
    return f"{code(r)}, {dev}, {env.get('cpu_count')} cores, torch {env.get('torch')}, {str(env.get('date', '?'))[:10]}"


def source(path: Path, r: dict) -> str:
    """The generated provenance line under every table. Results made before runs recorded their own
    machine carry only the machine that wrote (aggregated) the file; the docs say so where it matters."""
    line = f"Source: `{path.relative_to(ROOT)}`; {machine(r)}."
    runs = r.get("runs") if r.get("summary") else None  # bench.quality: {model: [one record per seed]}
    run_envs = [rec.get("env") for recs in (runs or {}).values() for rec in recs]
    if run_envs and all(run_envs):
        devs = sorted({e.get("cuda") or "CPU" for e in run_envs})
        line += f" Runs trained on: {', '.join(devs)}."
    return line


# ---- quality (bench.quality) ------------------------------------------------------------------------

def pub(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"


def cell(s: dict, mode: str, k: str, std: bool = True) -> str:
    """'mean ± std' of one metric over seeds ('mean' alone for one seed in the docs' view)."""
    m = s.get(mode, {}).get(k)
    return "—" if not m else f"{m['mean']:.4f} ± {m['std']:.4f}" if std else f"{m['mean']:.4f}"


def fv_label(model: dict) -> str:
    """FV-MLE's row label: its training loss (the full softmax, or sampled softmax and its negatives)."""
    if model.get("fv_loss", "full") == "full":
        return "FV-MLE (SASRec-style, full softmax)"
    per = "per step" if model.get("fv_shared_negatives", True) else "per target"
    logq = "" if model.get("fv_logq", True) else ", no logQ correction"
    return f"FV-MLE (SASRec-style, sampled softmax, {model['fv_negatives']} {model['fv_sampler']} negatives {per}{logq})"


def quality_markdown(r: dict) -> str:
    """bench/results/quality-*.md: every model, decode and protocol of one bench.quality result."""
    walls = ", ".join(f"{n} {s['wall_s']:.0f} s" for n, s in r["summary"].items() if "wall_s" in s)
    lines = [f"Test split, full ranking, {r['users']:,} users, {r['items']:,} items, mean ± std over "
             f"{r['seeds']} seed(s); wall time per seed (sum of its runs): {r['wall_seconds_per_seed']} s; "
             f"per run (train + both evaluations, mean over seeds): {walls}.", "",
             "| model | decode | Recall@10 | NDCG@10 | Recall@20 | NDCG@20 | valid NDCG@10 |",
             "|---|---|---|---|---|---|---|"]
    protocols = [("", ""), ("_seen_excluded", ", seen excluded")]
    if r["config"]["eval"]["exclude_seen"]:  # the protocol the config selects checkpoints on comes first
        protocols.reverse()
    for sfx, note in protocols:
        for name, s in r["summary"].items():
            for mode in ("exact", "beam", "beam50", "beam100"):
                if mode + sfx in s:
                    label = {"fv": fv_label(r["config"].get("model", {}))}.get(
                        name, name.replace("ar/", "AR-NTP / ").replace("parallel/", "Parallel / "))
                    if name.endswith(("/pq", "/opq")) and r.get("parallel_levels"):
                        label += f" ({r['parallel_levels']} sub-spaces)"
                    valid = cell(s, "valid_exact" + sfx, "ndcg@10") if mode == "exact" else "—"
                    dec = {"beam": "beam 20"}.get(mode, mode.replace("beam", "beam "))
                    lines.append(f"| {label} | {dec}{note} | " + " | ".join(
                        cell(s, mode + sfx, k) for k in ("recall@10", "ndcg@10", "recall@20", "ndcg@20"))
                        + f" | {valid} |")
    for name, (rec, ndcg) in PUBLISHED.get(r["dataset"], {}).items():
        lines.append(f"| {name} | — | {rec if rec else '—'} | {ndcg} | — | — | — |")
    lines += ["", "Relative differences: " + ", ".join(f"{k} {100 * v:+.1f}%" for k, v in r["comparisons"].items())]
    return "\n".join(lines) + "\n"


def joint_table(path: Path, r: dict) -> str:
    """The docs' view of a joint-head result: exact mixture vs AR beam + FV rescoring at each width
    (quality and cost per user), the joint backbone's AR and FV heads alone, and tuned ID models."""
    name = next(n for n in r["summary"] if n.startswith("joint/"))
    s = r["summary"][name]
    sfx = "_seen_excluded"
    exact = s["exact" + sfx]["ndcg@10"]["mean"]
    served, on_valid = served_beam(s, sfx)
    lines = ["| ranking | Recall@10 | NDCG@10 | vs exact mixture | ms per user | valid NDCG@10 |",
             "|---|---|---|---|---|---|"]
    for mode in ("exact", *JOINT_BEAMS):
        m = s.get(mode + sfx)
        if m:
            label = "exact mixture over all items" if mode == "exact" else \
                f"AR beam {beam_width(mode)} + FV rescoring" + (" (served)" if mode == served and on_valid else "")
            gap = "—" if mode == "exact" else f"{100 * (m['ndcg@10']['mean'] - exact) / exact:+.1f}%"
            ms = m.get("ms_per_user", {}).get("mean")
            lines.append(f"| {label} | {cell(s, mode + sfx, 'recall@10')} | {cell(s, mode + sfx, 'ndcg@10')} | "
                         f"{gap} | {f'{ms:.3f}' if ms else '—'} | {cell(s, 'valid_' + mode + sfx, 'ndcg@10')} |")
    curve = {p["mix"]: p for p in s.get("test_mix_curve" + sfx, [])}
    for mix, label in ((0.0, "its AR-NTP head alone (exact)"), (1.0, "its FV-MLE head alone (exact)")):
        if mix in curve:
            p = curve[mix]
            lines.append(f"| {label} | {p['recall@10']:.4f} | {p['ndcg@10']:.4f} | "
                         f"{100 * (p['ndcg@10'] - exact) / exact:+.1f}% | | |")
    for label, (rec, ndcg) in TUNED.get(r["dataset"], {}).items():
        lines.append(f"| {label} | {rec:.4f} | {ndcg:.4f} | | | |")
    matched = _optional(f"quality-{r['dataset']}-{MATCHED_SASREC}")
    if matched:  # the published SASRec+SS recipe, trained and evaluated by sidrec (bench.quality)
        lines.append(f"| SASRec+SS recipe, trained by sidrec ({matched['seeds']} seeds) | "
                     f"{cell(matched['summary']['fv'], 'exact' + sfx, 'recall@10', False)} | "
                     f"{cell(matched['summary']['fv'], 'exact' + sfx, 'ndcg@10', False)} | | | "
                     f"{cell(matched['summary']['fv'], 'valid_exact' + sfx, 'ndcg@10', False)} |")
    mixes = [x["mix"] for recs in r["runs"].values() for x in recs if "mix" in x]
    seeds = f"mean ± std over {r['seeds']} seeds" if r["seeds"] > 1 else "one seed"
    head = (f"Test split, seen items excluded, full ranking over {r['items']:,} items, {r['users']:,} users, "
            f"{seeds}. {model_label(name, r)}: one model trained on nll_ar + nll_fv; ranked by (1 − mix) log Q_ar + mix log Q_fv with the "
            f"mix chosen on validation per seed ({', '.join(f'{m:.1f}' for m in mixes)}). Milliseconds per user: "
            "test evaluation in batches of 1,024 on the machine that evaluated. "
            + ("The served width: the narrowest beam within 1% of the exact mixture's validation NDCG@10."
               if on_valid else "Validation beams were not recorded: no width is chosen on validation."))
    return "\n".join([head, "", *lines, "", source(path, r)])


def model_label(name: str, r: dict) -> str:
    """'ar/opq' -> 'AR-NTP, OPQ 4×256'. Results written before --parallel-levels existed have no
    `parallel_levels`: their PQ/OPQ codes had the 4 sub-spaces bench.quality then hard-coded."""
    head, _, tok = name.partition("/")
    tc = r["config"]["tokenizer"]
    levels = (r.get("parallel_levels") or 4) if tok in ("pq", "opq") else tc["levels"]
    heads = {"fv": "FV-MLE", "ar": "AR-NTP", "parallel": "Parallel head", "ar-unconstrained": "AR-NTP, unconstrained",
             "joint": "AR-NTP + FV rescoring (joint)"}
    toks = {"rq-kmeans": "RQ-KMeans", "rq-kmeans-balanced": "balanced RQ-KMeans", "opq": "OPQ", "pq": "PQ",
            "rq-vae": "RQ-VAE"}
    return heads.get(head, head) + (f", {toks.get(tok, tok)} {levels}×{tc['codebook_size']}" if tok else "")


def quality_table(path: Path, r: dict) -> str:
    """The docs' view of a bench.quality result: exact ranking under both protocols (the config's
    first), NDCG@10 relative to FV-MLE, beam-20 NDCG@10, the validation score, and published rows."""
    lines = ["| model | seen items | Recall@10 | NDCG@10 | vs FV-MLE | beam 20 NDCG@10 | valid NDCG@10 |",
             "|---|---|---|---|---|---|---|"]
    protocols = [("_seen_excluded", "excluded"), ("", "kept")]
    if not r["config"]["eval"]["exclude_seen"]:
        protocols.reverse()
    for sfx, note in protocols:
        fv = r["summary"].get("fv", {}).get("exact" + sfx, {}).get("ndcg@10", {}).get("mean")
        for name, s in r["summary"].items():
            if "exact" + sfx not in s:
                continue
            ndcg = s["exact" + sfx]["ndcg@10"]["mean"]
            gap = f"{100 * (ndcg - fv) / fv:+.1f}%" if fv and name != "fv" else "—"
            beam = s.get("beam" + sfx, {}).get("ndcg@10", {}).get("mean")
            std = r["seeds"] > 1
            lines.append(f"| {model_label(name, r)} | {note} | {cell(s, 'exact' + sfx, 'recall@10', std)} | "
                         f"{cell(s, 'exact' + sfx, 'ndcg@10', std)} | {gap} | {f'{beam:.4f}' if beam else '—'} | "
                         f"{cell(s, 'valid_exact' + sfx, 'ndcg@10', std)} |")
    for name, (rec, ndcg) in PUBLISHED.get(r["dataset"], {}).items():
        lines.append(f"| {name} | — | {pub(rec)} | {pub(ndcg)} | | | |")
    seeds = f"mean ± std over {r['seeds']} seeds" if r["seeds"] > 1 else "one seed"
    head = f"Test split, full ranking over {r['items']:,} items, {r['users']:,} users, {seeds}; exact ranking."
    if r.get("overrides"):
        head += " Config overrides: " + " ".join(f"`{o}`" for o in r["overrides"]) + "."
    return "\n".join([head, "", *lines, "", source(path, r)])


JOINT_BEAMS = ("beam", "beam50", "beam100")  # AR beam 20, 50, 100 + FV rescoring
SERVED_TOLERANCE = 0.01  # the served width: the narrowest within 1% of the exact mixture, on validation


def served_beam(s: dict, sfx: str) -> tuple[str, bool]:
    """(mode, chosen_on_validation): the beam a joint model is served at, the narrowest width whose
    validation NDCG@10 (mean over seeds) is within SERVED_TOLERANCE of the validation exact mixture's.
    Results recorded before validation beams were kept: beam 100, a width that was read off test."""
    exact = s.get("valid_exact" + sfx, {}).get("ndcg@10", {}).get("mean")
    for mode in JOINT_BEAMS:
        m = s.get("valid_" + mode + sfx, {}).get("ndcg@10", {}).get("mean")
        if exact and m is not None and m >= (1 - SERVED_TOLERANCE) * exact:
            return mode, True
    has_valid = any("valid_" + mode + sfx in s for mode in JOINT_BEAMS)
    return JOINT_BEAMS[-1], has_valid  # none within the tolerance: the widest; legacy: not chosen at all


def beam_width(mode: str) -> int:
    return int(mode[4:] or 20)


def _optional(name: str) -> dict | None:
    """A curated (top-level) result file, if there is one."""
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def headline(names: tuple[str, ...] = HEADLINE) -> str:
    """README's table: Recall@10 / NDCG@10 per dataset, the config's protocol, exact ranking."""
    files = [load(n) for n in names]
    datasets = [r["dataset"] for _, r in files]
    lines = ["| model | " + " | ".join(d.capitalize() for d in datasets) + " |", "|---|" + "---|" * len(files)]
    node = {r["dataset"]: r for r in (_optional(f"quality-{d}-nt") for d in datasets) if r}
    fv = {r["dataset"]: r for r in (_optional(f"quality-{d}-fv") for d in datasets) if r}  # re-run at today's defaults
    rows = (("fv", "FV-MLE (full softmax, same backbone)", [(None, fv.get(d) or r) for (_, r), d in zip(files, datasets)]),
            ("ar/rq-kmeans", "**AR-NTP, RQ-KMeans 3×256** (node table, row-sparse: the default)",
             [(None, node.get(d)) for d in datasets]),
            ("ar/rq-kmeans", "AR-NTP, free item vectors, dense AdamW (the earlier head)", files))
    for name, label, sources in rows:
        if not any(r for _, r in sources):
            continue
        cells = []
        for _, r in sources:
            if r is None:
                cells.append("—")
                continue
            s = r["summary"][name]["exact" + ("_seen_excluded" if r["config"]["eval"]["exclude_seen"] else "")]
            cells.append(f"{s['recall@10']['mean']:.4f} / {s['ndcg@10']['mean']:.4f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    joint = {r["dataset"]: r for r in (_optional(f"quality-{d}-joint") for d in datasets) if r}
    if joint:  # the joint model, served the scalable way: AR beam search + FV rescoring
        def served(r: dict) -> str:
            name = next(n for n in r["summary"] if n.startswith("joint/"))
            sfx = "_seen_excluded" if r["config"]["eval"]["exclude_seen"] else ""
            mode, on_valid = served_beam(r["summary"][name], sfx)
            s = r["summary"][name]
            return (f"{cell(s, mode + sfx, 'recall@10', False)} / {cell(s, mode + sfx, 'ndcg@10', False)} "
                    f"({beam_width(mode)}{'' if on_valid else ', not chosen on validation'})")

        cells = [served(joint[d]) if d in joint else "—" for d in datasets]
        lines.append("| **AR beam search + FV rescoring, one joint model** | " + " | ".join(cells) + " |")
    published = {**{k: v for d in datasets for k, v in TUNED.get(d, {}).items() if k.startswith("SASRec")}}
    for name in dict.fromkeys([*published, *(k for d in datasets for k in PUBLISHED.get(d, {}))]):
        vals = [{**TUNED.get(d, {}), **PUBLISHED.get(d, {})}.get(name) for d in datasets]
        lines.append(f"| {name} | " + " | ".join(f"{pub(v[0])} / {pub(v[1])}" if v else "—" for v in vals) + " |")
    protocol = {"seen items excluded" if r["config"]["eval"]["exclude_seen"] else "seen items kept" for _, r in files}
    seeds = {str(r["seeds"]) for _, r in files}
    files += [load(f"quality-{d}-nt") for d in datasets if d in node]
    files += [load(f"quality-{d}-fv") for d in datasets if d in fv]
    files += [load(f"quality-{d}-joint") for d in datasets if d in joint]
    src = "; ".join(f"`{p.relative_to(ROOT)}` ({code(r).removeprefix('commit ')})" for p, r in files)
    how = ("exact (the joint row: beam search + rescoring, the beam width in brackets, the narrowest within 1% "
           "of the exact mixture on validation)") if joint else "exact"
    return "\n".join([*lines, "", f"Test Recall@10 / NDCG@10, full ranking, {how}, {' / '.join(sorted(protocol))}, "
                                 f"mean of {' / '.join(sorted(seeds))} seeds. Source: {src}."])


# ---- sweeps, comparisons, popularity --------------------------------------------------------------

def sweep_table(rows: list[dict]) -> str:
    """One line per (variant, model) of a bench.sweep, as ranked there (validation NDCG@10)."""
    lines = ["| model | variant | overrides | valid NDCG@10 | test R@10 | test NDCG@10 | beam-20 NDCG@10 | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    f = lambda x: f"{x:.4f}" if isinstance(x, float) else "—"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['model']} | {r['tag']} | {' '.join(r['set']) or '(config)'} | {f(r['valid_ndcg@10'])} | "
                     f"{f(r['test_recall@10'])} | {f(r['test_ndcg@10'])} | {f(r['beam_ndcg@10'])} | "
                     f"{r['wall_s'] or '—'} |")
    return "\n".join(lines) + "\n"


def hybrid(key: str) -> str:
    """'B2+A' (sidrec compare's key) -> "B's first 2 tokens, A's rest"."""
    m = re.fullmatch(r"([AB])(\d+)\+([AB])", key)
    if not m:
        return key
    first = "first token" if m[2] == "1" else f"first {m[2]} tokens"
    return f"{m[1]}'s {first}, {m[3]}'s rest"


def compare_table(path: Path, r: dict) -> str:
    """`sidrec compare A B`: per-level NLL of both runs, then ranking by each run and each hybrid."""
    levels = " / ".join(str(i + 1) for i in range(r["levels"]))
    lines = [f"| {r['split']} split, {r['n_users']:,} users | NLL token {levels} | NLL total | Recall@10 | NDCG@10 |",
             "|---|---|---|---|---|"]
    names = {"A": f"A: `{r['runs']['A']}`", "B": f"B: `{r['runs']['B']}`", "ensemble": "mean of the two log Q"}
    for key, m in r["ranking"].items():
        nll = r["level_nll"].get(key)
        per = " / ".join(f"{x:.3f}" for x in nll["per_level"]) if nll else ""
        label = names.get(key) or hybrid(key)
        total = f"{nll['total']:.3f}" if nll else ""
        lines.append(f"| {label} | {per} | {total} | {m['recall@10']:.4f} | {m['ndcg@10']:.4f} |")
    return "\n".join([*lines, "", source(path, r)])


def popularity_table(path: Path, r: dict) -> str:
    lines = ["| split | Recall@10 | NDCG@10 | Recall@20 | NDCG@20 |", "|---|---|---|---|---|"]
    for split in ("valid", "test"):
        m = r[split]
        lines.append(f"| {split} | " + " | ".join(f"{m[k]:.4f}" for k in ("recall@10", "ndcg@10", "recall@20",
                                                                         "ndcg@20")) + " |")
    return "\n".join([*lines, "", source(path, r)])


# ---- speed, scale, tokenizers -----------------------------------------------------------------------

def measured(row: dict, key: str, field: str):
    """A field of one bench.scale measurement, or None when that measurement failed."""
    v = row.get(key, {})
    return v.get(field) if "error" not in v else None


def _g(v, unit: str = "") -> str:
    return "—" if v is None else f"{v:.3g}{unit}"


def scale_table(r: dict) -> str:
    """bench/results/scale.md (and the docs' scale table): training step per catalogue size and
    output layer, parameters, inference latency per user."""
    batch = r.get("infer_batch", 256)
    rows = r["rows"]
    kinds = [k for k in ("fv-naive", "fv-streamed", "fv-chunked", "fv-sampled-uniform-256", "fv-sampled-uniform-4096",
                         "fv-sampled-popularity-4096", "fv-sampled-in-batch", "fv-sampled-uniform-4096-sparse",
                         "ar", "ar-token", "ar-node")
             if any(f"train_{k}" in row for row in rows)]

    def step(row, kind):
        v = row.get(f"train_{kind}", {})
        return "OOM" if "OOM" in str(v.get("error", "")) else ("error" if "error" in v else _g(v.get("step_seconds"), " s"))

    def per_user(row, key, field):
        v = measured(row, key, field)
        return _g(v / batch * 1e3, " ms") if v else "—"

    lines = []
    if kinds:  # an inference-only run (--kinds "") has no training table
        lines = ["Training step of the output layer (2,048 targets, forward + backward + AdamW), seconds:", "",
                 "| N | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
        lines += [f"| {row['n']:,} | " + " | ".join(step(row, k) for k in kinds) + " |" for row in rows] + [""]
    params = [k for k in ("fv-streamed", "fv-chunked", "ar", "ar-token", "ar-node") if any(f"train_{k}" in row for row in rows)]
    lines += ["Output-layer parameters (of which the N × d item table) and top-10 inference per user (batch "
              f"{batch}):" if params else f"Top-10 inference per user (batch {batch}):", "",
              "| N | " + "".join(f"{k} params | " for k in params) +
              "FV exact | AR beam-20 | AR token-only beam-20 | AR exact | AR node-table beam-20 | AR node-table exact | "
              "tokenizer fit |", "|---|" + "---|" * (len(params) + 7)]
    for row in rows:
        cells = []
        for k in params:
            total, table = measured(row, f"train_{k}", "output_parameters"), measured(row, f"train_{k}", "item_table_parameters")
            cells.append("—" if total is None else f"{total:,}" + (f" ({table:,})" if table else ""))
        beam_key = "infer_ar-token" if "infer_ar-token" in row else None
        lines.append(f"| {row['n']:,} | " + "".join(f"{c} | " for c in cells) + f"{per_user(row, 'infer_fv', 'exact_seconds')} | "
                     f"{per_user(row, 'infer_ar', 'beam20_seconds')} | "
                     f"{per_user(row, beam_key, 'beam20_seconds') if beam_key else '—'} | "
                     f"{per_user(row, 'infer_ar', 'exact_seconds')} | {per_user(row, 'infer_ar-node', 'beam20_seconds')} | "
                     f"{per_user(row, 'infer_ar-node', 'exact_seconds')} | {row['tokenizer_fit_seconds']} s |")
    models = [k for k in ("model-ar", "model-ar-node", "model-fv-sampled-4096", "model-fv-sampled-4096-sparse")
              if any(f"model_{k}" in row for row in rows)]
    if models:
        mb = r.get("model_batch", {})
        lines += ["", f"Whole-model training step (backbone d 64, 2 layers + head + optimizer; {mb.get('users')} histories "
                  f"of {mb.get('history')} items), seconds / peak extra GiB / table rows touched:", "",
                  "| N | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
        for row in rows:
            cells = []
            for k in models:
                v = row.get(f"model_{k}", {})
                if "error" in v:
                    cells.append("OOM" if "OOM" in v["error"] else "error")
                else:
                    touched = f" / {v['rows_touched']:,}" if v.get("rows_touched") is not None else " / all"
                    cells.append(f"{_g(v.get('step_seconds'), ' s')} / {v.get('peak_extra_gib')}{touched}")
            lines.append(f"| {row['n']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def tokenize_table(path: Path, r: dict) -> str:
    lines = ["| data | method | codes | fit time | collisions before resolution | bijective after | "
             "rel. reconstruction error | max items under a prefix |", "|---|---|---|---|---|---|---|---|"]
    for x in r["results"]:
        codes = " × ".join([str(x["codebook_size"])] * x["levels"])
        lines.append(f"| {x['dataset']} | {x['method']} | {codes} | {x['seconds']} s | "
                     f"{100 * x['collision_rate_before']:.1f}% | {'yes' if x['bijective'] else 'NO'} | "
                     f"{x['reconstruction_error']:.3f} | {x['max_items_per_prefix']} |")
    return "\n".join([*lines, "", source(path, r)])


def train_speed_table(path: Path, r: dict) -> str:
    s = r["summary"]
    by = {(x["head"], x["bucketed"]): x for x in r["results"]}
    lines = ["| head | epoch, length-bucketed batches | epoch, random batches | output-layer parameters |",
             "|---|---|---|---|"]
    for head, label in (("fv", "FV-MLE"), ("ar", "AR-NTP"), ("ar-free", "AR-NTP, free item vectors, dense AdamW "
                                                                       "(the earlier default)"), ("parallel", "Parallel")):
        if (head, True) in by:
            rnd = by.get((head, False))
            random = f"{rnd['median_epoch_seconds']} s" if rnd else "—"
            lines.append(f"| {label} | {by[head, True]['median_epoch_seconds']} s | {random} | "
                         f"{by[head, True]['output_layer_parameters']:,} |")
    note = (f"{s['dataset'].capitalize()}, {s['users']:,} users, {s['items']:,} items; d = {s['d_model']}, "
            f"{s['layers']} layers, history {s['max_len']}, batch {s['batch_size']}; median epoch. AR-NTP / FV-MLE "
            f"epoch-time ratio {s['ar_over_fv_epoch_ratio']}, peak RSS {s['peak_rss_gib']} GiB.")
    if "ar_over_ar_free_epoch_ratio" in s:
        note += f" AR-NTP / earlier AR-NTP epoch-time ratio {s['ar_over_ar_free_epoch_ratio']}."
    return "\n".join([*lines, "", note, "", source(path, r)])


def _share(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def serve_table(r: dict) -> str:
    """bench.serve: throughput, client-side latency and CPU per request per run, batching mode and
    concurrency; then the offline ceiling and whether served answers equal the library's."""
    lines = ["| run | decode | micro-batching | concurrency | req/s | p50 ms | p95 ms | p99 ms | non-200 | "
             "rows per call | server CPU ms/req | client CPU ms/req | CPU steal |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["load"]:
        dec = f"beam {x['beam']}" if x["decode"] == "beam" else "exact"
        cpu = [x.get(f"{w}_cpu_ms_per_request", "—") for w in ("server", "client")]
        run = x["run"] + (f" ({x['workers']} decode processes)" if x.get("workers", 1) > 1 else "")
        lines.append(f"| {run} | {dec} | {x['batching']} | {x['concurrency']} | {x['requests_per_s']:,.0f} | "
                     f"{x['p50_ms']} | {x['p95_ms']} | {x['p99_ms']} | {x['non_200']} | {x['rows_per_call']} | "
                     f"{cpu[0]} | {cpu[1]} | {_share(x.get('cpu_steal_share'))} |")
    lines += ["", "| run | offline ceiling (in-process, batches of 256), users/s | CPU steal | micro-batching speed-up "
              "at the highest concurrency | served answers equal to the library's |", "|---|---|---|---|---|"]
    for name, o in r["offline"].items():
        dec = f"beam {o['beam']}" if o.get("beam") else o["decode"]
        equal = r.get("answers_equal_library", {}).get(name)
        lines.append(f"| {name} ({dec}) | {o['users_per_s']:,.0f} | {_share(o.get('cpu_steal_share'))} | "
                     f"{r.get('speedup_batching', {}).get(name, '—')}× | {'—' if equal is None else f'{100 * equal:.1f}%'} |")
    return "\n".join(lines) + f"\n\n`{r['command']}`, k = {r['k']}; client: {r['settings']['client']}.\n"


def coldstart_table(r: dict) -> str:
    """bench.coldstart: Recall@10 / NDCG@10 overall, on cold test items and on warm ones (test), and the
    validation figures the rule for new items' vectors was chosen on."""
    valid = "cold_valid_users" in r  # results written before the validation split have test figures only
    lines = [f"Beauty, {r['cold_items']:,} of {r['items']:,} items cold ({100 * r['cold_share']:.0f}%, seed {r['seed']}); "
             f"test users {r['test_users']:,}, of which {r['cold_test_users']:,} have a cold test item"
             + (f" ({r['cold_valid_users']:,} a cold validation item)" if valid else "") +
             ". Recall@10 / NDCG@10, full ranking, seen items excluded.", "",
             "| model | overall | cold test items | warm test items |" + (" valid overall | valid cold |" if valid else ""),
             "|---|---|---|---|" + ("---|---|" if valid else "")]
    for label, row in r["rows"].items():
        cells = [f"{row[s]['recall@10']:.4f} / {row[s]['ndcg@10']:.4f}" for s in ("overall", "cold", "warm")]
        if valid:
            cells += [f"{row['valid'][s]['recall@10']:.4f} / {row['valid'][s]['ndcg@10']:.4f}" for s in ("overall", "cold")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if valid:
        rule = r["vectors_rule"]
        lines += ["", f"New items' vectors, chosen on {rule['on']}: `{rule['chosen']}`."]
    else:
        lines += ["", "No validation split was measured: the rule for new items' vectors was not chosen on validation."]
    added = next((row["add_items"] for row in r["rows"].values() if row.get("add_items")), None)
    if added:
        ids = added["ids"]
        lines += ["", f"`items add` of the {added['added']:,} cold items: {ids['direct']:,} took their nearest ID, "
                  f"{ids['resolved']:,} a free code under the same prefix, {ids['fallback']:,} the next prefix with "
                  f"room; {added['seconds']} s" + (f", of which {added['embed_seconds']} s embedding their text with the "
                  f"run's text model ({added['total_seconds']} s with writing the version and reloading)."
                  if added.get("embed_seconds") is not None else ".")]
    delta = r["warm_ndcg10_vs_full_catalogue"]
    if delta is not None:
        lines += ["", f"Warm NDCG@10 of the model with cold items added (the chosen rule) vs the model trained on "
                  f"the full catalogue: {100 * delta:+.1f}%."]
    lines += ["", f"`{r['command']}`"]
    return "\n".join(lines) + "\n"


def scale_fit_table(r: dict) -> str:
    """bench.scale_fit: fit to a known P* under one training-time budget per catalogue size (mean over
    seeds with the spread, max − min, where a size has several)."""
    lines = ["| N | model | seeds | steps | s/step | test NLL | KL(P* ‖ Q) | Recall@10 | NDCG@10 | "
             "s to sampled FV's KL |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        b = row["bayes_optimal"]
        for name in dict.fromkeys(m["model"] for m in row["models"]):
            runs = [m for m in row["models"] if m["model"] == name]
            sm = row.get("summary", {}).get(name)

            def val(k, fmt):
                if sm and len(runs) > 1:
                    return f"{sm[k]['mean']:{fmt}} ± {sm[k]['spread'] / 2:{fmt}}"
                return f"{runs[0][k]:{fmt}}"

            times = [m.get("seconds_to_sampled_fv_final_kl") for m in runs]
            t = "—" if any(x is None for x in times) else f"{sum(times) / len(times):.0f}"
            steps = sum(m["steps"] for m in runs) // len(runs)
            lines.append(f"| {row['n']:,} | {name} | {len(runs)} | {steps:,} | {runs[0]['seconds_per_step']} | "
                         f"{val('nll', '.3f')} | {val('kl_to_pstar', '.3f')} | {val('recall@10', '.4f')} | "
                         f"{val('ndcg@10', '.4f')} | {t} |")
        lines.append(f"| {row['n']:,} | Bayes-optimal (P* itself; entropy {b['entropy']:.3f}) | | | | {b['nll']:.3f} | 0 | "
                     f"{b['recall@10']:.4f} | {b['ndcg@10']:.4f} | |")
    budget = r["rows"][0]["budget_seconds"] if r["rows"] else 0
    nll = any("valid_nll" in c for row in r["rows"] for m in row["models"] for c in m.get("kl_curve", []))
    how = "validation NLL" if nll else "validation NDCG@10"
    return "\n".join(lines) + (f"\n\nTraining-time budget per model: {budget:.0f} s; each is scored at its best epoch "
                               f"on {how} (± half the spread over seeds). `{r['command']}`\n")


def _rss(x: dict) -> str:
    anon = x.get("peak_anon_rss_gib")
    return f"{x['peak_rss_gib']:.2f} GiB" + (f" ({anon:.2f} GiB)" if anon is not None else "")


def scale_data_table(r: dict) -> str:
    """bench.scale_data: out-of-core `data prepare` (DuckDB) on a synthetic Parquet log."""
    lines = ["| log rows | users / items kept | interactions kept | parts | engine memory limit | peak RSS "
             "(anonymous) | prepare time | µs per row |", "|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        lines.append(f"| {x['log']['rows']:,} | {x['users']:,} / {x['items']:,} | {x['interactions']:,} | "
                     f"{x['parts']} | {x['memory_limit']} | {_rss(x)} | {x['prepare_seconds']:.0f} s | "
                     f"{x['us_per_row']:.2f} |")
    text = "\n".join(lines) + "\n" if r["rows"] else ""
    if r["rows"]:
        text += f"\nCommand run by the benchmark: `sidrec {r['rows'][0]['command'].split(' ', 2)[-1]}`\n"
    t = r.get("tokenize")
    if t:
        e = t["embeddings"]
        rss = _rss(t)
        fit = (f"fitted on {t['fit_rows']:,} sampled items" if e["items"] > t["fit_rows"] else "fitted in memory")
        text += ("\n| items × dim (float32 .npy, memory-mapped) | tokenizer | fit + assign | collision resolution | "
                 "peak RSS (anonymous) | µs per item | collisions before | bijective |\n|---|---|---|---|---|---|---|---|\n"
                 f"| {e['items']:,} × {e['dim']} ({e['bytes'] / 2**30:.1f} GiB) | RQ-KMeans {t['levels']} × "
                 f"{t['codebook_size']}, {fit} | {t['quantize_seconds']:.0f} s | "
                 f"{t['resolve_seconds']:.0f} s | {rss} | {t['us_per_item']:.2f} | {t['collision_rate_before']:.4f} | "
                 f"{'yes' if t['bijective'] else 'NO'} |\n")
    return text


def scale_serve_table(r: dict) -> str:
    """bench.scale_serve: reduced-precision serving tables on a trained run, then at scale."""
    rows = r["rows"]
    base = rows[0]["table_bytes"]
    lines = [f"| table precision | table memory ({rows[0]['n_items']:,} items) | top-10 overlap, beam 20 | "
             "top-10 overlap, exact | same top-1 (beam) | largest score change | beam-20 users/s (batch 256) |",
             "|---|---|---|---|---|---|---|"]
    for x in rows:
        lines.append(f"| {x['precision']} | {x['table_bytes'] / 2**20:.1f} MiB ({x['table_bytes'] / base:.2f}×) | "
                     f"{x['overlap@10_beam']:.4f} | {x['overlap@10_exact']:.4f} | {x['same_top1_beam']:.4f} | "
                     f"{max(x['max_score_change_beam'], x['max_score_change_exact']):.4f} | "
                     f"{x['beam20_users_per_s']:,.0f} |")
    text = "\n".join(lines) + f"\n\nRun: `{r['run']}`, {r['users']:,} test users, seen items excluded.\n"
    if r.get("scale"):
        text += ("\n| precision | items | table bytes per item | resident memory after narrowing | peak while "
                 "narrowing |\n|---|---|---|---|---|\n")
        for x in r["scale"]:
            text += (f"| {x['precision']} | {x['items']:,} | {x['table_bytes_per_item']:.0f} | "
                     f"{x['rss_anon_gib']:.2f} GiB | {x['peak_rss_gib']:.2f} GiB |\n")
    return text


def scale_projection() -> str:
    """docs/scale-out.md: what the measured per-row costs project to at 10x the measured sizes (the
    arithmetic, from the JSON of bench.scale_data and bench.scale_serve; assumptions stated)."""
    _, d = load("scale-data")
    _, t = load("scale-data-tokenize")
    _, s = load("scale-serve")
    prep, tok = d["rows"][0], t["tokenize"]
    n_tok = tok["embeddings"]["items"]
    tok_s = tok["quantize_seconds"] + tok["resolve_seconds"]
    lines = ["| step | measured (this machine, 2 vCPU) | per row | at 10× (same machine, linear in rows) |",
             "|---|---|---|---|",
             f"| `data prepare --engine duckdb` | {prep['log']['rows']:,} rows: {prep['prepare_seconds'] / 60:.0f} min, "
             f"peak {prep['peak_rss_gib']:.1f} GiB under a {prep['memory_limit']} engine limit | "
             f"{prep['us_per_row']:.1f} µs | {10 * prep['log']['rows']:,} rows: "
             f"{10 * prep['prepare_seconds'] / 3600:.1f} h; memory bounded by the engine limit |",
             f"| RQ-KMeans fit + assignment + bijective resolution | {n_tok:,} items: {tok_s / 60:.0f} min, "
             f"peak {tok['peak_rss_gib']:.1f} GiB | {tok['us_per_item']:.1f} µs | {10 * n_tok:,} items: "
             f"{10 * tok_s / 3600:.1f} h; at most ~{10 * tok['peak_rss_gib']:.0f} GiB (ten times the whole peak: "
             "codes, errors and sort temporaries grow with N, the interpreter does not) |"]
    for x in s.get("scale", []):
        per = x["table_bytes_per_item"]
        lines.append(f"| serving tables, {x['precision']} | {x['items']:,} items: {x['table_bytes'] / 2**30:.2f} GiB | "
                     f"{per:.0f} B | 10^8 items: {per * 1e8 / 2**30:.0f} GiB; 10^9: {per * 1e9 / 2**30:.0f} GiB |")
    return "\n".join(lines) + ("\n\nAssumptions: costs per row stay as measured (DuckDB's sorts and faiss' "
                               "searches are n log n and n; the log factor is not in the projection); more cores "
                               "divide the times by at most their number (not measured here); the table bytes "
                               "per item are exact for a 3 × 256 trie at d 64 and scale with d.\n")


def synthetic_table(r: dict) -> str:
    """bench.synthetic: the quick start's test table on the synthetic default."""
    labels = {"ar": "AR-NTP", "fv": "FV-MLE (full softmax)", "parallel": "Parallel head (non-AR)"}
    lines = ["| model (one shared backbone) | Recall@10 | NDCG@10 | Recall@20 | NDCG@20 |", "|---|---|---|---|---|"]
    for head, decs in r["test"].items():
        for dec, m in decs.items():
            name = labels.get(head, head) + ("" if head != "ar" else ", exact ranking" if dec == "exact" else
                                             ", beam search (20)")
            lines.append(f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in ("recall@10", "ndcg@10", "recall@20",
                                                                              "ndcg@20")) + " |")
    b = r["bayes_optimal"]
    lines.append("| Bayes-optimal (ranking by the true P*) | " +
                 " | ".join(f"{b[k]:.4f}" for k in ("recall@10", "ndcg@10", "recall@20", "ndcg@20")) + " |")
    return "\n".join(lines) + "\n"


def verify_table(r: dict) -> str:
    """bench.synthetic: each claim of `sidrec verify --synthetic`, its measured value and tolerance."""
    lines = ["| claim | measured | tolerance | pass |", "|---|---|---|---|"]
    for c in r["claims"]:
        lines.append(f"| {c['claim']} | {c['value']:.3g} | {c['tolerance']:.3g} | {'yes' if c['pass'] else 'no'} |")
    return "\n".join(lines) + f"\n\n{r['seconds']['total']} s in all.\n"


# ---- regions ------------------------------------------------------------------------------------

def serve_headline() -> str:
    """The README's one-paragraph serving figures, from bench/results/serve.json."""
    path, r = load("serve")
    rows = {(x["run"], x["batching"], x["concurrency"]): x for x in r["load"]}
    top = max(x["concurrency"] for x in r["load"])
    loaded, alone = [], []
    for run, o in r["offline"].items():
        on, one = rows.get((run, "on", top)), rows.get((run, "on", 1))
        beam = o.get("beam") or 20
        label = ("FV-MLE exact" if o["decode"] != "beam" else
                 f"joint beam {beam} + FV rescoring" if run.startswith("joint") else f"AR-NTP beam {beam}")
        if on and one:
            loaded.append(f"{label} {on['requests_per_s']:,.0f} req/s (p99 {on['p99_ms']:.0f} ms)")
            alone.append(f"{one['p50_ms']:.1f}")
    env = r.get("env", {})
    client = r.get("settings", {}).get("client", "").split(" ")[0]
    return (f"At concurrency {top}: " + ", ".join(loaded) + f"; alone, medians {' / '.join(alone)} ms "
            f"(Beauty, k = 10, {client} client; {code(r)}, {env.get('cpu_count')} CPU cores).\n")


def render(name: str) -> str:
    """The body of the region `<!-- table: NAME -->` (without the markers)."""
    if name == "headline":
        return headline() + "\n"
    if name == "serve-headline":
        return serve_headline()
    if name == "scale-projection":
        return scale_projection()
    path, r = load(name)
    kind = name.split("-")[0]
    if kind == "quality" and any(n.startswith("joint/") for n in r["summary"]):
        body = joint_table(path, r)
    elif kind == "quality":
        body = quality_table(path, r)
    elif kind == "sweep":
        body = sweep_table(r["rows"]) + "\n" + source(path, r)
    elif name.startswith("scale-serve"):
        body = scale_serve_table(r) + "\n" + source(path, r)
    elif name.startswith("scale-data"):
        body = scale_data_table(r) + "\n" + source(path, r)
    elif name.startswith("scale-fit"):
        body = scale_fit_table(r) + "\n" + source(path, r)
    elif name in ("synthetic", "verify-synthetic"):
        body = {"synthetic": synthetic_table, "verify-synthetic": verify_table}[name](r) + "\n" + source(path, r)
    elif kind in ("scale", "serve", "coldstart"):
        body = {"scale": scale_table, "serve": serve_table, "coldstart": coldstart_table}[kind](r) + "\n" + source(path, r)
    elif kind in ("compare", "popularity", "tokenize", "train_speed"):
        body = {"compare": compare_table, "popularity": popularity_table, "tokenize": tokenize_table,
                "train_speed": train_speed_table}[kind](path, r)
    else:
        raise KeyError(f"no renderer for result file {name!r}")
    return body.rstrip("\n") + "\n"


def fill(text: str) -> tuple[str, list[str]]:
    """The text with every marked region re-rendered, and the names of the regions that changed."""
    changed = []

    def sub(m: re.Match) -> str:
        body = render(m["name"])
        if body != m["body"]:
            changed.append(m["name"])
        return m.group(1) + body + m.group(4)

    return REGION.sub(sub, text), changed


#: The kept bench/results/NAME.md files and how each is rendered from NAME.json.
MD = {"quality": quality_markdown, "scale": scale_table, "sweep": lambda r: sweep_table(r["rows"]), "serve": serve_table,
      "coldstart": coldstart_table}
MD_BY_PREFIX = {"scale-fit": scale_fit_table, "scale-data": scale_data_table, "scale-serve": scale_serve_table}


def targets() -> list[tuple[Path, str, str]]:
    """(file, what, rendered text) for every generated file and every doc holding a marked region."""
    out = []
    for md in sorted(RESULTS.glob("*.md")):
        render_md = next((f for prefix, f in MD_BY_PREFIX.items() if md.stem.startswith(prefix)),
                         MD.get(md.stem.split("-")[0]))
        if render_md and md.with_suffix(".json").exists():
            out.append((md, md.stem, render_md(json.loads(md.with_suffix(".json").read_text()))))
    for doc in DOCS:
        text = doc.read_text()
        new, changed = fill(text)
        out.append((doc, ", ".join(changed), new))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tables", description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if any table differs from its JSON")
    a = ap.parse_args(argv)
    try:
        todo = targets()
    except (KeyError, ValueError, json.JSONDecodeError) as e:
        print(f"bench.tables: error: {e}", file=sys.stderr)
        return 2
    stale = [(path, what, new) for path, what, new in todo if path.read_text() != new]
    for path, what, new in stale:
        rel = path.relative_to(ROOT)
        if a.check:
            print(f"bench.tables: {rel}: table {what or rel.stem} differs from its JSON "
                  "(run `python -m bench.tables`)", file=sys.stderr)
        else:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(new)
            tmp.replace(path)  # atomic: a reader never sees half a document
            print(f"rewrote {rel}" + (f" ({what})" if what and what != path.stem else ""))
    return 1 if a.check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
