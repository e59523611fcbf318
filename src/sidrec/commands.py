"""Subcommands beyond `data`: tokenize, train, evaluate, run, recommend, export-items, compare, verify."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sidrec.cli_args import float_range, int_range, schema_option
from sidrec.config import HEAD_NAMES
from sidrec.model.lowp import PRECISIONS


def print_codebook(info: dict) -> None:
    rows = [
        ("method", info.get("method")), ("embeddings", info.get("embeddings")),
        ("items", info["n_items"]), ("levels x sizes", " x ".join(map(str, info["sizes"]))),
        ("bijective", info["bijective"]),
        ("collisions before resolution", f"{info.get('collisions_before_resolution', 0)} "
         f"({100 * info.get('collision_rate_before', 0):.2f}% of items)"),
        ("resolution", info.get("resolve")),
        ("utilization per level", info["utilization"]),
        ("perplexity per level", info["perplexity"]),
        ("max items under one prefix", info["max_items_per_prefix"]),
        ("reconstruction error (relative)", info.get("reconstruction_error")),
        ("fit seconds", info.get("fit_seconds")),
    ]
    w = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{w}}  {v}" for k, v in rows))


def cmd_tokenize(a: argparse.Namespace) -> None:
    from sidrec import io, run
    from sidrec.data import SequenceData
    from sidrec.pipeline import fit_tokenizer, say

    out = Path(a.out)
    npy = a.embeddings if a.embeddings.endswith(".npy") else None
    io.check_output_dir(out, "codebook", overwrite=a.overwrite, inputs=(a.data, npy))
    data = SequenceData.load(a.data)
    tok = {"method": a.method, "levels": a.levels, "codebook_size": a.codebook_size, "embeddings": a.embeddings,
           "text_model": a.text_model, "collab_dim": a.collab_dim, "resolve": a.resolve, "seed": a.seed}
    inputs = run.codebook_inputs(tok, run.dir_fingerprint(a.data, "data"))
    cb = fit_tokenizer(data, tok, a.embeddings)
    cb.save(out, marker=run.marker_fields(inputs))
    print(f"wrote {out}")
    print_codebook(cb.to_json())
    if not cb.bijective:
        say(f"warning: {cb.n_collisions} items share an ID with another item (--resolve none): AR-NTP on this "
            "codebook is not full-vocabulary MLE, and `sidrec verify` will fail its bijection check")


def add_tokenize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tokenize", help="fit a semantic-ID tokenizer and save a bijective codebook",
        description="Embed items (text, collaborative, synthetic latent, or a .npy file), fit a cascaded "
        "(RQ-KMeans, balanced RQ-KMeans, RQ-VAE) or parallel (PQ, OPQ) tokenizer, resolve collisions so "
        "that the item -> ID map is a bijection, and save codebook.npz + codebook.json.")
    p.add_argument("data", help="prepared data directory")
    schema_option(p, "--method", "tokenizer.method", "tokenizer")
    schema_option(p, "--levels", "tokenizer.levels", "tokens per ID before resolution")
    schema_option(p, "--codebook-size", "tokenizer.codebook_size", "codes per level")
    schema_option(p, "--embeddings", "tokenizer.embeddings",
                  "collab (as the recipe) | text | latent (synthetic data) | PATH.npy of shape [items, d]")
    schema_option(p, "--text-model", "tokenizer.text_model",
                  "sentence-transformers model name or local path (e.g. sentence-t5-base)")
    schema_option(p, "--collab-dim", "tokenizer.collab_dim", "dimension of collaborative embeddings")
    schema_option(p, "--resolve", "tokenizer.resolve", "collision strategy: move to the nearest free last-level "
                  "code (reassign), append a disambiguation token (extra-token, TIGER), or none (non-bijective, "
                  "for counter-examples)")
    schema_option(p, "--seed", "tokenizer.seed", "seed")
    p.add_argument("--out", required=True, help="output codebook directory (new, or one sidrec made)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing codebook directory at --out")
    p.set_defaults(func=cmd_tokenize)


REGISTER: list = [add_tokenize]


# ----------------------------------------------------------------------------------- train/run
def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None,
                   help="YAML config (see configs/; omitted: the embedded synthetic default)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. --set train.epochs=5 model.backbone.d_model=128")


def _config(a: argparse.Namespace) -> dict:
    from sidrec.config import load_config

    return load_config(a.config, a.set)


def cmd_train(a: argparse.Namespace) -> None:
    import torch.distributed as dist

    from sidrec.pipeline import claim_run_dir, ensure_inputs, head_config, train_one
    from sidrec.run import RunDir
    from sidrec.train.trainer import ddp_setup
    from sidrec.errors import UserError

    cfg = _config(a)
    head = a.head or cfg["model"]["head"]
    cfg = head_config(cfg, head)
    out = Path(a.out)
    distributed = ddp_setup()
    rank = dist.get_rank() if distributed else 0
    failed = None
    if rank == 0:  # rank 0 checks the directory, prepares and tokenizes; the others then load what it wrote
        try:
            claim_run_dir(cfg, out, resume=a.resume, overwrite=a.overwrite)
            data, codebook = ensure_inputs(cfg, RunDir(out), [head])
        except Exception as e:  # noqa: BLE001 - tell the other ranks before failing, or they wait forever
            failed = e
    if distributed:
        flag = [failed is None]
        dist.broadcast_object_list(flag, src=0)
        if not flag[0]:
            dist.destroy_process_group()
            if failed is not None:
                raise failed
            raise UserError("rank 0 could not prepare the run (see its message)")
        if rank != 0:
            data, codebook = ensure_inputs(cfg, RunDir(out), [head])
    elif failed is not None:
        raise failed
    state = train_one(cfg, data, codebook, out, resume=a.resume, overwrite=a.overwrite)
    if rank == 0:
        print(f"trained {head} into {out}: best validation NDCG@10 {state['best']:.4f} at epoch "
              f"{state['best_epoch'] + 1}, {state['step']} steps, {state['train_seconds']} s")
    if distributed:
        dist.destroy_process_group()


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train one model (AR-NTP, FV-MLE or parallel head) into a run directory",
                       description="Prepare the data and codebook the config asks for (if not already in the "
                       "run directory), then train model.head on the shared backbone with AdamW, warmup + "
                       "cosine schedule, gradient clipping and early stopping on validation NDCG@10. "
                       "Checkpoints are atomic; --resume continues a killed run. Launch with torchrun for "
                       "data-parallel training.")
    _add_config_args(p)
    p.add_argument("--head", choices=HEAD_NAMES, default=None,
                   help="override model.head")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue from the run's last checkpoint (refused if a setting that changes the weights differs)")
    again.add_argument("--overwrite", action="store_true", help="train an existing run directory again from scratch")
    p.set_defaults(func=cmd_train)


def cmd_evaluate(a: argparse.Namespace) -> None:
    from sidrec.pipeline import eval_file, evaluate_run

    decodes = (a.decode,) if a.decode else None
    ev = evaluate_run(Path(a.run), decodes=decodes, beam=a.beam, exclude_seen=a.exclude_seen,
                      batch_size=a.batch_size, device=a.device, extra_beams=tuple(a.extra_beams))
    print_eval(ev)
    print(f"wrote {Path(a.run) / eval_file(ev['exclude_seen'])}")



def print_eval(ev: dict) -> None:
    keys = ("recall@1", "recall@5", "recall@10", "recall@20", "ndcg@5", "ndcg@10", "ndcg@20", "mrr")
    print(f"head {ev['head']}  users {ev['n_users']:,}  items {ev['n_items']:,}  seen items "
          f"{'excluded' if ev['exclude_seen'] else 'kept'}")
    print(f"{'split':<6} {'decode':<8} " + " ".join(f"{k:>9}" for k in keys) + f" {'users/s':>9}")
    for split in ("valid", "test"):
        for dec, m in ev.get(split, {}).items():
            if isinstance(m, dict):
                print(f"{split:<6} {dec:<8} " + " ".join(f"{m[k]:>9.4f}" for k in keys) + f" {m['users_per_s']:>9.0f}")
        if "overlap@10" in ev.get(split, {}):
            print(f"{split:<6} overlap@10 of beam and exact top-10: {ev[split]['overlap@10']:.4f}")


def add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="full-ranking leave-one-out metrics of a trained run (eval.json)")
    p.add_argument("run")
    p.add_argument("--decode", choices=["exact", "beam"], default=None,
                   help="exact all-item ranking or beam search (default: both for AR runs, exact otherwise)")
    p.add_argument("--beam", type=int_range(1), default=20, help="beam width (default 20)")
    p.add_argument("--exclude-seen", action=argparse.BooleanOptionalAction, default=None,
                   help="drop items of the input history from rankings (written to eval-seen-excluded.json); "
                        "--no-exclude-seen keeps them (eval.json); default: the run config's eval.exclude_seen")
    p.add_argument("--extra-beams", type=int_range(1), nargs="*", default=[], metavar="B",
                   help="also evaluate beam search at these widths (each under beam<B>)")
    p.add_argument("--batch-size", type=int_range(1), default=1024)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to score (auto: the GPU when there is one)")
    p.set_defaults(func=cmd_evaluate)


def cmd_tune_mix(a: argparse.Namespace) -> None:
    from sidrec.pipeline import MIX_GRID, tune_joint_mix

    rec = tune_joint_mix(Path(a.run), grid=tuple(a.grid or MIX_GRID), exclude_seen=a.exclude_seen, device=a.device,
                         batch_size=a.batch_size)
    for row in rec["curve"]:
        mark = "  <- chosen" if row["mix"] == rec["mix"] else ""
        print(f"mix {row['mix']:.2f}  valid ndcg@10 {row['ndcg@10']:.4f}  recall@10 {row['recall@10']:.4f}{mark}")
    print(f"wrote {rec['file']}: the run now ranks with mix {rec['mix']}")


def add_tune_mix(sub) -> None:
    p = sub.add_parser("tune-mix", help="choose a joint head's ranking weight on validation (training does this)",
                       description="Rank validation users exactly with (1 - mix) log Q_ar + mix log Q_fv for every "
                       "mix of the grid and store the best (NDCG@10) in the run; recommend, evaluate and serve "
                       "then rank with it. `sidrec train` already does this for joint heads.")
    p.add_argument("run")
    p.add_argument("--grid", type=float_range(0, 1), nargs="+", default=None,
                   metavar="MIX", help="weights to try, each in [0, 1] (default 0, 0.1, ..., 1)")
    p.add_argument("--exclude-seen", action=argparse.BooleanOptionalAction, default=None,
                   help="drop items of the input history from rankings (default: the run's selection protocol)")
    p.add_argument("--batch-size", type=int_range(1), default=1024, help="users scored at once")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=cmd_tune_mix)


def cmd_run(a: argparse.Namespace) -> None:
    from sidrec.evaluate.report import results_table
    from sidrec.pipeline import run_pipeline
    from sidrec.run import PipelineDir

    cfg = _config(a)
    out = Path(a.out)
    summary = run_pipeline(cfg, out, resume=not a.fresh)
    print(results_table(summary, "test"))
    print(f"report: {PipelineDir(out).report_path}")


def add_run(sub) -> None:
    p = sub.add_parser("run", help="the whole pipeline: prepare, tokenize, train every head, evaluate, report",
                       description="Runs prepare/synthesise -> embed -> tokenize -> train (each head in "
                       "`heads`) -> evaluate (exact and beam) -> report.md with tables and plots. Stages "
                       "already done in the run directory are reused.")
    _add_config_args(p)
    p.add_argument("--fresh", action="store_true", help="do not resume interrupted training")
    p.set_defaults(func=cmd_run)


def cmd_recommend(a: argparse.Namespace) -> None:
    """A thin layer over `sidrec.Recommender.recommend`."""
    import numpy as np

    from sidrec.api import Recommender
    from sidrec.errors import UserError

    raw = [s.strip() for s in a.history.split(",") if s.strip()]
    if not raw:
        raise UserError("--history needs at least one item id")
    rec = Recommender.load(a.run, device=a.device)
    ids, scores = rec.recommend([raw], k=a.k, decode=a.decode, beam=a.beam, exclude_seen=a.exclude_seen)
    table = rec.data.item_table
    titles = dict(zip(table["item"].astype(str), table["title"].astype(str))) if "title" in table.columns else {}
    print(f"{'rank':>4}  {'item':<14} {'prob':>8}  title")
    for r, (i, lp) in enumerate(zip(ids[0], scores[0]), 1):
        if i:
            print(f"{r:>4}  {i:<14} {float(np.exp(lp)):>8.4f}  {titles.get(i, '')}")


def add_recommend(sub) -> None:
    p = sub.add_parser("recommend", help="top-k next items for a history of raw item ids")
    p.add_argument("run")
    p.add_argument("--history", required=True, help="comma-separated raw item ids, oldest first")
    p.add_argument("-k", type=int_range(1), default=10, help="how many items (default 10)")
    p.add_argument("--decode", choices=["exact", "beam"], default="exact")
    p.add_argument("--beam", type=int_range(1), default=20, help="beam width (default 20)")
    p.add_argument("--exclude-seen", action=argparse.BooleanOptionalAction, default=True,
                   help="never recommend an item of the history (default; --no-exclude-seen keeps them)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to score")
    p.set_defaults(func=cmd_recommend)


REGISTER += [add_train, add_evaluate, add_tune_mix, add_run, add_recommend]


def cmd_export_items(a: argparse.Namespace) -> None:
    """The trained item-ID table as [items, d] float32 .npy: embeddings a later `tokenize
    --embeddings FILE.npy` (or `tokenizer.embeddings: FILE.npy`) can fit semantic IDs on, the
    two-stage recipe of IDs from a trained sequential model's item vectors."""
    import numpy as np

    from sidrec import io
    from sidrec.errors import UserError
    from sidrec.run import RunDir

    out = Path(a.out)
    if out.suffix != ".npy":
        raise UserError("--out must end in .npy", str(out))
    io.check_output_file(out, overwrite=a.overwrite)
    model, _ = RunDir.open(a.run).load_model()
    table = model.backbone.item_emb
    if table is None:
        raise UserError("this run has no item-ID table (model.backbone.item_input: sid)", a.run)
    w = table.weight[: model.n_items].detach().float().numpy()
    with io.atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, w, allow_pickle=False)
    print(f"wrote {out}: {w.shape[0]} items x {w.shape[1]} dims")


