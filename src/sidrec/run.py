"""The run directory: one module owns its layout, reads and writes every file in it, and records
what each stage was made from.

Layout of a run (one trained model):

    .sidrec.json          marker: kind "run", the stage's inputs and their fingerprint
    config.yaml           the resolved config (n_items, absolute data.dir)
    codebook/             the semantic IDs the model was built on (absent for FV-MLE on item ids)
    model.safetensors     the best weights on validation
    trainer_state.pt      the latest checkpoint (model, optimizer, schedule, RNG, counters)
    metrics.jsonl         one JSON line per log step and per epoch: deterministic values only
    timings.jsonl         the same steps' wall-clock figures (seconds, throughput)
    eval.json, eval-seen-excluded.json, verify.json, report.md

Fingerprints. Every stage records its *inputs* as a flat dict of setting -> value (plus the
fingerprints of the stages it was built on and, for files, a content hash), and the digest of
that dict. A stage is reused only when the inputs it would be made from now have the same digest;
otherwise `sidrec run` makes it again and says which settings changed, and `train --resume`
refuses, naming them. The package version is an input of every stage, so results from another
version of sidrec are never passed off as current; the git commit is recorded, not compared.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from sidrec import io
from sidrec.version import __version__
from sidrec.errors import NonBijectiveWarning, UserError
from sidrec.provenance import code_state, environment, label  # noqa: F401 (environment: re-exported)
from sidrec.config import flat_keys

CONFIG, WEIGHTS, STATE = "config.yaml", "model.safetensors", "trainer_state.pt"
METRICS, TIMINGS, CODEBOOK = "metrics.jsonl", "timings.jsonl", "codebook"
EVALS = ("eval.json", "eval-seen-excluded.json")
JOINT_MIX = "joint-mix.json"  # a joint head's ranking weight, chosen on validation after training
PRODUCTS = (WEIGHTS, STATE, METRICS, TIMINGS, JOINT_MIX, *EVALS, "verify.json", "report.md")
io.register_entries("run", {CONFIG, CODEBOOK, "data", "catalog", "bench.json", *PRODUCTS})

#: Settings that may change on `train --resume`: they do not change the weights a run reaches.
RESUME_FREE = frozenset({"train.device", "train.eval_batch_size", "train.log_every", "train.ckpt_every_steps"})


# ------------------------------------------------------------------------------------ fingerprints
def _canon(v: Any) -> Any:
    """1 and 1.0 are one setting (YAML and --set spell numbers either way)."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, dict):
        return {k: _canon(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_canon(x) for x in v]
    return v


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(_canon(obj), sort_keys=True, default=str).encode()).hexdigest()[:16]


def array_digest(*arrays) -> str:
    """sha256 of arrays' bytes (content fingerprints of in-memory data and of codes)."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


_FILE_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (cached per process by path, size and mtime)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with io.reading(p), open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _FILE_DIGESTS[key] = h.hexdigest()[:16]
    return _FILE_DIGESTS[key]


def check_claim(path: str | Path, *, resume: bool, overwrite: bool, inputs: tuple = (), option: str = "--out") -> bool:
    """Refuse `path` for training: a foreign or other-kind directory, a folder holding `inputs`, or a
    trained run without `resume` / `overwrite`. True if the directory exists."""
    exists = io.check_output_dir(path, "run", exist_ok=True, inputs=inputs, option=option)
    if exists and RunDir(path).has_products() and not (resume or overwrite):
        raise UserError(f"{option} already holds a trained run; pass --resume to continue it, --overwrite "
                        "to train it again from scratch, or give a new directory", str(path))
    if exists and Path(path).is_dir():
        io.hold_writer_lock(path)  # before --overwrite deletes anything or data is copied in
    return exists


def data_inputs(data: dict, resolve=lambda p: p) -> dict:
    """What a prepared data directory is made from: the data settings and the input files' hashes.
    `data` is a config's data section; `resolve` maps its relative paths to files."""
    if data.get("dir"):
        return {"data.dir": dir_fingerprint(resolve(data["dir"]), "data")}
    if data.get("synthetic") is not None:
        return {"sidrec": __version__, **flat_keys({"synthetic": data["synthetic"]}, "data.")}
    out = {"sidrec": __version__}
    for k in ("format", "kcore", "dedup", "max_seq_len", "item_id_col", "user_col", "item_col", "time_col", "sep"):
        if k in data:
            out[f"data.{k}"] = data[k]
    for k in ("path", "meta"):
        if data.get(k):
            f = Path(resolve(data[k]))
            if not f.is_file():
                raise UserError(f"data.{k}: {'not a file' if f.exists() else 'file not found'}", str(f))
            out[f"data.{k}#sha256"] = file_digest(f)
    return out


