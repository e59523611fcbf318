"""The end-to-end pipeline behind `sidrec train` and `sidrec run`.

prepare (or synthesise) -> embed -> tokenize -> train each head -> evaluate -> report.
Each stage writes its artefact atomically and is skipped when the artefact is already there,
so an interrupted `sidrec run` continues where it stopped (training resumes mid-run).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch

from sidrec import io
from sidrec.config import dump, model_config, resolve_path, train_config
from sidrec.data import SequenceData, prepare, read
from sidrec.errors import UserError
from sidrec.tokenize import Codebook, fit_codebook


def ensure_data(cfg: dict, work: Path) -> SequenceData:
    d = cfg["data"]
    if d.get("dir"):
        return SequenceData.load(resolve_path(cfg, d["dir"]))
    out = work / "data"
    if (out / "sequences.npz").exists():
        return SequenceData.load(out)
    if d.get("synthetic"):
        from sidrec.data.synth import make_synthetic, save_synthetic

        data, world = make_synthetic(**d["synthetic"])
        save_synthetic(data, world, out)
    elif d.get("format"):
        kw = {"item_id_col": d["item_id_col"]} if d.get("item_id_col") else {}
        ds = read(d["format"], resolve_path(cfg, d["path"]), resolve_path(cfg, d.get("meta")), **kw)
        prepare(ds, kcore_k=d["kcore"], dedup=d["dedup"], max_seq_len=d["max_seq_len"]).save(out)
    else:
        raise UserError("the config's data section needs one of: dir, synthetic, format + path")
    return SequenceData.load(out)


def ensure_codebook(cfg: dict, data: SequenceData, work: Path) -> Codebook:
    from sidrec.embed import get_embeddings

    t = cfg["tokenizer"]
    out = work / "codebook"
    settings = {k: (str(v) if k == "embeddings" else v) for k, v in t.items()}
    if (out / "codebook.npz").exists():  # reuse only a codebook fitted with exactly these settings
        cb = Codebook.load(out)
        if cb.meta.get("tokenizer") == settings and cb.n_items == data.n_items:
            return cb
    source = str(t["embeddings"])
    if source.endswith(".npy"):
        source = resolve_path(cfg, source)
    emb = get_embeddings(data, source, model=t["text_model"], dim=t["collab_dim"], seed=t["seed"])
    cb = fit_codebook(emb, t["method"], t["levels"], t["codebook_size"], resolve_strategy=t["resolve"],
                      seed=t["seed"], embeddings=str(t["embeddings"]))
    cb.meta["tokenizer"] = settings
    cb.save(out)
    return cb


def needs_semantic_ids(cfg: dict, heads: list[str]) -> bool:
    return any(h != "fv" for h in heads) or cfg["model"]["backbone"]["item_input"] != "id"


def ensure_inputs(cfg: dict, work: Path, heads: list[str]) -> tuple[SequenceData, Codebook | None]:
    """The data, and the codebook when a head or the item input needs semantic IDs."""
    data = ensure_data(cfg, work)
    return data, ensure_codebook(cfg, data, work) if needs_semantic_ids(cfg, heads) else None


def head_config(cfg: dict, head: str) -> dict:
    """The single-model config of one head of a multi-head run."""
    c = copy.deepcopy(cfg)
    c["model"]["head"] = "ar" if head.startswith("ar") else head
    if head == "ar-unconstrained":  # token-level softmax over the whole vocabulary: no item vectors
        c["model"].update(constrained=False, item_vectors="none", node_bias=False)
    c["train"]["exclude_seen"] = c["eval"]["exclude_seen"]  # select on the protocol we report
    c["heads"] = [head]
    return c


def train_one(cfg: dict, data: SequenceData, codebook: Codebook | None, run: Path, resume: bool = False) -> dict:
    """Train the model of `cfg` into run dir `run` (config.yaml, codebook/, weights, metrics)."""
    from sidrec.model import SeqRecModel
    from sidrec.train.trainer import Trainer, _dist_info

    mc, tc = model_config(cfg), train_config(cfg)
    run.mkdir(parents=True, exist_ok=True)
    resolved = copy.deepcopy(cfg)
    resolved["n_items"] = data.n_items
    resolved["data"]["dir"] = str(Path(data.path).resolve())
    rank, _ = _dist_info()
    if rank == 0:
        io.write_text(run / "config.yaml", dump(resolved))
        if codebook is not None:
            codebook.save(run / "codebook")
    torch.manual_seed(tc.seed)
    model = SeqRecModel(mc, data.n_items, codebook)
    t0 = time.perf_counter()
    state = Trainer(model, data, tc, run).fit(resume=resume)
    state["train_seconds"] = round(time.perf_counter() - t0, 1)
    return state


def evaluate_run(run: Path, *, decodes: tuple[str, ...] | None = None, beam: int = 20,
                 exclude_seen: bool | None = None,
                 batch_size: int = 1024, splits=("valid", "test"), device: str = "auto",
                 data: SequenceData | None = None) -> dict:
    """Evaluate a trained run on valid and test; AR runs get exact and beam plus their overlap.

    exclude_seen None: the protocol of the run's own config (the one its checkpoint was selected on).
    device "auto": the GPU when there is one (as training does).
    """
    from sidrec.evaluate import evaluate_split, overlap_at
    from sidrec.train.trainer import load_model, pick_device

    device = pick_device(device)
    model, cfg = load_model(run, device)
    if exclude_seen is None:
        exclude_seen = bool(cfg.get("eval", {}).get("exclude_seen", False))
    data = data or SequenceData.load(cfg["data"]["dir"])
    is_ar = model.cfg.head == "ar"
    decodes = decodes or (("exact", "beam") if is_ar else ("exact",))
    if "beam" in decodes and not is_ar:
        raise UserError("beam search needs an AR-NTP run; this run's head is " + model.cfg.head)
    out: dict = {"head": model.cfg.head, "constrained": model.cfg.constrained, "n_users": data.n_users,
                 "n_items": data.n_items, "exclude_seen": exclude_seen, "protocol":
                 "leave-one-out, full ranking over all items (no sampled negatives)"}
    for split in splits:
        out[split] = {}
        lists = {}
        for dec in decodes:
            t = time.perf_counter()
            m = evaluate_split(model, data, split, decode=dec, beam=beam, batch_size=batch_size,
                               exclude_seen=exclude_seen, device=device, return_lists=True)
            secs = time.perf_counter() - t
            lists[dec] = m.pop("_lists")
            m.pop("_users"), m.pop("_ranks")
            m["seconds"] = round(secs, 2)
            m["users_per_s"] = round(m["n_users"] / max(secs, 1e-9), 1)
            out[split][dec] = m
        if "exact" in lists and "beam" in lists:
            out[split]["overlap@10"] = overlap_at(lists["beam"], lists["exact"], 10)
    io.write_json(run / eval_file(exclude_seen), out)
    return out


def eval_file(exclude_seen: bool) -> str:
    """The two protocols get their own files, so neither overwrites the other."""
    return "eval-seen-excluded.json" if exclude_seen else "eval.json"


def run_pipeline(cfg: dict, out: Path, resume: bool = True) -> dict:
    """Everything: data, codebook, one model per head, evaluation, report."""
    from sidrec.evaluate.report import write_report

    out.mkdir(parents=True, exist_ok=True)
    io.write_text(out / "config.yaml", dump(cfg))
    timings = {}
    t = time.perf_counter()
    data = ensure_data(cfg, out)
    timings["data"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    codebook = ensure_codebook(cfg, data, out) if needs_semantic_ids(cfg, cfg["heads"]) else None
    timings["tokenize"] = round(time.perf_counter() - t, 1)
    results = {}
    for head in cfg["heads"]:
        run = out / head
        hc = head_config(cfg, head)
        t = time.perf_counter()
        done = run / eval_file(cfg["eval"]["exclude_seen"])
        if not done.exists():
            train_one(hc, data, codebook, run, resume=resume)
            ev = evaluate_run(run, beam=cfg["eval"]["beam"], exclude_seen=cfg["eval"]["exclude_seen"],
                              batch_size=cfg["eval"]["batch_size"], data=data)
        else:
            ev = io.read_json(done)
        timings[head] = round(time.perf_counter() - t, 1)
        results[head] = ev
    summary = {"results": results, "timings_s": timings, "data": data.stats()}
    if codebook is not None:
        summary["codebook"] = codebook.to_json()
    if (Path(data.path) / "world.npz").exists():
        from sidrec.data.synth import bayes_optimal, load_world

        world = load_world(data.path)
        summary["bayes_optimal"] = {s: bayes_optimal(world, data, s) for s in ("valid", "test")}
    io.write_json(out / "summary.json", summary)
    write_report(out, summary, cfg)
    return summary


def user_history(data: SequenceData, raw_items: list[str]) -> np.ndarray:
    """Map raw item ids to internal ids; unknown ids are a user error listing them."""
    raw = data.raw_item_ids()
    order = np.argsort(raw)
    pos = np.searchsorted(raw[order], raw_items).clip(max=len(raw) - 1)
    found = raw[order][pos] == np.asarray(raw_items)
    if not found.all():
        missing = [r for r, f in zip(raw_items, found) if not f]
        raise UserError(f"unknown item id(s): {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
    return order[pos]
