"""report.md + PNG plots for a `sidrec run` directory (written through its `PipelineDir`)."""

from __future__ import annotations

from sidrec import io

METRICS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20", "mrr")
LABELS = {"ar": "AR-NTP", "fv": "FV-MLE", "parallel": "Parallel (non-AR)", "ar-unconstrained": "AR-NTP (unconstr.)"}


def plot_training(out, heads: list[str]) -> list[str]:
    """Training loss and validation NDCG@10 of every head (`out`: the PipelineDir); the figure's link."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for h in heads:
        recs = out.head(h).read_log()
        steps = [r for r in recs if "loss" in r]
        evals = [r for r in recs if "valid" in r]
        if steps:
            a1.plot([r["step"] for r in steps], [r["loss"] for r in steps], label=LABELS.get(h, h))
        if evals:
            a2.plot([r["epoch"] + 1 for r in evals], [r["valid"]["ndcg@10"] for r in evals], marker=".",
                    label=LABELS.get(h, h))
    a1.set(xlabel="step", ylabel="train NLL per target (nats)", title="training loss")
    a2.set(xlabel="epoch", ylabel="NDCG@10", title="validation NDCG@10 (exact ranking)")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend()
    fig.tight_layout()
    path, link = out.figure("training.png")
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return [link]


def plot_metrics(out, summary: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    bars = []
    for h, ev in summary["results"].items():
        for dec in ("exact", "beam"):
            if dec in ev.get("test", {}):
                bars.append((f"{LABELS.get(h, h)}\n{dec}", ev["test"][dec]))
    if "bayes_optimal" in summary:
        bars.append(("Bayes-optimal\n(P*)", summary["bayes_optimal"]["test"]))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(bars)), 4))
    x = np.arange(len(bars))
    for i, m in enumerate(("recall@10", "ndcg@10")):
        ax.bar(x + (i - 0.5) * 0.38, [b[1][m] for b in bars], 0.38, label=m)
    ax.set_xticks(x, [b[0] for b in bars], fontsize=8)
    ax.set(title="test metrics (full ranking, leave-one-out)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path, link = out.figure("metrics.png")
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return [link]


def results_table(summary: dict, split: str = "test") -> str:
    head = "| model | decode | " + " | ".join(METRICS) + " |\n|---|---|" + "---|" * len(METRICS) + "\n"
    rows = []
    for h, ev in summary["results"].items():
        for dec in ("exact", "beam"):
            m = ev.get(split, {}).get(dec)
            if m:
                rows.append(f"| {LABELS.get(h, h)} | {dec}{' (' + str(m['beam']) + ')' if dec == 'beam' else ''} | "
                            + " | ".join(f"{m[k]:.4f}" for k in METRICS) + " |")
    if "bayes_optimal" in summary:
        b = summary["bayes_optimal"][split]
        rows.append("| Bayes-optimal (ranking by P*) | expected | " +
                    " | ".join(f"{b[k]:.4f}" if k in b else "—" for k in METRICS) + " |")
    return head + "\n".join(rows) + "\n"


def write_report(out, summary: dict, cfg: dict) -> None:
    """report.md of a `sidrec run` directory (`out`: its PipelineDir) with tables and figures."""
    heads = list(summary["results"])
    plots = plot_training(out, heads) + plot_metrics(out, summary)
    d = summary["data"]
    lines = [
        f"# sidrec run: {cfg.get('name', 'run')}", "",
        f"Data: {d['users']:,} users, {d['items']:,} items, {d['interactions']:,} interactions "
        f"(source: {d.get('source', '')}).",
        "Protocol: leave-one-out (last item test, second-to-last validation), full ranking over all items, "
        f"seen items {'removed' if cfg['eval']['exclude_seen'] else 'kept'} in the ranking.", "",
    ]
    if "codebook" in summary:
        c = summary["codebook"]
        lines += [f"Semantic IDs: {c.get('method')} on {c.get('embeddings')} embeddings, "
                  f"{' x '.join(map(str, c['sizes']))}, bijective = {c['bijective']} "
                  f"(collisions before resolution: {100 * c.get('collision_rate_before', 0):.2f}%, "
                  f"resolved by {c.get('resolve')}).", ""]
    lines += ["## Test", "", results_table(summary, "test"), "## Validation", "", results_table(summary, "valid")]
    for h, ev in summary["results"].items():
        if "overlap@10" in ev.get("test", {}):
            lines.append(f"- {LABELS.get(h, h)}: overlap@10 of beam-{ev['test']['beam']['beam']} and exact "
                         f"top-10 = {ev['test']['overlap@10']:.4f}")
    if "bayes_optimal" in summary:
        b = summary["bayes_optimal"]["test"]
        lines += ["", f"Synthetic ground truth: entropy of P* = {b['entropy']:.4f} nats per test target "
                  f"(the irreducible NLL); Bayes-optimal Recall@10 = {b['recall@10']:.4f}, "
                  f"NDCG@10 = {b['ndcg@10']:.4f}."]
    lines += ["", "## Timings (seconds)", "", " · ".join(f"{k}: {v}" for k, v in summary["timings_s"].items()), ""]
    lines += [f"![{p}]({p})" for p in plots]
    out.write_report("\n".join(lines) + "\n")
