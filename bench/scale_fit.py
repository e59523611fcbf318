"""Fit quality at scale, where the truth is known: AR-NTP vs exact and sampled-softmax FV-MLE.

    python -m bench.scale_fit [--sizes 100000,1000000] [--budget-min 10]

For each catalogue size N, synthetic users are drawn from the generator with a known
P*(item | history) (`sidrec.data.synth`: a latent item hierarchy, popularity, an EMA of the
history). Then, on the same backbone and the same training-time budget on this machine (the time
spent in optimisation steps; validation excluded), each output layer is trained with the library's
Trainer: AR-NTP on RQ-KMeans semantic IDs of the items' latent vectors (the default head, a
centred node table on the row-sparse path, and the earlier head, free item vectors with dense
AdamW), FV-MLE with the exact streamed softmax, and FV-MLE with sampled softmax on the row-sparse
path (popularity proposal, 4,096 negatives, logQ correction). On held-out test users: NLL of the real next item, KL(P* || Q), Recall@10
and NDCG@10 (full ranking, seen items kept: users may return to an item) against the Bayes-optimal
ranking by P*, and the KL after every epoch with the training time it took (how fast each reaches
a given KL). Each model's epoch is selected on the NLL of held-out validation items (NDCG@10 is near
zero and noisy at these sizes, a weak selector) and scored at that epoch; it stops when the NLL has
not improved for `--patience` epochs or the budget is spent. `--seeds` repeats every model with other
initialisations and batch orders (mean and spread in the table). Sequences are drawn by inverse-CDF sampling (one uniform number per draw) so that
large catalogues are affordable.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench import common
from bench.common import RESULTS, ROOT, write_result
from bench.tables import scale_fit_table
from sidrec import io
from sidrec.data import SequenceData
from sidrec.data.synth import bayes_optimal, item_titles, make_world, padded_histories, save_synthetic
from sidrec.evaluate import evaluate_split
from sidrec.model import BackboneConfig, ModelConfig, SeqRecModel
from sidrec.tokenize import fit_codebook
from sidrec.train import TrainConfig, Trainer

BACKBONE = BackboneConfig(d_model=64, n_layers=2, n_heads=2, d_ff=128, dropout=0.1, max_len=20)
#: name -> (model keys, train.sparse)
MODELS = {"AR-NTP, node table, row-sparse": ({"head": "ar", "node_table": True}, True),
          "AR-NTP, free item vectors, dense AdamW (the earlier head)": ({"head": "ar", "node_table": False}, False),
          "FV-MLE exact (streamed softmax)": ({"head": "fv"}, False),
          "FV-MLE sampled softmax (popularity, 4,096 negatives, logQ), row-sparse": (
              {"head": "fv", "fv_loss": "sampled", "fv_sampler": "popularity", "fv_negatives": 4096}, True)}


def synth(n_items: int, n_users: int, out: Path, seed: int = 0, mean_len: float = 10.0) -> SequenceData:
    """Users drawn from P* by inverse-CDF sampling; saved with its world (reused when present)."""
    if (out / "world.npz").exists():
        return SequenceData.load(out)
    world = make_world(n_items, dim=16, n_categories=32, n_sub=32, seed=seed)
    rng = np.random.default_rng(seed + 2)
    lens = np.minimum(5 + rng.geometric(1.0 / (mean_len - 4), n_users) - 1, 40)
    gen = torch.Generator().manual_seed(seed + 3)
    seqs = np.zeros((n_users, lens.max()), dtype=np.int64)
    chunk = max(1, 2**25 // n_items)
    order = np.argsort(lens, kind="stable")  # users of similar length together: few idle rows
    for s in range(0, n_users, chunk):
        rows = order[s:s + chunk]
        for t in range(int(lens[rows].max())):
            live = rows[lens[rows] > t]
            logits = world.logits(seqs[live, :t], np.full(len(live), t))
            cdf = torch.cumsum(torch.exp(logits - logits.max(1, keepdim=True).values), 1)  # unnormalised
            u = torch.rand(len(live), 1, generator=gen) * cdf[:, -1:]
            seqs[live, t] = torch.searchsorted(cdf, u).clamp(max=n_items - 1).squeeze(1).numpy()
    mask = np.arange(seqs.shape[1])[None, :] < lens[:, None]
    data = SequenceData(np.concatenate([[0], np.cumsum(lens)]).astype(np.int64), seqs[mask].astype(np.int32),
                        np.arange(n_users).astype(str), item_titles(world, seed),
                        meta={"synthetic": True, "sampler": "inverse CDF", "seed": seed})
    save_synthetic(data, world, out)
    return SequenceData.load(out)


def subset(data: SequenceData, users: np.ndarray) -> SequenceData:
    """The sequences of `users` only (same item ids)."""
    lens = data.lengths[users]
    items = np.concatenate([data.sequence(u) for u in users])
    return SequenceData(np.concatenate([[0], np.cumsum(lens)]).astype(np.int64), items, data.user_ids[users],
                        data.item_table)


def truth_metrics(model, data: SequenceData, world, users: np.ndarray, batch: int) -> dict:
    """NLL of the real test item, KL(P* || Q), Recall/NDCG@10 on `users` (test split)."""
    hist, lens = padded_histories(data, "test")
    hm, lm = padded_histories(data, "test", model.cfg.backbone.max_len)
    tgt = data.targets("test").astype(np.int64)
    nll = kl = 0.0
    model.eval()
    for s in range(0, len(users), batch):
        u = users[s:s + batch]
        p_log = world.log_prob(hist[u], lens[u]).double()
        with torch.no_grad():
            h = model.encode(torch.from_numpy(np.where(hm[u] < 0, data.n_items, hm[u])), torch.from_numpy(lm[u]))
            q_log = model.head.log_prob_all(h).double()
        nll -= q_log.gather(1, torch.from_numpy(tgt[u])[:, None]).sum().item()
        kl += (p_log.exp() * (p_log - q_log)).sum().item()
    m = evaluate_split(model, data, "test", users=users, batch_size=batch)
    return {"nll": nll / len(users), "kl_to_pstar": kl / len(users), "recall@10": m["recall@10"], "ndcg@10": m["ndcg@10"]}


def valid_nll(model, data: SequenceData, users: np.ndarray, batch: int) -> float:
    """Mean NLL of the held-out validation item of `users` (exact, every head's full distribution)."""
    from sidrec.data.batching import eval_batches

    model.eval()
    tgt, total = data.targets("valid").astype(np.int64), 0.0
    with torch.no_grad():
        for u, items, lengths in eval_batches(data, "valid", model.cfg.backbone.max_len, batch, users):
            total += model.head.nll(model.encode(items, lengths), torch.from_numpy(tgt[u])).double().sum().item()
    return total / len(users)


def train(name: str, spec: tuple, data, world, cb, run: Path, budget_s: float, patience: int, users_kl: np.ndarray,
          batch: int, seed: int = 0) -> dict:
    keys, sparse = spec
    torch.manual_seed(seed)
    model = SeqRecModel(ModelConfig(backbone=BACKBONE, **keys), data.n_items, cb if keys["head"] == "ar" else None)
    sampler = getattr(getattr(model.head, "fv", model.head), "sampler", None)
    if sampler is not None:
        sampler.set_counts(torch.from_numpy(data.train_target_counts()))
    tc = TrainConfig(epochs=1000, batch_size=256, lr=2e-3, warmup_steps=50, patience=patience, max_seconds=budget_s,
                     eval_batch_size=batch, log_every=10**9, seed=seed, sparse=sparse)
    trainer = Trainer(model, data, tc, run, None)
    curve = []
    val_users = np.sort(np.random.default_rng(1).choice(data.n_users, min(2000, data.n_users), replace=False))

    def validate(m):  # after every epoch and at the end of the budget: KL to the truth, in training time
        kl = truth_metrics(m, data, world, users_kl, batch)["kl_to_pstar"]
        nll = valid_nll(m, data, val_users, batch)
        curve.append({"step": trainer.state["step"], "train_seconds": round(trainer.state["step_seconds"], 1),
                      "kl_to_pstar": round(kl, 5), "valid_nll": round(nll, 5)})
        print(name, seed, curve[-1], file=sys.stderr, flush=True)
        return {"selection": -nll, "valid_nll": nll, "ndcg@10": 0.0}

    trainer.validate = validate
    t = time.perf_counter()
    state = trainer.fit()
    return {"model": name, "seed": seed, "steps": state["step"], "best_epoch": state["best_epoch"],
            "train_seconds": round(state["step_seconds"], 1),
            "seconds_per_step": round(state["step_seconds"] / max(1, state["step"]), 4),
            "wall_seconds": round(time.perf_counter() - t, 1), "kl_curve": curve, "_model": trainer.model}


def int_list(text: str) -> list[int]:
    """argparse type for "100000,1000000": a bad list is a usage error (exit 2), not a traceback."""
    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def summary(models: list[dict]) -> dict:
    """Per model: mean and spread (max - min) over seeds of its KL, NLL, Recall@10 and NDCG@10."""
    out = {}
    for name in dict.fromkeys(m["model"] for m in models):
        runs = [m for m in models if m["model"] == name]
        out[name] = {k: {"mean": float(np.mean([r[k] for r in runs])), "spread": float(np.ptp([r[k] for r in runs]))}
                     for k in ("kl_to_pstar", "nll", "recall@10", "ndcg@10", "seconds_per_step")}
        out[name]["seeds"] = len(runs)
    return out


def time_to_kl(curve: list[dict], target: float) -> float | None:
    return next((c["train_seconds"] for c in curve if c["kl_to_pstar"] <= target), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int_list, default="100000,1000000")
    ap.add_argument("--users", type=int_list, default="20000,20000", help="users drawn per size (drawing costs users x N)")
    ap.add_argument("--seeds", type=int_list, default="3,1", help="seeds per size (model init and batch order)")
    ap.add_argument("--budget-min", type=float, default=3.0, help="training-time budget per model (minutes)")
    ap.add_argument("--patience", type=int, default=2,
                    help="epochs without validation NLL gain before a model stops (its best epoch is scored)")
    ap.add_argument("--eval-users", type=int, default=2000)
    ap.add_argument("--out-root", default=str(ROOT / "bench" / "out" / "scale-fit"))
    ap.add_argument("--results-dir", default=str(RESULTS))
    ap.add_argument("--name", default="scale-fit")
    a = common.parse_args(ap)
    rows = []
    sizes, users_per = a.sizes, a.users
    seeds_per = a.seeds + a.seeds[-1:] * len(sizes)
    for n, n_users, n_seeds in zip(sizes, users_per + users_per[-1:] * len(sizes), seeds_per):
        work = Path(a.out_root) / f"n{n}-u{n_users}"
        reused, t = (work / "data" / "world.npz").exists(), time.perf_counter()
        data = synth(n, n_users, work / "data")
        gen_s = None if reused else round(time.perf_counter() - t, 1)  # None: drawn by an earlier run
        from sidrec.data.synth import load_world

        world = load_world(work / "data")
        rng = np.random.default_rng(0)
        users = np.sort(rng.choice(data.n_users, min(a.eval_users, data.n_users), replace=False))
        batch = max(8, min(256, 2**26 // n))
        bayes = bayes_optimal(world, subset(data, users), "test")
        t = time.perf_counter()
        cb = fit_codebook(world.latent, "rq-kmeans", 3, 256, seed=0, embeddings="latent")
        row = {"n": n, "users": data.n_users, "interactions": data.n_interactions, "generate_seconds": gen_s,
               "tokenizer_fit_seconds": round(time.perf_counter() - t, 1), "budget_seconds": a.budget_min * 60,
               "bayes_optimal": {k: bayes[k] for k in ("nll", "entropy", "recall@10", "ndcg@10")}, "models": []}
        for seed in range(n_seeds):
            for i, (name, spec) in enumerate(MODELS.items()):
                res = train(name, spec, data, world, cb, work / f"seed{seed}" / f"model{i}", a.budget_min * 60,
                            a.patience, users[:500], batch, seed)
                model = res.pop("_model")
                res.update(truth_metrics(model, data, world, users, batch))
                row["models"].append(res)
                del model
            fv_kl = next(m["kl_to_pstar"] for m in row["models"] if m["model"].startswith("FV-MLE sampled")
                         and m["seed"] == seed)
            for m in row["models"]:
                if m["seed"] == seed:
                    m["seconds_to_sampled_fv_final_kl"] = time_to_kl(m["kl_curve"], fv_kl)
        row["summary"] = summary(row["models"])
        rows.append(row)
        path = write_result(a.name, {"command": "python -m bench.scale_fit " + " ".join(sys.argv[1:]),
                                     "backbone": BACKBONE.__dict__, "rows": rows}, Path(a.results_dir))
    io.write_text(path.with_suffix(".md"), scale_fit_table(io.read_json(path)))


if __name__ == "__main__":
    main()
