"""Run configuration: YAML files with `--set key=value` overrides, checked once against one schema."""

from __future__ import annotations

import copy
import math
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from sidrec import io
from sidrec.errors import UserError
from sidrec.model import HEAD_VARIANTS, HEADS, BackboneConfig, ModelConfig, upgrade_model_dict
from sidrec.tokenize import METHODS
from sidrec.train.config import TrainConfig

DEFAULTS: dict[str, Any] = {
    "name": "run",
    "data": {
        "dir": None, "synthetic": None, "format": None, "path": None, "meta": None, "kcore": 5,
        "dedup": "exact", "max_seq_len": None, "item_id_col": None,
        "user_col": "user_id", "item_col": "item_id", "time_col": "timestamp", "sep": None,
    },
    "tokenizer": {
        "method": "rq-kmeans", "levels": 3, "codebook_size": 256, "embeddings": "collab",
        "text_model": "all-MiniLM-L6-v2", "collab_dim": 64, "resolve": "reassign", "seed": 0,
    },
    "model": {**{f.name: f.default for f in fields(ModelConfig) if f.name != "backbone"},
              "backbone": {f.name: f.default for f in fields(BackboneConfig)}},
    "train": {f.name: f.default for f in fields(TrainConfig)},
    "heads": ["ar", "fv", "parallel"],
    "eval": {"beam": 20, "exclude_seen": True, "batch_size": 1024, "beam_widths": [5, 10, 20]},
}


#: The embedded default (`sidrec run --out DIR` with no config): synthetic data with known P*.
#: configs/synthetic.yaml is the same configuration with every key commented (a test keeps them equal).
SYNTHETIC: dict[str, Any] = {
    "name": "synthetic",
    "data": {"synthetic": {"n_items": 2000, "n_users": 20000, "dim": 16, "seed": 0}},
    "tokenizer": {"method": "rq-kmeans", "levels": 3, "codebook_size": 16, "embeddings": "text"},
    "model": {"backbone": {"d_model": 64, "n_layers": 2, "n_heads": 2, "d_ff": 128, "dropout": 0.1,
                           "max_len": 20, "item_input": "id"}},
    "train": {"epochs": 30, "batch_size": 128, "lr": 0.002, "patience": 5, "warmup_steps": 50},
    "heads": ["ar", "fv", "parallel"],
    "eval": {"exclude_seen": False},
}


def flat_keys(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}: the dotted keys configs, schemas and
    fingerprints speak in."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _merge(base: dict, over: dict, path: str = "") -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        key = f"{path}{k}"
        if not isinstance(k, str) or k.startswith("_") or k not in base:
            valid = sorted(b for b in base if not b.startswith("_"))
            raise UserError(f"unknown config key {key!r}; valid keys here: {valid}")
        if isinstance(base[k], dict) and base[k]:
            if v is None and not path:  # an empty top-level section ("eval:" with every line commented out)
                continue
            if v is None and key == "data.synthetic":  # the one nullable section: no synthetic data
                out[k] = None
                continue
            if not isinstance(v, dict):
                raise UserError(f"config key {key}: must be a mapping of keys ({', '.join(sorted(base[k]))}), "
                                f"not {v!r}")
            out[k] = _merge(base[k], v, key + ".")
        else:
            out[k] = v
    return out


DATA_SOURCES = ("dir", "synthetic", "format")


def _replace_data_source(cfg: dict, layer: dict) -> None:
    """A layer that names a data source (data.dir, data.synthetic or data.format) replaces the one
    below it: `--set data.dir=D` on a config that reads a file, or on the embedded synthetic default."""
    named = [k for k in DATA_SOURCES if isinstance(layer.get("data"), dict) and layer["data"].get(k)]
    if named and isinstance(cfg.get("data"), dict):
        for k in DATA_SOURCES:
            if k not in named:
                cfg["data"][k] = None


def _upgrade(raw: dict, where: str) -> dict:
    """Model keys of earlier sidrec versions, translated (item_vectors all + node_bias true -> true);
    a removed ablation is a user error naming it."""
    if not isinstance(raw.get("model"), dict):
        return raw
    try:
        return {**raw, "model": upgrade_model_dict(raw["model"])}
    except ValueError as e:
        raise UserError(str(e), where) from None