def add_export_items(sub) -> None:
    p = sub.add_parser("export-items", help="save a trained run's item vectors as .npy (embeddings for tokenize)")
    p.add_argument("run", help="trained run directory (any head with item-ID inputs)")
    p.add_argument("--out", required=True, help="output FILE.npy, [items, d] float32 (a new file)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_export_items)


REGISTER.append(add_export_items)


def cmd_compare(a: argparse.Namespace) -> None:
    from sidrec import io
    from sidrec.evaluate.compare import compare_runs, format_comparison

    seen = {"config": None, "excluded": True, "kept": False}[a.seen]
    if a.out:
        io.check_output_file(Path(a.out), overwrite=a.overwrite)
    res = compare_runs(a.run_a, a.run_b, split=a.split, exclude_seen=seen, batch_size=a.batch_size)
    print(format_comparison(res))
    if a.out:
        from sidrec.provenance import environment

        io.write_json(Path(a.out), {"env": environment(), "command": "sidrec compare " + " ".join(sys.argv[2:]), **res})
        print(f"wrote {a.out}")


def add_compare(sub) -> None:
    p = sub.add_parser("compare", help="where two trained runs differ, level by level of the semantic-ID trie",
                       description="Splits each run's -log Q(target) into one term per ID level (any head: FV-MLE "
                       "is marginalised over the trie) and ranks with level-swapped hybrids (A's first j tokens, "
                       "B's rest). The trie comes from whichever run has semantic IDs.")
    p.add_argument("run_a", help="trained run directory (A)")
    p.add_argument("run_b", help="trained run directory (B), same data directory")
    p.add_argument("--split", choices=["valid", "test"], default="valid", help="the split to score (default valid)")
    p.add_argument("--seen", choices=["config", "excluded", "kept"], default="config",
                   help="history items in the ranking: as A's config says (default), excluded or kept")
    p.add_argument("--batch-size", type=int_range(1), default=512)
    p.add_argument("--out", help="also write the result as JSON (a new file)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_compare)


REGISTER.append(add_compare)


# ---------------------------------------------------------------------------------------- verify
def cmd_verify(a: argparse.Namespace) -> int:
    """Exit 0 when every check passes, 1 when any fails (2 stays for user errors)."""
    from sidrec import io
    from sidrec.errors import UserError

    if a.synthetic and a.run:
        raise UserError("give a trained RUN directory or --synthetic, not both")
    if a.quick and not a.synthetic:
        raise UserError("--quick applies to --synthetic only")
    if a.synthetic:
        from sidrec.verify.synthetic import SuiteConfig, run_suite

        if not a.out:
            raise UserError("--synthetic needs --out DIR")
        io.check_output_dir(a.out, "verify", overwrite=a.overwrite)
        cfg = SuiteConfig(seed=a.seed) if not a.quick else SuiteConfig(
            seed=a.seed, tab_items=24, tab_samples=20_000, neural_items=60, neural_users=(150, 600), neural_epochs=4)
        res = run_suite(a.out, cfg)
        for c in res["claims"]:
            print(f"{'PASS' if c['pass'] else 'FAIL'}  {c['id']:<26} {c['value']:.3g} (tol {c['tolerance']:.3g})  "
                  f"{c['claim']}")
        print(f"report: {res['report']}  ({res['seconds']['total']} s)")
        return 0 if res["all_pass"] else 1
    if not a.run:
        raise UserError("give a trained RUN directory, or --synthetic --out DIR")
    from sidrec.verify import verify_run

    res = verify_run(a.run, n_contexts=a.contexts)
    for c in res["checks"]:
        extra = f" {c.get('dtype', '')}" if "dtype" in c else ""
        verdict = ("INFO" if c.get("informational") else "PASS" if c["pass"] else "FAIL")
        print(f"{verdict}  {c['check'] + extra:<24} {c['value']:.3g} (tol {c['tolerance']:.3g})"
              f"  {c['claim']}{'' if c['pass'] else ' [below target]' if c.get('informational') else ''}")
        if not c["pass"]:
            print(f"      {failure_detail(c)}")
    print(f"wrote {res['file']}")
    failed = [c["check"] + (f" ({c['dtype']})" if "dtype" in c else "") for c in res["checks"]
              if not c["pass"] and not c.get("informational")]
    if failed:
        print(f"sidrec: verify failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def failure_detail(c: dict) -> str:
    """What exactly failed, in one line: the colliding items, the worst context, the beam overlaps."""
    if c["check"] == "bijection":
        groups = "; ".join(" = ".join(g) for g in c.get("colliding_items", []))
        return f"{int(c['value'])} items share an ID with another item; first groups (raw item ids): {groups}"
    if c["check"] in ("normalization", "loss_identity"):
        return f"worst context: user {c.get('worst_user')} (test history)"
    if c["check"] == "beam_recall":
        return f"overlap with the exact top-{c['k']} by beam width: {c['overlap_by_beam']}"
    return ""


def add_verify(sub) -> None:
    p = sub.add_parser("verify", help="check AR-NTP = FV-MLE on a trained run, or run the synthetic experiments",
                       description="On a trained run: bijection, normalisation of Q over all items, the loss "
                       "identity (token loss = -log Q of the target, exhaustively scored) and beam-search recall "
                       "against exact ranking. With --synthetic: the controlled experiments on data with known "
                       "P* (optimum and neural equivalence, collisions, unconstrained softmax, parallel head).")
    p.add_argument("run", nargs="?", help="trained run directory")
    p.add_argument("--synthetic", action="store_true", help="run the controlled experiments")
    p.add_argument("--out", help="output directory for --synthetic")
    p.add_argument("--contexts", type=int_range(1), default=512, help="test contexts sampled for the run checks")
    p.add_argument("--overwrite", action="store_true", help="--synthetic: replace an existing --out verify directory")
    p.add_argument("--quick", action="store_true",
                   help="a small, fast version of --synthetic (plumbing; its neural claims need not hold: exit 1 possible)")
    p.add_argument("--seed", type=int_range(0, 2**32 - 1), default=0)
    p.set_defaults(func=cmd_verify)


REGISTER.append(add_verify)


# ----------------------------------------------------------------------------------------- serve
def cmd_serve(a: argparse.Namespace) -> None:
    from sidrec.serve import Batching, Limits, serve

    serve(a.run, host=a.host, port=a.port, device=a.device, decode=a.decode, beam=a.beam, threads=a.threads,
          table_precision=a.table_precision,
          batching=Batching(max_batch=a.max_batch, max_wait_ms=a.max_wait_ms, max_queue=a.max_queue,
                            workers=a.workers),
          limits=Limits(max_history=a.max_history, max_k=a.max_k, max_body_bytes=a.max_body_kb * 1024))


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve a trained run over HTTP (JSON; micro-batched decoding)",
                       description="An HTTP JSON service: POST /recommend {history, k, exclude_seen, allow, deny}, "
                       "POST /recommend/batch {requests: [...]}, GET /health, /info, /metrics (Prometheus). "
                       "Concurrent requests are decoded together; filters act inside constrained decoding. "
                       "SIGINT/SIGTERM finish the requests in flight, then exit.")
    p.add_argument("run", help="trained run directory (AR-NTP, FV-MLE or parallel head)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int_range(0, 65535), default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument("--decode", choices=["exact", "beam"], default=None,
                   help="default decoding (beam for AR-NTP runs, exact otherwise); a request may choose its own")
    p.add_argument("--beam", type=int_range(1, 512), default=20, help="default beam width (default 20)")
    p.add_argument("--max-batch", type=int_range(1, 4096), default=64,
                   help="users decoded in one batched call (default 64; 1: one request per call)")
    p.add_argument("--max-wait-ms", type=float_range(0, 1000), default=0.0,
                   help="under concurrent load, how long a batch may wait to fill (default 0: the batch in "
                   "flight is the window in which the next one fills)")
    p.add_argument("--max-queue", type=int_range(1), default=1024,
                   help="users waiting for the decoder before new requests get 503 (default 1024)")
    p.add_argument("--max-history", type=int_range(1), default=2000, help="items per history (default 2000)")
    p.add_argument("--max-k", type=int_range(1), default=1000, help="largest k a request may ask for (default 1000)")
    p.add_argument("--max-body-kb", type=int_range(1), default=4096, help="largest request body (default 4096 KiB)")
    p.add_argument("--workers", type=int_range(1, 64), default=1,
                   help="decode processes, each a copy of the model decoding one batch at a time (default 1; "
                   "more where cores are to spare)")
    p.add_argument("--threads", type=int_range(1), default=None,
                   help="torch intra-op threads of each decode process (default: half the CPU cores)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to decode")
    p.add_argument("--table-precision", default="float32", choices=PRECISIONS,
                   help="keep the item tables of a node-table model (AR-NTP, joint) in this precision: 1/2 "
                   "(float16, bfloat16) or 1/4 (int8) of their memory; scores are still computed in float32 "
                   "(default float32)")
    p.set_defaults(func=cmd_serve)


REGISTER.append(add_serve)


# ----------------------------------------------------------------------------------------- items
def cmd_items(a: argparse.Namespace) -> None:
    from sidrec.run import catalog
    from sidrec.run import RunDir

    if a.items_cmd == "list":
        rd = RunDir.open(a.run)
        active = rd.catalog_version() or "v0000"
        print(f"{'':2}{'version':<8} {'items':>9} {'added':>7}  created")
        print(f"{'*' if active == 'v0000' else ' ':2}{'v0000':<8} {rd.config()['n_items']:>9,} {'':>7}  (as trained)")
        for v in catalog.versions(a.run):
            print(f"{'*' if active == v['version'] else ' ':2}{v['version']:<8} {v['n_items']:>9,} {v['added']:>7,}  {v['created']}")
        return
    if a.items_cmd == "use":
        RunDir.open(a.run)
        catalog.use(a.run, a.version)
        print(f"{a.run}: catalogue {a.version} is active (a running server picks it up on POST /admin/reload or SIGHUP)")
        return
    from sidrec.api import Recommender

    rec = Recommender.load(a.run, device="cpu")
    info = rec.add_items(a.items, embeddings=a.embeddings, id_col=a.id_col, vectors=a.vectors)
    if not info.get("added"):
        print(f"nothing added: all {info['already_present']} items are already in the catalogue")
        return
    ids = info["ids"]
    print(f"{a.run}: catalogue {info['version']} ({info['n_items']:,} items): added {info['added']:,}"
          + (f", {info['already_present']:,} already present (unchanged)" if info["already_present"] else ""))
    print(f"  semantic IDs: {ids['direct']:,} nearest ID free, {ids['resolved']:,} resolved under their own prefix, "
          f"{ids['fallback']:,} fell back to the next prefix with room")
    if ids["full_prefixes"]:
        print(f"  full prefixes (no free last-level code left): {ids['full_prefixes'][:5]}"
              + (" ..." if len(ids["full_prefixes"]) > 5 else ""))


def add_items(sub) -> None:
    p = sub.add_parser("items", help="add new items to a trained run (no retraining), list or switch catalogue versions")
    ic = p.add_subparsers(dest="items_cmd", required=True, metavar="{add,list,use}")
    q = ic.add_parser("add", help="give new items semantic IDs with the fitted tokenizer; a new catalogue version",
                      description="New items get a semantic ID from their content with the run's fitted tokenizer "
                      "(no refit; existing IDs never move) and are recommendable at once: AR-NTP scores them "
                      "through their tokens; what the model never trained for them (item vector, node bias) is "
                      "taken from their nearest trained item by content (--vectors content, the default) or is the "
                      "mean of their ID prefix (--vectors prefix-mean). Written as a new catalogue version of the run; the previous "
                      "one is kept (`sidrec items use`). FV-MLE runs refuse: a new item has no output vector.")
    q.add_argument("run", help="trained run directory (AR-NTP or parallel head)")
    q.add_argument("--items", required=True, help="new items: JSONL, CSV/TSV or Parquet with an id column and text fields")
    q.add_argument("--id-col", default="item_id", help="id column of --items (default item_id)")
    q.add_argument("--embeddings", default=None,
                   help="NEW.npy [new items, d] in the tokenizer's embedding space (default: embed the items' text, "
                   "for runs whose IDs were fitted on text)")
    q.add_argument("--vectors", choices=["content", "prefix-mean"], default="content",
                   help="a new item's item vector: that of its nearest trained item by content (default), or "
                   "the mean of its ID prefix's items")
    q.set_defaults(func=cmd_items)
    q = ic.add_parser("list", help="the run's catalogue versions (* = active)")
    q.add_argument("run")
    q.set_defaults(func=cmd_items)
    q = ic.add_parser("use", help="make a catalogue version active (v0000: the items the run was trained on)")
    q.add_argument("run")
    q.add_argument("version", help="e.g. v0002")
    q.set_defaults(func=cmd_items)


REGISTER.append(add_items)
