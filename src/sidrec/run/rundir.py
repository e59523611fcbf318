"""`RunDir`: the only reader and writer of a trained run's files (their names: `layout`).

It takes a directory for training (refusing what is not sidrec's, a trained run without --resume or
--overwrite, a resume with changed settings), and reads and writes the config, codebook, weights,
checkpoint, logs, evaluations, reports and the joint head's mix, each atomically; a stored
evaluation or mix is used only for the very weights it was made with.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from sidrec import io
from sidrec.errors import NonBijectiveWarning, UserError
from sidrec.config import flat_keys
from sidrec.version import __version__
from sidrec.run import catalog
from sidrec.run.fingerprint import ADDED_KEYS, RESUME_FREE, array_digest, changed_keys, marker_fields, stage_status
from sidrec.run.layout import (CODEBOOK, CONFIG, DATA, FIGURES, JOINT_MIX, METRICS, PRODUCTS, REPORT, STATE,
                               SUMMARY, TIMINGS, WEIGHTS, eval_file)


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



# --------------------------------------------------------------------------------------- the run
class _Workdir:
    """What a run and a `sidrec run` directory have alike: the data and codebook stages they keep
    (prepared or fitted there, each with its own marker) and a report."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    @property
    def data_path(self) -> Path:
        return self.path / DATA

    @property
    def codebook_path(self) -> Path:
        return self.path / CODEBOOK

    @property
    def report_path(self) -> Path:
        return self.path / REPORT


class RunDir(_Workdir):
    """A trained model's directory. Open an existing one with `RunDir.open`, make one with `create`."""

    @property
    def state_path(self) -> Path:
        """The checkpoint file, for messages that must name it (it is read by `load_state`)."""
        return self.path / STATE

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

    def has_config(self) -> bool:
        return (self.path / CONFIG).is_file()

    def has_products(self) -> bool:
        return any((self.path / f).exists() for f in PRODUCTS)

    def clear(self) -> None:
        """Delete what training and evaluation wrote (not data/ or codebook/, which have their own
        fingerprints), and the catalogue versions made on top of the old weights."""
        for f in PRODUCTS:
            (self.path / f).unlink(missing_ok=True)
        catalog.clear(self.path)
        io.clean_stale(self.path)

    def copy_to(self, path: str | Path, overwrite: bool = False) -> Path:
        """Copy the whole run to `path` (a new directory, or with `overwrite` a run directory), atomically."""
        path = Path(path)
        io.check_output_dir(path, "run", overwrite=overwrite)
        marker = {k: v for k, v in self.marker().items() if k not in ("kind", "sidrec", "legacy")}
        with io.atomic_dir(path, "run", **marker) as tmp:
            shutil.copytree(self.path, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(io.MARKER, io.LOCK))
        return path

    def keep_data(self, data, replace: bool):
        """Write in-memory data into the run's data/ (kept when the same content is already there; other
        content is replaced only when `replace`: a resume must not swap the data under its model).
        Returns the data as loaded from there."""
        from sidrec.data import SequenceData

        content = array_digest(data.offsets, data.items, data.user_ids.astype(str), data.raw_item_ids())
        inputs = {"sidrec": __version__, "data.content#sha256": content}
        io.own_dir(self.path, "run")
        status = stage_status(self.data_path, "data", inputs)[0]
        if status == "stale" and not replace:
            raise UserError("cannot resume: the run was trained on other data", str(self.data_path))
        if status != "same":
            data.save(self.data_path, marker=marker_fields(inputs))
        return SequenceData.load(self.data_path)

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
        return Codebook.load(p) if Codebook.saved_in(p) else None

    def catalog_version(self) -> str | None:
        """The active catalogue version ("v0002"), None for the catalogue the run was trained on."""
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
        from sidrec.data import SequenceData

        data = SequenceData.load(self.data_dir(cfg))
        version = self.catalog_version() if version == "current" else version
        if version:
            table = catalog.load_version(self.path, version)[1]
            n0 = data.n_items
            if len(table) < n0 or table["item"].astype(str).iloc[:n0].tolist() != data.raw_item_ids().tolist():
                raise UserError(f"catalogue {version} does not start with the run's {n0} trained items",
                                str(catalog.version_dir(self.path, version)))
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
            from sidrec.model.extend import extend_model

            vectors = catalog.load_vectors(self.path, version, self.weights_stamp())
            model = extend_model(model, codebook, catalog.load_version(self.path, version)[0], vectors)
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

    def read_eval(self, exclude_seen: bool, beam: int | None = None, decodes: tuple[str, ...] = ("exact",),
                  version: str | None = "current") -> dict | None:
        """The stored evaluation for a protocol, if it scored these very weights with `decodes` (and
        the beam width) on catalogue `version` (default: the active one; None: as trained)."""
        p = self.path / eval_file(exclude_seen)
        if not p.exists():
            return None
        try:
            ev = io.read_json(p)
        except UserError:
            return None  # a damaged stored evaluation is made again
        if not _eval_ok(ev) or ev.get("model_fingerprint") != self.fingerprint or self.fingerprint is None:
            return None
        version = self.catalog_version() if version == "current" else version
        if ev.get("weights_stamp") != self.weights_stamp() or ev.get("catalog_version") != version:
            return None
        if not all(d in ev[s] for s in ("valid", "test") for d in decodes):
            return None
        if beam is not None and any(ev[s].get("beam", {}).get("beam", beam) != beam for s in ("valid", "test")):
            return None
        if ev.get("joint_mix") != self.joint_mix():  # a joint head's ranking weight was chosen since
            return None
        return ev

    def write_json(self, name: str, obj: Any) -> Path:
        """A record of a tool that registered `name` for runs (`io.register_entries`), e.g. verify.json."""
        self.check_owned(name)
        io.write_json(self.path / name, obj)
        return self.path / name

    def read_json(self, name: str) -> dict | None:
        """Such a record, or None when there is none."""
        p = self.path / name
        return io.read_json(p) if p.is_file() else None

    def report(self) -> str | None:
        """report.md, or None when there is none yet."""
        p = self.path / REPORT
        if not p.is_file():
            return None
        with io.reading(p, "report"):
            return p.read_text(encoding="utf-8")

    def write_report(self, text: str) -> Path:
        self.check_owned(REPORT)
        io.write_text(self.path / REPORT, text)
        return self.path / REPORT



class PipelineDir(_Workdir):
    """A `sidrec run` directory: the stages its heads share (data/, codebook/), one run per head
    (`head`), the resolved config, summary.json, report.md and its figures."""

    def claim(self, inputs: list) -> None:
        """Take the directory (new, empty, or a `sidrec run` directory), refusing one holding `inputs`."""
        io.check_output_dir(self.path, "pipeline", exist_ok=True, inputs=inputs)
        io.own_dir(self.path, "pipeline")

    def head(self, name: str) -> RunDir:
        """The run of one head (its directory is named after it: ar/, fv/, joint/, ...)."""
        return RunDir(self.path / name)

    def write_config(self, text: str) -> None:
        io.write_text(self.path / CONFIG, text)

    def write_summary(self, summary: dict) -> None:
        io.write_json(self.path / SUMMARY, summary)

    def write_report(self, text: str) -> Path:
        io.write_text(self.report_path, text)
        return self.report_path

    def figure(self, name: str) -> tuple[Path, str]:
        """(where to write figure `name`, its link relative to the report)."""
        (self.path / FIGURES).mkdir(exist_ok=True)
        return self.path / FIGURES / name, f"{FIGURES}/{name}"


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