def parse_set(items: list[str]) -> dict:
    """['train.epochs=5', 'model.head=fv'] -> nested dict (values parsed as YAML scalars)."""
    out: dict = {}
    for it in items or []:
        if "=" not in it:
            raise UserError(f"--set expects key=value, got {it!r}")
        key, val = it.split("=", 1)
        node = out
        parts = key.strip().split(".")
        if not all(parts):
            raise UserError(f"--set {it!r}: the key needs dotted names, e.g. train.epochs=5")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {it!r}: {p} was already given a value, not a section")
        try:
            node[parts[-1]] = yaml.safe_load(val)
        except yaml.YAMLError:
            node[parts[-1]] = val
        except RecursionError:
            raise UserError(f"--set {key.strip()}: value nested too deeply") from None
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None, *, sections: dict | None = None,
                default: str = "synthetic") -> dict:
    """The library defaults (the tuned recipe), then the YAML file at `path` (none: the embedded
    synthetic default, or nothing more with default="recipe"), then `sections` (a nested dict, the
    Python API's keyword arguments), then `--set` overrides; validated once against SCHEMA."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is None and default == "synthetic":
        cfg = _merge(cfg, SYNTHETIC)
    elif path is None:
        pass
    else:
        p = Path(path)
        if not p.exists():
            raise UserError("config file not found", str(p))
        try:
            with io.reading(p, "config file"):
                text = p.read_text(encoding="utf-8")
            raw = yaml.safe_load(text) or {}
        except RecursionError:
            raise UserError("invalid YAML (nested too deeply)", str(p)) from None
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            raise UserError(f"invalid YAML ({getattr(e, 'problem', e)})", str(p), line + 1 if line is not None else None) from None
        if not isinstance(raw, dict):
            raise UserError("a config must be a YAML mapping", str(p))
        cfg = _merge(cfg, _upgrade(raw, str(p)))
        cfg["_config_dir"] = str(p.resolve().parent)
    for layer in (_upgrade(sections or {}, "config"), _upgrade(parse_set(overrides or []), "--set")):
        _replace_data_source(cfg, layer)
        cfg = _merge({**cfg, "_config_dir": cfg.get("_config_dir")}, layer)
    validate(cfg)
    return cfg


# ------------------------------------------------------------------------------------------ schema
# One schema for every config key: its type (from the defaults / dataclass annotations) and its
# range. `validate` checks a whole config against it once, where the config enters (load_config),
# so later code can trust every value. Messages name the dotted key and the bad value.
FORMATS = ("csv", "recbole", "ml-100k", "ml-1m", "amazon", "seq")
HEAD_NAMES = (*HEADS, *HEAD_VARIANTS)  # heads a config may list: the counter-example too
DEVICES = ("auto", "cpu", "cuda")


def _int(lo: int | None = None, hi: int | None = None, none: bool = False):
    return ("int", lo, hi, none)


def _num(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    return ("float", lo, hi, lo_open, hi_open)


def _choice(*options: str, none: bool = False):
    return ("choice", options, none)


def _str(none: bool = False):
    return ("str", none)


BOOL = ("bool",)
SEED_MAX = 2**32 - 1  # numpy's and torch's seed range

SCHEMA: dict[str, tuple] = {
    "name": _str(),
    "data.dir": _str(none=True), "data.format": _choice(*FORMATS, none=True), "data.path": _str(none=True),
    "data.meta": _str(none=True), "data.user_col": _str(), "data.item_col": _str(),
    "data.time_col": _str(none=True), "data.sep": ("sep",), "data.kcore": _int(0), "data.dedup": _choice("exact", "user-item", "none"),
    "data.max_seq_len": _int(3, none=True), "data.item_id_col": _str(none=True),
    "data.synthetic.n_items": _int(2), "data.synthetic.n_users": _int(3), "data.synthetic.dim": _int(1),
    "data.synthetic.seed": _int(0, SEED_MAX),
    "tokenizer.method": _choice(*METHODS), "tokenizer.levels": _int(1, 16), "tokenizer.codebook_size": _int(2, 1 << 20),
    "tokenizer.embeddings": _str(), "tokenizer.text_model": _str(), "tokenizer.collab_dim": _int(1),
    "tokenizer.resolve": _choice("reassign", "extra-token", "none"), "tokenizer.seed": _int(0, SEED_MAX),
    "model.head": _choice(*HEADS), "model.tied": BOOL, "model.constrained": BOOL,
    "model.item_vectors": BOOL, "model.node_table": BOOL, "model.head_hidden": _int(1, none=True), "model.fv_chunk": _int(1, none=True),
    "model.fv_loss": _choice("full", "sampled"), "model.fv_sampler": _choice("uniform", "popularity", "in-batch"),
    "model.fv_negatives": _int(1), "model.fv_shared_negatives": BOOL, "model.fv_logq": BOOL,
    "model.joint_fv_weight": _num(0), "model.joint_mix": _num(0, 1),
    "model.backbone.d_model": _int(1), "model.backbone.n_layers": _int(1), "model.backbone.n_heads": _int(1),
    "model.backbone.d_ff": _int(1), "model.backbone.dropout": _num(0, 1, hi_open=True),
    "model.backbone.max_len": _int(1, 1 << 16), "model.backbone.item_input": _choice("id", "sid", "both"),
    "train.epochs": _int(1), "train.batch_size": _int(1), "train.lr": _num(0, lo_open=True),
    "train.weight_decay": _num(0), "train.warmup_steps": _int(0),
    "train.schedule": _choice("cosine", "inverse-sqrt", "constant"), "train.grad_clip": _num(0),
    "train.patience": _int(1), "train.eval_every": _int(1), "train.eval_batch_size": _int(1),
    "train.eval_users": _int(0), "train.exclude_seen": BOOL, "train.seed": _int(0, SEED_MAX),
    "train.device": _choice(*DEVICES), "train.amp": BOOL, "train.ckpt_every_steps": _int(0),
    "train.max_steps": _int(0), "train.max_seconds": _num(0), "train.log_every": _int(1), "train.bucket": BOOL,
    "train.weighting": _choice("target", "user"),
    "train.sparse": BOOL, "train.sparse_optimizer": _choice("adam", "adagrad"), "train.sparse_lr": _num(0),
    "eval.beam": _int(1), "eval.exclude_seen": BOOL, "eval.batch_size": _int(1),
}


def _check(key: str, value: Any, rule: tuple) -> Any:
    """The value if it obeys `rule` (a number given as a string comes back as a float), else UserError."""
    kind = rule[0]
    bad = f"config key {key}: "
    if kind == "sep":
        if value is not None and (not isinstance(value, str) or len(value) != 1):
            raise UserError(bad + f"must be one character (or null: by file extension), not {value!r}")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise UserError(bad + f"must be true or false, not {value!r}")
    elif kind in ("str", "choice") and value is None:
        if not rule[-1]:
            raise UserError(bad + "must be set (got null)")
    elif kind == "str":
        if not isinstance(value, str) or not value:
            raise UserError(bad + f"must be a non-empty string, not {value!r}")
    elif kind == "choice":
        if value not in rule[1]:
            raise UserError(bad + f"must be one of {', '.join(rule[1])}, not {value!r}")
    elif kind == "int":
        _, lo, hi, none = rule
        if value is None and none:
            return
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(bad + f"must be an integer, not {value!r}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            span = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise UserError(bad + f"must be {span}, not {value}")
    elif kind == "float":
        _, lo, hi, lo_open, hi_open = rule
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(bad + f"must be a finite number, not {value!r}")
        if lo is not None and (value < lo or (lo_open and value == lo)):
            raise UserError(bad + f"must be {'>' if lo_open else '>='} {lo}, not {value}")
        if hi is not None and (value > hi or (hi_open and value == hi)):
            raise UserError(bad + f"must be {'<' if hi_open else '<='} {hi}, not {value}")
    return value


def check_stored(cfg: dict, sections=("model", "eval", "tokenizer", "train")) -> None:
    """Type- and range-check the sections of a config sidrec wrote earlier (a run's config.yaml):
    the schema without the cross-key rules (a run trained on a GPU still loads on a CPU)."""
    for key, value in flat_keys({s: cfg[s] for s in sections if isinstance(cfg.get(s), dict)}).items():
        rule = SCHEMA.get(key)
        if rule is not None and key != "train.device":
            _check(key, value, rule)
    widths = cfg.get("eval", {}).get("beam_widths", [1])
    if not isinstance(widths, list) or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in widths):
        raise UserError(f"config key eval.beam_widths: must be a list of integers >= 1, not {widths!r}")


def validate(cfg: dict) -> None:
    """Check every key of a merged config against SCHEMA and the cross-key rules; UserError on the first
    bad one. Normalises `heads` (a string becomes a one-element list)."""
    syn = cfg["data"].get("synthetic")
    if syn is not None and not isinstance(syn, dict):
        raise UserError(f"config key data.synthetic: must be a mapping or null, not {syn!r}")
    if syn is not None:
        unknown = set(syn) - {"n_items", "n_users", "dim", "seed"}
        if unknown:
            raise UserError(f"unknown config key data.synthetic.{sorted(unknown)[0]}; valid keys here: "
                            "['dim', 'n_items', 'n_users', 'seed']")
    for key, value in flat_keys({k: v for k, v in cfg.items() if not k.startswith("_") and k != "heads"}).items():
        if key in SCHEMA:
            checked = _check(key, value, SCHEMA[key])
            if checked is not None and checked is not value:
                node = cfg
                for part in key.split(".")[:-1]:
                    node = node[part]
                node[key.rsplit(".", 1)[-1]] = checked
        elif key == "eval.beam_widths":
            if not isinstance(value, list) or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1
                                                      for b in value):
                raise UserError(f"config key eval.beam_widths: must be a list of integers >= 1, not {value!r}")
        elif key.startswith("data.synthetic.") or key == "data.synthetic":
            continue
        else:
            raise UserError(f"unknown config key {key!r}")
    heads = cfg["heads"]
    if isinstance(heads, str):
        heads = cfg["heads"] = [heads]
    if not isinstance(heads, list) or not heads:
        raise UserError(f"config key heads: must be a non-empty list of {', '.join(HEAD_NAMES)}")
    for h in heads:
        if h not in HEAD_NAMES:
            raise UserError(f"config key heads: unknown head {h!r} ({', '.join(HEAD_NAMES)})")
    _cross_checks(cfg)


def _cross_checks(cfg: dict) -> None:
    m, d = cfg["model"], cfg["data"]
    sources = [k for k in ("dir", "synthetic", "format") if d.get(k)]
    if len(sources) > 1:
        raise UserError(f"config key data: give one data source, not {' and '.join('data.' + k for k in sources)}")
    if m["item_vectors"] and not m["constrained"]:
        raise UserError("model.item_vectors needs model.constrained: true (item vectors exist only for valid IDs)")
    if m["backbone"]["d_model"] % m["backbone"]["n_heads"]:
        raise UserError("model.backbone.d_model must be divisible by model.backbone.n_heads")
    if d.get("format") and not d.get("path"):
        raise UserError("config key data.path: data.format needs the interaction file in data.path")
    if cfg["train"]["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("config key train.device: cuda was asked for but no CUDA GPU is available (use auto or cpu)")


def model_config(cfg: dict) -> ModelConfig:
    return ModelConfig.from_dict(cfg["model"])


def train_config(cfg: dict) -> TrainConfig:
    return TrainConfig(**cfg["train"])


def resolve_path(cfg: dict, value: str | None) -> str | None:
    """Relative paths: the working directory first, then the config file's directory."""
    if value is None:
        return None
    p = Path(value)
    if p.is_absolute() or p.exists() or not cfg.get("_config_dir"):
        return str(p)
    alt = Path(cfg["_config_dir"]) / p
    return str(alt) if alt.exists() else str(p)


def dump(cfg: dict) -> str:
    return yaml.safe_dump({k: v for k, v in cfg.items() if not k.startswith("_")}, sort_keys=False)
