"""The end-to-end pipeline behind `sidrec train` and `sidrec run`.

prepare (or synthesise) -> embed -> tokenize -> train each head -> evaluate -> report.
Each stage writes its artefact atomically with the fingerprint of its inputs (`sidrec.run`) and
is reused only when that fingerprint matches what the config asks for now, so an interrupted
`sidrec run` continues where it stopped (training resumes mid-run) and a changed setting remakes
exactly the stages it affects, saying so.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sidrec import io
from sidrec import run as rundir
from sidrec.config import dump, model_config, resolve_path, train_config
from sidrec.data import SequenceData, prepare, read
from sidrec.errors import UserError
from sidrec.model import head_kind, head_settings, needs_codebook
from sidrec.run import PipelineDir, RunDir
from sidrec.tokenize import Codebook, fit_codebook


def say(msg: str) -> None:
    """Progress the user must see (a stage reused or made again, and why); stderr keeps stdout clean."""
    print(f"sidrec: {msg}", file=sys.stderr, flush=True)


def _resolver(cfg: dict):
    return lambda p: resolve_path(cfg, p)


def data_fingerprint(cfg: dict) -> str:
    """The fingerprint of the data a config names, known before anything is prepared."""
    d = cfg["data"]
    if d.get("dir"):
        return rundir.dir_fingerprint(resolve_path(cfg, d["dir"]), "data")
    return rundir.digest(rundir.data_inputs(d, _resolver(cfg)))


def ensure_data(cfg: dict, out: Path) -> SequenceData:
    """The config's data: its data.dir, or prepared into the data directory `out` (reused when made
    from the same inputs)."""
    d = cfg["data"]
    if d.get("dir"):
        return SequenceData.load(resolve_path(cfg, d["dir"]))
    if not d.get("synthetic") and not d.get("format"):
        raise UserError("the config's data section needs one of: dir, synthetic, format + path")
    inputs = rundir.data_inputs(d, _resolver(cfg))
    status, changed = rundir.stage_status(out, "data", inputs)
    if status == "same":
        return SequenceData.load(out)
    if status == "stale":
        say(f"{out} was prepared from other inputs ({', '.join(changed)}): preparing it again")
    return write_data(d, out, inputs, _resolver(cfg))


def write_data_streamed(d: dict, out: Path, inputs: dict) -> dict:
    """`data prepare --engine duckdb`: the directory `out` prepared out of core (`sidrec.data.stream`);
    returns its statistics, read from stats.json: loading the sequences back would undo the point."""
    from sidrec.data.stream import prepare_parquet

    tc = d.get("time_col")
    prepare_parquet(d["path"], out, user_col=d["user_col"], item_col=d["item_col"],
                    time_col=None if tc is None or str(tc).lower() == "none" else tc, kcore_k=d["kcore"],
                    dedup=d["dedup"], max_seq_len=d["max_seq_len"], meta=d.get("meta"),
                    item_id_col=d.get("item_id_col"), memory_limit=d["memory_limit"], shard_rows=d["shard_rows"],
                    marker=rundir.marker_fields(inputs))
    return io.read_json(out / "stats.json")


def write_data(d: dict, out: Path, inputs: dict, resolve=lambda p: p) -> SequenceData:
    """Make the prepared data directory `out` from data settings `d` (a config's data section; the
    CLI's `data prepare` / `data synth` flags and `sidrec.synthetic` speak the same keys): the
    synthetic generator, or a log read and prepared. `inputs` (run.data_inputs) go into its marker.
    One place, so that every entry point reads a file the same way (e.g. time_col "none")."""
    marker = rundir.marker_fields(inputs)
    if d.get("synthetic"):
        from sidrec.data.synth import make_synthetic, save_synthetic

        data, world = make_synthetic(**d["synthetic"])
        save_synthetic(data, world, out, marker)
        return SequenceData.load(out)
    kw = {"item_id_col": d["item_id_col"]} if d.get("item_id_col") else {}
    if d["format"] == "csv":
        tc = d.get("time_col")
        kw.update(user_col=d["user_col"], item_col=d["item_col"], sep=d["sep"],
                  time_col=None if tc is None or str(tc).lower() == "none" else tc)
    ds = read(d["format"], resolve(d["path"]), resolve(d.get("meta")), **kw)
    prepare(ds, kcore_k=d["kcore"], dedup=d["dedup"], max_seq_len=d["max_seq_len"]).save(out, marker=marker)
    return SequenceData.load(out)


def codebook_inputs(cfg: dict, data_fp: str) -> dict:
    return rundir.codebook_inputs(cfg["tokenizer"], data_fp, _resolver(cfg))


def ensure_codebook(cfg: dict, data: SequenceData, out: Path) -> Codebook:
    """A codebook fitted with the config's tokenizer settings on `data`, in the codebook directory
    `out` (reused when made from the same inputs)."""
    t = cfg["tokenizer"]
    inputs = codebook_inputs(cfg, rundir.dir_fingerprint(data.path, "data"))
    status, changed = rundir.stage_status(out, "codebook", inputs)
    if status == "same":
        cb = Codebook.load(out)
        if cb.n_items == data.n_items:
            return cb
        changed = ["n_items"]
    if status != "new":
        say(f"{out} was fitted on other inputs ({', '.join(changed)}): fitting it again")
    source = str(t["embeddings"])
    cb = fit_tokenizer(data, t, resolve_path(cfg, source) if source.endswith(".npy") else source)
    cb.save(out, marker=rundir.marker_fields(inputs))
    return cb


def fit_tokenizer(data: SequenceData, t: dict, source: str | Path) -> Codebook:
    """Embed `data`'s items from `source` (collab | text | latent | a .npy path) and fit the tokenizer
    settings `t` (a config's tokenizer section); the settings travel in the codebook's meta, which
    `items add` reads to embed new items the same way. One place for `sidrec tokenize` and training."""
    from sidrec.embed import get_embeddings

    emb = get_embeddings(data, str(source), model=t["text_model"], dim=t["collab_dim"], seed=t["seed"])
    cb = fit_codebook(emb, t["method"], t["levels"], t["codebook_size"], resolve_strategy=t["resolve"],
                      seed=t["seed"], embeddings=str(t["embeddings"]))
    cb.meta["tokenizer"] = {k: (str(v) if k == "embeddings" else v) for k, v in t.items()}
    return cb


def needs_semantic_ids(cfg: dict, heads: list[str]) -> bool:
    return any(needs_codebook({**cfg["model"], **head_settings(h)}) for h in heads)


def ensure_inputs(cfg: dict, work: RunDir | PipelineDir, heads: list[str]) -> tuple[SequenceData, Codebook | None]:
    """The data, and the codebook when a head or the item input needs semantic IDs, kept in `work`."""
    data = ensure_data(cfg, work.data_path)
    return data, ensure_codebook(cfg, data, work.codebook_path) if needs_semantic_ids(cfg, heads) else None


def head_config(cfg: dict, head: str) -> dict:
    """The single-model config of one head of a multi-head run."""
    c = copy.deepcopy(cfg)
    c["model"].update(head_settings(head))
    c["train"]["exclude_seen"] = c["eval"]["exclude_seen"]  # select on the protocol we report
    c["heads"] = [head]
    return c


def codes_fingerprint(codebook: Codebook | None) -> str | None:
    """What a model depends on in a codebook: its codes and sizes (content hash)."""
    return None if codebook is None else rundir.array_digest(codebook.codes, np.array(codebook.sizes))


def model_inputs(cfg: dict, data: SequenceData | str, codebook: Codebook | str | None) -> dict:
    """A head config's model-stage inputs; FV-MLE on item-ID inputs does not read the codebook."""
    data_fp = data if isinstance(data, str) else rundir.dir_fingerprint(data.path, "data")
    uses_ids = needs_codebook(cfg["model"])
    cb_fp = codebook if isinstance(codebook, str) or codebook is None else codes_fingerprint(codebook)
    return rundir.model_inputs(cfg, data_fp, cb_fp if uses_ids else None)


def check_resume(cfg: dict, run: Path) -> None:
    """Refuse `train --resume` with changed settings before anything is written, naming the keys of
    whichever stage (data, tokenizer, model/train) changed."""
    rd = RunDir(run)
    if not (rd.has_config() or rd.has_products()):
        return
    stages = []
    if not cfg["data"].get("dir"):
        stages.append(("data", rd.data_path, rundir.data_inputs(cfg["data"], _resolver(cfg))))
    data_fp = data_fingerprint(cfg)
    if needs_semantic_ids(cfg, cfg["heads"]):
        stages.append(("codebook", rd.codebook_path, codebook_inputs(cfg, data_fp)))
    for kind, path, inputs in stages:
        status, changed = rundir.stage_status(path, kind, inputs)
        if status == "stale":
            raise UserError(f"cannot --resume: the run's {kind} was made with other settings for "
                            f"{', '.join(changed)}; resume with the same values, or --overwrite to retrain", str(run))
    inputs = model_inputs(cfg, data_fp, rd.codebook())
    RunDir.create(run, inputs, resume=True)  # raises naming the model/train keys that changed


def claim_run_dir(cfg: dict, run: Path, resume: bool = False, overwrite: bool = False) -> None:
    """Make `run` a run directory `sidrec train` may write, or refuse before anything is written: a
    foreign directory, a trained run without --resume/--overwrite, a --resume with changed settings."""
    d = cfg["data"]
    inputs = [resolve_path(cfg, d.get("path")), resolve_path(cfg, d.get("meta"))]
    exists = rundir.check_claim(run, resume=resume, overwrite=overwrite, inputs=inputs)
    if resume and not overwrite:
        check_resume(cfg, run)
    if overwrite and exists:
        RunDir(run).clear()
    io.own_dir(run, "run")


def train_one(cfg: dict, data: SequenceData, codebook: Codebook | None, run: Path, resume: bool = False,
              overwrite: bool = False) -> dict:
    """Train the model of `cfg` into run dir `run` (config.yaml, codebook/, weights, metrics).

    An existing run is continued (`resume`, same settings only) or replaced (`overwrite`)."""
    from sidrec.evaluate import validator
    from sidrec.model import SeqRecModel
    from sidrec.train.trainer import Trainer, dist_info

    mc, tc = model_config(cfg), train_config(cfg)
    rank, _ = dist_info()
    if rank == 0:
        rd = RunDir.create(run, model_inputs(cfg, data, codebook), resume=resume, overwrite=overwrite)
        resolved = copy.deepcopy(cfg)
        resolved["n_items"] = data.n_items
        where = Path(data.path).resolve()
        inside = run.resolve() in where.parents
        resolved["data"]["dir"] = str(where.relative_to(run.resolve()) if inside else where)
        rd.write_config(resolved)
        if codebook is not None:
            rd.save_codebook(codebook)
    else:
        rd = RunDir(run)
    torch.manual_seed(tc.seed)
    model = SeqRecModel(mc, data.n_items, codebook)
    model.head.set_target_counts(torch.from_numpy(data.train_target_counts()))  # for a logQ sampler
    validate = validator(data, exclude_seen=tc.exclude_seen, batch_size=tc.eval_batch_size,
                         n_users=tc.eval_users, seed=tc.seed)
    t0 = time.perf_counter()
    state = Trainer(model, data, tc, rd, validate).fit(resume=resume)
    state["train_seconds"] = round(time.perf_counter() - t0, 1)
    if model.head.mix is not None and rank == 0:  # a ranking weight: chosen on validation, like the checkpoint
        del model  # the tuning loads the best-validation weights
        state["joint_mix"] = tune_joint_mix(run, data=data, exclude_seen=tc.exclude_seen, device=tc.device,
                                            batch_size=tc.eval_batch_size)["mix"]
    return state


MIX_GRID = tuple(round(0.1 * i, 1) for i in range(11))  # 0: AR-NTP alone ... 1: FV-MLE alone


def tune_joint_mix(run: Path, *, data: SequenceData | None = None, grid: tuple[float, ...] = MIX_GRID,
                   exclude_seen: bool | None = None, device: str = "auto", batch_size: int = 1024) -> dict:
    """Choose a joint head's ranking weight on the validation split (NDCG@10 of exact ranking; ties go
    to the smaller weight, i.e. toward the AR head that proposes the candidates) and store it in the
    run, where every later load applies it. exclude_seen None: the run's checkpoint-selection protocol."""
    from sidrec.evaluate import mix_curve
    from sidrec.train.config import pick_device

    grid = tuple(sorted(set(float(m) for m in grid)))
    if not grid or not all(0 <= m <= 1 for m in grid):
        raise UserError(f"every mix of the grid must be in [0, 1] (got {list(grid)})", "grid")
    device = pick_device(device)
    rd = RunDir.open(run)
    model, cfg = rd.load_model(device, version=None)
    if model.head.mix is None:
        raise UserError(f"only a joint head has a mixture weight; this run's head is {model.cfg.head}", str(run))
    if exclude_seen is None:
        exclude_seen = bool(cfg["train"].get("exclude_seen", False))
    data = data or rd.data(cfg, version=None)
    if data.n_items != model.n_items:
        raise UserError(f"the run's data directory now has {data.n_items} items, the model {model.n_items}",
                        str(rd.data_dir(cfg)))
    curve = mix_curve(model, data, list(grid), exclude_seen=exclude_seen, batch_size=batch_size, device=device)
    ndcg = {m: curve[m]["ndcg@10"] for m in grid}
    best = max(grid, key=lambda m: (ndcg[m], -m))
    rec = {"mix": best, "metric": "valid ndcg@10, exact ranking", "exclude_seen": exclude_seen,
           "curve": [{"mix": m, "ndcg@10": ndcg[m], "recall@10": curve[m]["recall@10"]} for m in grid]}
    return {**rec, "file": str(rd.write_joint_mix(rec))}


def evaluate_run(run: Path, *, decodes: tuple[str, ...] | None = None, beam: int = 20,
                 exclude_seen: bool | None = None,
                 batch_size: int = 1024, splits=("valid", "test"), device: str = "auto",
                 data: SequenceData | None = None, write: bool = True, extra_beams: tuple[int, ...] = ()) -> dict:
    """Evaluate a trained run on valid and test; AR runs get exact and beam plus their overlap.

    exclude_seen None: the protocol of the run's own config (the one its checkpoint was selected on).
    device "auto": the GPU when there is one (as training does).
    extra_beams: more beam widths, each under `beam<B>` (how much a wider beam recovers; for a joint
    head, how many AR candidates the FV rescoring needs to match the exact mixture).
    """
    from sidrec.evaluate import evaluate_split, overlap_at
    from sidrec.train.config import pick_device

    device = pick_device(device)
    rd = RunDir.open(run)
    # the active catalogue version, unless the caller's data is the catalogue the run was trained on
    version = None if data is not None and data.n_items == int(rd.config()["n_items"]) else rd.catalog_version()
    model, cfg = rd.load_model(device, version=version)
    if exclude_seen is None:
        exclude_seen = bool(cfg.get("eval", {}).get("exclude_seen", False))
    data = data or rd.data(cfg, version=version)
    if data.n_items != model.n_items:
        raise UserError(f"the run's data directory now has {data.n_items} items, the model {model.n_items}",
                        str(rd.data_dir(cfg)))
    is_ar = model.supports_beam
    decodes = decodes or (("exact", "beam") if is_ar else ("exact",))
    if ("beam" in decodes or extra_beams) and not is_ar:
        raise UserError("beam search needs an AR-NTP run; this run's head is " + model.cfg.head)
    out: dict = {"head": model.cfg.head, "constrained": model.cfg.constrained, "n_users": data.n_users,
                 "n_items": data.n_items, "catalog_version": version, "exclude_seen": exclude_seen, "protocol":
                 "leave-one-out, full ranking over all items (no sampled negatives)", "joint_mix": rd.joint_mix()}
    if model.head.mix is not None:
        out["mix"] = model.head.mix  # the weight ranked with: tuned, else the config's
    widths = {dec: beam for dec in decodes} | {f"beam{b}": b for b in extra_beams}
    for split in splits:
        out[split] = {}
        lists = {}
        for dec, width in widths.items():
            t = time.perf_counter()
            m = evaluate_split(model, data, split, decode="exact" if dec == "exact" else "beam", beam=width,
                               batch_size=batch_size, exclude_seen=exclude_seen, device=device, return_lists=True)
            secs = time.perf_counter() - t
            lists[dec] = m.pop("_lists")
            m.pop("_users"), m.pop("_ranks")
            m["seconds"] = round(secs, 2)
            m["users_per_s"] = round(m["n_users"] / max(secs, 1e-9), 1)
            out[split][dec] = m
        if "exact" in lists and "beam" in lists:
            out[split]["overlap@10"] = overlap_at(lists["beam"], lists["exact"], 10)
    if write:
        rd.write_eval(out)
    return out


eval_file = rundir.eval_file


def run_pipeline(cfg: dict, out: Path, resume: bool = True) -> dict:
    """Everything: data, codebook, one model per head, evaluation, report. A stage already in `out`
    is reused only if it was made from the same inputs (fingerprints); otherwise it is made again
    and the reason printed. `resume`: continue an interrupted training of unchanged settings."""
    from sidrec.evaluate.report import write_report

    d = cfg["data"]
    emb = str(cfg["tokenizer"]["embeddings"])
    inputs = [resolve_path(cfg, d.get("path")), resolve_path(cfg, d.get("meta")),
              resolve_path(cfg, emb) if emb.endswith(".npy") else None]
    pdir = PipelineDir(out)
    pdir.claim(inputs)
    pdir.write_config(dump(cfg))
    timings = {}
    t = time.perf_counter()
    data = ensure_data(cfg, pdir.data_path)
    timings["data"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    codebook = ensure_codebook(cfg, data, pdir.codebook_path) if needs_semantic_ids(cfg, cfg["heads"]) else None
    timings["tokenize"] = round(time.perf_counter() - t, 1)
    results = {}
    for head in cfg["heads"]:
        t = time.perf_counter()
        results[head] = _head_stage(cfg, head, data, codebook, pdir.head(head).path, resume)
        timings[head] = round(time.perf_counter() - t, 1)
    summary = {"results": results, "timings_s": timings, "data": data.stats()}
    if codebook is not None:
        summary["codebook"] = codebook.to_json()
    if (Path(data.path) / "world.npz").exists():
        from sidrec.data.synth import bayes_optimal, load_world

        world = load_world(data.path)
        if len(world.latent) != data.n_items:
            raise UserError(f"the synthetic world has {len(world.latent)} items, the data {data.n_items}",
                            str(Path(data.path) / "world.npz"))
        summary["bayes_optimal"] = {s: bayes_optimal(world, data, s) for s in ("valid", "test")}
    pdir.write_summary(summary)
    write_report(pdir, summary, cfg)
    return summary


def _head_stage(cfg: dict, head: str, data: SequenceData, codebook: Codebook | None, run: Path,
                resume: bool) -> dict:
    """One head of `sidrec run`: reuse its model and evaluation when their inputs are unchanged."""
    hc = head_config(cfg, head)
    ev_cfg = cfg["eval"]
    status, changed = rundir.stage_status(run, "run", model_inputs(hc, data, codebook))
    if status == "stale":
        say(f"{run} was trained with other settings ({', '.join(changed)}): training it again")
    if not (status == "same" and RunDir(run).training_done()):
        go_on = resume and status == "same"  # an interrupted training of the same settings
        train_one(hc, data, codebook, run, resume=go_on, overwrite=status != "new" and not go_on)
    elif head_kind(hc["model"]).mix and RunDir(run).joint_mix() is None:  # killed before its mix was chosen
        tune_joint_mix(run, data=data, exclude_seen=hc["train"]["exclude_seen"], device=hc["train"]["device"])
    decodes = ("exact", "beam") if head_kind(hc["model"]).beam else ("exact",)
    ev = RunDir(run).read_eval(ev_cfg["exclude_seen"], ev_cfg["beam"], decodes)
    if ev is None:
        ev = evaluate_run(run, beam=ev_cfg["beam"], exclude_seen=ev_cfg["exclude_seen"],
                          batch_size=ev_cfg["batch_size"], data=data)
    return ev