def codebook_inputs(tokenizer: dict, data_fp: str, resolve=lambda p: p) -> dict:
    out = {"sidrec": __version__, "data": data_fp, **flat_keys(tokenizer, "tokenizer.")}
    emb = str(tokenizer.get("embeddings", ""))
    if emb.endswith(".npy"):
        out["tokenizer.embeddings"] = "file"  # the file's content, not how its path was spelled
        f = Path(resolve(emb))
        if not f.is_file():
            raise UserError("tokenizer.embeddings: file not found", str(f))
        out["tokenizer.embeddings#sha256"] = file_digest(f)
    return out


def model_inputs(cfg: dict, data_fp: str, codebook_fp: str | None) -> dict:
    """What a trained model is made from: model and train settings, its data and codebook."""
    train = {k: v for k, v in flat_keys(cfg["train"], "train.").items() if k not in RESUME_FREE}
    return {"sidrec": __version__, "data": data_fp, "codebook": codebook_fp, **flat_keys(cfg["model"], "model."), **train}


#: Settings added after runs were recorded, at the value that does what those runs did: a stage whose
#: recorded inputs lack one of them was made with this value (so it is not stale for it).
ADDED_KEYS = {"model.fv_loss": "full", "model.fv_sampler": "uniform", "model.fv_negatives": 256,
              "model.fv_shared_negatives": True, "model.fv_logq": True,
              "train.max_seconds": 0, "model.joint_fv_weight": 1.0, "model.joint_mix": 0.5,
              "model.node_table": False, "train.sparse": False, "train.sparse_optimizer": "adam", "train.sparse_lr": 0}


def changed_keys(old: dict, new: dict, ignore=frozenset()) -> list[str]:
    old = {**{k: v for k, v in ADDED_KEYS.items() if k in new and k not in old}, **old}
    keys = sorted((set(old) | set(new)) - set(ignore))
    return [k for k in keys if _canon(old.get(k, "<absent>")) != _canon(new.get(k, "<absent>"))]


def dir_fingerprint(path: str | Path, kind: str) -> str:
    """The fingerprint a sidrec directory was made with (legacy directories: a hash of their main file)."""
    p = Path(path)
    m = io.read_marker(p) if p.is_dir() else None
    if m is None or m["kind"] != kind:
        what = {"data": "a prepared data directory (run `sidrec data prepare`)",
                "codebook": "a codebook directory (run `sidrec tokenize`)"}.get(kind, f"a sidrec {kind} directory")
        raise UserError(f"not {what}", str(p))
    if m.get("fingerprint"):
        return m["fingerprint"]
    return file_digest(p / {"data": "sequences.npz", "codebook": "codebook.npz"}[kind])


def stage_status(path: str | Path, kind: str, inputs: dict) -> tuple[str, list[str]]:
    """("new" | "same" | "stale", changed keys) of the stage directory `path` against `inputs`."""
    p = Path(path)
    m = io.read_marker(p) if p.is_dir() else None
    if m is None:
        return "new", []
    if m["kind"] != kind:
        io.check_output_dir(p, kind, exist_ok=True)  # raises: a directory of another kind
    old = m.get("inputs")
    if old is None:
        return "stale", ["its fingerprint: it was made by an older sidrec"]
    if m.get("fingerprint") == digest(inputs):
        return "same", []
    changed = changed_keys(old, inputs)
    return ("stale", changed) if changed else ("same", [])  # e.g. a key added later, at its old value


def marker_fields(inputs: dict) -> dict:
    return {"inputs": inputs, "fingerprint": digest(inputs), "commit": _commit()}


def _commit() -> str | None:
    return label(code_state())


# --------------------------------------------------------------------------------------- the run
class RunDir:
    """A trained model's directory. Open an existing one with `RunDir.open`, make one with `create`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # -- making --------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, inputs: dict | None = None, *, resume: bool = False,
               overwrite: bool = False, option: str = "--out") -> "RunDir":
        """Take `path` for training. Refused: a foreign or other-kind directory; an existing run
        unless `resume` (same settings, RESUME_FREE aside: else refused naming the keys, before
        anything is written) or `overwrite` (its products are deleted first)."""
        exists = check_claim(path, resume=resume, overwrite=overwrite, option=option)
        rd = cls(path)
        if exists and resume and not overwrite and inputs is not None and rd.has_products():
            old = rd.inputs()
            if old is not None and rd.marker().get("inputs") is None:  # a legacy run: what it recorded
                inputs = {k: v for k, v in inputs.items() if k in old}
            changed = changed_keys(old, inputs, RESUME_FREE) if old is not None else []
            if changed:
                raise UserError("cannot --resume: the run was trained with other settings for "
                                f"{', '.join(changed)}; resume with the same values, or --overwrite to retrain",
                                str(path))
        if exists and overwrite:
            rd.clear()
        io.own_dir(rd.path, "run", **(marker_fields(inputs) if inputs is not None else {}))
        return rd

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        """An existing trained run (config.yaml and model.safetensors), else UserError."""
        rd = cls(path)
        if not (rd.path / WEIGHTS).is_file() or not (rd.path / CONFIG).is_file():
            raise UserError("not a trained run directory (needs config.yaml and model.safetensors)", str(path))
        return rd

    def has_products(self) -> bool:
        return any((self.path / f).exists() for f in PRODUCTS)

    def clear(self) -> None:
        """Delete what training and evaluation wrote (not data/ or codebook/, which have their own
        fingerprints), and the catalogue versions made on top of the old weights."""
        import shutil

        for f in PRODUCTS:
            (self.path / f).unlink(missing_ok=True)
        cat = self.path / "catalog"
        if cat.is_dir():  # the versions and the pointer sidrec wrote; anything else there is left alone
            for p in cat.iterdir():
                if re.fullmatch(r"v\d{4}", p.name) and p.is_dir():
                    shutil.rmtree(p)
                elif p.name in ("CURRENT", ".lock"):
                    p.unlink()
        io.clean_stale(self.path)

    def marker(self) -> dict:
        return io.read_marker(self.path) or {}

    def inputs(self) -> dict | None:
        """The inputs the run was made from (legacy runs: the model/train keys of config.yaml)."""
        m = self.marker()
        if m.get("inputs") is not None:
            return m["inputs"]
        if (self.path / CONFIG).is_file():
            cfg = self.config()
            return {**flat_keys(cfg.get("model", {}), "model."), **flat_keys(cfg.get("train", {}), "train.")}
        return None

    @property
    def fingerprint(self) -> str | None:
        return self.marker().get("fingerprint")

    # -- config and codebook ---------------------------------------------------------------
    def write_config(self, cfg: dict) -> None:
        io.write_text(self.path / CONFIG, yaml.safe_dump({k: v for k, v in cfg.items() if not k.startswith("_")},
                                                           sort_keys=False))

    def config(self) -> dict:
        p = self.path / CONFIG
        from sidrec.config import check_stored
        from sidrec.model import upgrade_model_dict

        with io.reading(p, "run config"):
            cfg = yaml.safe_load(p.read_text(encoding="utf-8"))
            _check_run_config(cfg)
            cfg["model"] = upgrade_model_dict(cfg["model"])
            for key, legacy in ADDED_KEYS.items():  # written before the key existed: it ran as `legacy` did
                section, name = key.split(".", 1)
                if isinstance(cfg.get(section), dict):
                    cfg[section].setdefault(name, legacy)
        try:
            check_stored(cfg)
        except UserError as e:
            raise UserError(str(e), str(p)) from None
        return cfg

    def save_codebook(self, codebook) -> None:
        """Copy the model's codebook into the run (kept as it is when the run already holds these codes,
        e.g. fitted there by `sidrec train`, so its fingerprint survives)."""
        have = self.codebook()
        if have is None or have.sizes != codebook.sizes or not np.array_equal(have.codes, codebook.codes):
            codebook.save(self.path / CODEBOOK)

    def codebook(self):
        from sidrec.tokenize import Codebook

        p = self.path / CODEBOOK
        return Codebook.load(p) if (p / "codebook.npz").exists() else None

    def catalog_version(self) -> str | None:
        """The active catalogue version ("v0002"), None for the catalogue the run was trained on."""
        from sidrec import catalog

        return catalog.current(self.path)

    def data_dir(self, cfg: dict | None = None) -> Path:
        """The run's data directory: data.dir of its config, relative to the run when not absolute
        (data kept inside the run travels with it)."""
        cfg = cfg or self.config()
        d = cfg.get("data", {}).get("dir")
        if not d:
            raise UserError("the run config names no data.dir", str(self.path / CONFIG))
        return Path(d) if Path(d).is_absolute() else self.path / d

    def data(self, cfg: dict | None = None, version: str | None = "current"):
        """The run's data; with a catalogue version (default: the active one), its item table is the
        catalogue's (the trained items first, then the added ones), so ids and rankings cover every item."""
        from sidrec import catalog
        from sidrec.data import SequenceData

        data = SequenceData.load(self.data_dir(cfg))
        version = self.catalog_version() if version == "current" else version
        if version:
            table = catalog.load_version(self.path, version)[1]
            n0 = data.n_items
            if len(table) < n0 or table["item"].astype(str).iloc[:n0].tolist() != data.raw_item_ids().tolist():
                raise UserError(f"catalogue {version} does not start with the run's {n0} trained items",
                                str(self.path / catalog.DIR / version))
            data.item_table = table
        return data

    # -- weights and checkpoints -------------------------------------------------------------
    def load_model(self, device: str | torch.device = "cpu", version: str | None = "current"):
        """(model, config) rebuilt from config.yaml + codebook/ + model.safetensors, in eval mode,
        extended to a catalogue version (default: the active one; None: as trained).
        Warns (NonBijectiveWarning) when the codebook gives two items one ID."""
        from safetensors.torch import load_model as st_load_model

        from sidrec.model import ModelConfig, SeqRecModel

        cfg = self.config()
        codebook = self.codebook()
        if codebook is not None and codebook.n_items != cfg["n_items"]:
            raise UserError(f"the codebook has {codebook.n_items} items, the run {cfg['n_items']}: it belongs to "
                            "another run or data set", str(self.path / CODEBOOK))
        with io.reading(self.path / CONFIG, "run config"):
            model = SeqRecModel(ModelConfig.from_dict(cfg["model"]), int(cfg["n_items"]), codebook)
        with io.reading(self.path / WEIGHTS, "model weights"):
            st_load_model(model, str(self.path / WEIGHTS), device=str(device))
        version = self.catalog_version() if version == "current" else version
        if version:
            from sidrec import catalog as cat

            vectors = cat.load_vectors(self.path, version, self.weights_stamp())
            model = cat.extend_model(model, codebook, cat.load_version(self.path, version)[0], vectors)
        mix = self.joint_mix()
        if mix is not None:  # a joint run's ranking weight, chosen on validation after training
            model.head.mix = mix  # joint-mix.json is written for joint runs only
        if codebook is not None and not codebook.bijective and not codebook.meta.get("counter_example"):
            warnings.warn(f"{self.path}: the codebook is not bijective ({codebook.n_collisions} items share an ID "
                          "with another item): scores are not a distribution over items and colliding items "
                          "cannot be told apart; `sidrec verify` lists them", NonBijectiveWarning, stacklevel=2)
        return model.to(device).eval(), cfg

    def save_weights(self, model: torch.nn.Module) -> None:
        from safetensors.torch import save_model as st_save_model

        with io.atomic_path(self.path / WEIGHTS) as tmp:
            st_save_model(model, str(tmp))  # handles the tied FV item vectors

    def load_weights(self, model: torch.nn.Module, device: str | torch.device = "cpu") -> None:
        from safetensors.torch import load_model as st_load_model

        with io.reading(self.path / WEIGHTS, "model weights"):
            st_load_model(model, str(self.path / WEIGHTS), device=str(device))

    def has_weights(self) -> bool:
        return (self.path / WEIGHTS).is_file()

    def save_state(self, blob: dict) -> None:
        with io.atomic_path(self.path / STATE) as tmp:
            torch.save(blob, tmp)

    def load_state(self, device: str | torch.device = "cpu") -> dict | None:
        """The latest checkpoint (weights_only: never unpickles code), or None."""
        p = self.path / STATE
        if not p.exists():
            return None
        with io.reading(p, "trainer checkpoint"):
            blob = torch.load(p, map_location=device, weights_only=True)
            if not isinstance(blob, dict) or not {"model", "opt", "sched", "rng", "state"} <= set(blob):
                raise ValueError("not a sidrec trainer checkpoint")
            st = blob["state"]
            ints = ("epoch", "batch", "step", "best_epoch", "bad_epochs")
            if not isinstance(st, dict) or not all(isinstance(st.get(k), int) and not isinstance(st.get(k), bool)
                                                   for k in ints) or not isinstance(st.get("done"), bool) \
                    or not isinstance(st.get("best"), (int, float)) or not isinstance(blob["rng"], torch.Tensor):
                raise ValueError("its training state is malformed")
        return blob

    def training_done(self) -> bool:
        blob = self.load_state()
        return bool(blob and blob["state"].get("done")) and self.has_weights()

    # -- logs ----------------------------------------------------------------------------------
    def log(self, rec: dict, timings: dict | None = None) -> None:
        """One line of metrics.jsonl (deterministic) and, if given, its timings.jsonl line."""
        io.append_jsonl(self.path / METRICS, rec)
        if timings:
            io.append_jsonl(self.path / TIMINGS, {"step": rec.get("step"), "epoch": rec.get("epoch"), **timings})

    def read_log(self, name: str = METRICS) -> list[dict]:
        p = self.path / name
        if not p.exists():
            return []
        with io.reading(p, "log"):
            recs = [json.loads(ln) for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
            if not all(isinstance(r, dict) and isinstance(r.get("step", 0), int) for r in recs):
                raise ValueError("a line is not a log record")
        return recs

    def truncate_logs(self, step: int) -> None:
        """Drop log lines written after the checkpoint a resume starts from (they will be redone)."""
        for name in (METRICS, TIMINGS):
            p = self.path / name
            if p.exists():
                keep = [r for r in self.read_log(name) if (r.get("step") or 0) <= step]
                io.write_text(p, "".join(json.dumps(r) + "\n" for r in keep))

    def reset_logs(self) -> None:
        for name in (METRICS, TIMINGS):
            (self.path / name).unlink(missing_ok=True)

    # -- evaluations and reports --------------------------------------------------------------
    def check_owned(self, name: str) -> None:
        """Refuse to write `name` into a directory that is not a sidrec run (no marker, not a legacy run)."""
        m = io.read_marker(self.path)
        if m is None or m["kind"] != "run":
            raise UserError(f"not a run directory sidrec made (no {io.MARKER}); refusing to write {name} into it",
                            str(self.path))

    def write_eval(self, ev: dict) -> Path:
        """eval.json or eval-seen-excluded.json (the two protocols never overwrite each other),
        stamped with the fingerprint of the model it scored."""
        p = self.path / eval_file(ev["exclude_seen"])
        self.check_owned(p.name)
        io.write_json(p, {**ev, "model_fingerprint": self.fingerprint, "weights_stamp": self.weights_stamp()})
        return p

    def write_joint_mix(self, record: dict) -> Path:
        """The ranking weight chosen for these weights (with its validation curve); `load_model`
        applies it, so the API, the CLI and the server all rank with it."""
        p = self.path / JOINT_MIX
        self.check_owned(p.name)
        io.write_json(p, {**record, "weights_stamp": self.weights_stamp()})
        return p

    def joint_mix(self) -> float | None:
        """The chosen mix, or None: never tuned, or tuned for weights that have since been rewritten
        (then the config's `model.joint_mix` applies, with a warning: `sidrec tune-mix` chooses again)."""
        p = self.path / JOINT_MIX
        if not p.is_file():
            return None
        with io.reading(p, "joint mix"):
            rec = io.read_json(p)
            mix = float(rec["mix"])
            if not 0 <= mix <= 1:
                raise ValueError(f"mix {mix} is not in [0, 1]")
        if rec.get("weights_stamp") != self.weights_stamp():
            warnings.warn(f"{p}: chosen for other weights (the run was trained again, or copied without its file "
                          "times): ranking with the config's model.joint_mix; `sidrec tune-mix` chooses again",
                          stacklevel=2)
            return None
        return mix

    def weights_stamp(self) -> str | None:
        """Changes whenever model.safetensors is rewritten (a resumed training, a retrain)."""
        p = self.path / WEIGHTS
        if not p.exists():
            return None
        st = p.stat()
        return f"{st.st_size}-{st.st_mtime_ns}"

    def read_eval(self, exclude_seen: bool, beam: int | None = None, decodes: tuple[str, ...] = ("exact",)) -> dict | None:
        """The stored evaluation for a protocol, if it scored these very weights with `decodes` (and
        the beam width)."""
        p = self.path / eval_file(exclude_seen)
        if not p.exists():
            return None
        try:
            ev = io.read_json(p)
        except UserError:
            return None  # a damaged stored evaluation is made again
        if not _eval_ok(ev) or ev.get("model_fingerprint") != self.fingerprint or self.fingerprint is None:
            return None
        if ev.get("weights_stamp") != self.weights_stamp() or ev.get("catalog_version") != self.catalog_version():
            return None
        if not all(d in ev[s] for s in ("valid", "test") for d in decodes):
            return None
        if beam is not None and any(ev[s].get("beam", {}).get("beam", beam) != beam for s in ("valid", "test")):
            return None
        if ev.get("joint_mix") != self.joint_mix():  # a joint head's ranking weight was chosen since
            return None
        return ev

    def write_json(self, name: str, obj: Any) -> Path:
        self.check_owned(name)
        io.write_json(self.path / name, obj)
        return self.path / name


def _check_run_config(cfg: Any) -> None:
    """The structure every reader of a run config relies on (ValueError otherwise)."""
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise ValueError("not a sidrec run config (no model section)")
    n = cfg.get("n_items")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError("n_items must be a positive integer")
    for section in ("data", "eval", "tokenizer", "train"):
        if not isinstance(cfg.get(section, {}), dict):
            raise ValueError(f"{section} must be a mapping")
    d = cfg.get("data", {}).get("dir")
    if d is not None and not isinstance(d, str):
        raise ValueError("data.dir must be a path")
    if not isinstance(cfg.get("eval", {}).get("exclude_seen", False), bool):
        raise ValueError("eval.exclude_seen must be true or false")


_METRIC_KEYS = ("recall@1", "recall@5", "recall@10", "recall@20", "ndcg@5", "ndcg@10", "ndcg@20", "mrr")


def _eval_ok(ev: Any) -> bool:
    """A stored evaluation has the shape the report and the benchmarks read."""
    if not isinstance(ev, dict) or not isinstance(ev.get("exclude_seen"), bool):
        return False
    for split in ("valid", "test"):
        s = ev.get(split)
        if not isinstance(s, dict) or not s:
            return False
        for dec, m in s.items():
            if dec == "overlap@10":
                continue
            if not isinstance(m, dict) or not all(isinstance(m.get(k), (int, float)) for k in _METRIC_KEYS):
                return False
    return True


def eval_file(exclude_seen: bool) -> str:
    return EVALS[1] if exclude_seen else EVALS[0]


__all__ = ["RunDir", "NonBijectiveWarning", "digest", "file_digest", "data_inputs", "codebook_inputs",
           "model_inputs", "changed_keys", "stage_status", "dir_fingerprint", "marker_fields", "eval_file",
           "RESUME_FREE", "check_claim"]
