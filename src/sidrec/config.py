"""Run configuration: YAML files with `--set key=value` overrides, validated against dataclasses."""

from __future__ import annotations

import copy
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from sidrec.errors import UserError
from sidrec.model import BackboneConfig, ModelConfig
from sidrec.model.heads import ITEM_VECTORS
from sidrec.train.trainer import TrainConfig

DEFAULTS: dict[str, Any] = {
    "name": "run",
    "data": {
        "dir": None, "synthetic": None, "format": None, "path": None, "meta": None, "kcore": 5,
        "dedup": "exact", "max_seq_len": None, "item_id_col": None,
    },
    "tokenizer": {
        "method": "rq-kmeans", "levels": 3, "codebook_size": 256, "embeddings": "text",
        "text_model": "all-MiniLM-L6-v2", "collab_dim": 64, "resolve": "reassign", "seed": 0,
    },
    "model": {**{f.name: f.default for f in fields(ModelConfig) if f.name != "backbone"},
              "backbone": {f.name: f.default for f in fields(BackboneConfig)}},
    "train": {f.name: f.default for f in fields(TrainConfig)},
    "heads": ["ar", "fv"],
    "eval": {"beam": 20, "exclude_seen": False, "batch_size": 1024, "beam_widths": [5, 10, 20]},
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
}


def _merge(base: dict, over: dict, path: str = "") -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        key = f"{path}{k}"
        if k not in base:
            raise UserError(f"unknown config key {key!r}; valid keys here: {sorted(base)}")
        if isinstance(base[k], dict) and base[k] and isinstance(v, dict):
            out[k] = _merge(base[k], v, key + ".")
        else:
            out[k] = v
    return out


def parse_set(items: list[str]) -> dict:
    """['train.epochs=5', 'model.head=fv'] -> nested dict (values parsed as YAML scalars)."""
    out: dict = {}
    for it in items or []:
        if "=" not in it:
            raise UserError(f"--set expects key=value, got {it!r}")
        key, val = it.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        try:
            node[parts[-1]] = yaml.safe_load(val)
        except yaml.YAMLError:
            node[parts[-1]] = val
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> dict:
    cfg = copy.deepcopy(DEFAULTS)
    if path is None:
        cfg = _merge(cfg, SYNTHETIC)
    else:
        p = Path(path)
        if not p.exists():
            raise UserError("config file not found", str(p))
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            raise UserError(f"invalid YAML ({getattr(e, 'problem', e)})", str(p), line + 1 if line is not None else None) from None
        if not isinstance(raw, dict):
            raise UserError("a config must be a YAML mapping", str(p))
        cfg = _merge(cfg, raw)
        cfg["_config_dir"] = str(p.resolve().parent)
    cfg = _merge({**cfg, "_config_dir": cfg.get("_config_dir")}, parse_set(overrides or []))
    validate(cfg)
    return cfg


def validate(cfg: dict) -> None:
    model_config(cfg)
    train_config(cfg)
    heads = cfg["heads"]
    if isinstance(heads, str):
        heads = cfg["heads"] = [heads]
    for h in heads:
        if h not in ("ar", "fv", "parallel", "ar-unconstrained"):
            raise UserError(f"unknown head {h!r} in heads (ar, fv, parallel, ar-unconstrained)")


def model_config(cfg: dict) -> ModelConfig:
    try:
        mc = ModelConfig.from_dict(cfg["model"])
    except TypeError as e:
        raise UserError(f"bad model config: {e}") from None
    if mc.head not in ("ar", "fv", "parallel"):
        raise UserError(f"model.head must be ar, fv or parallel, not {mc.head!r}")
    for name in ("tied", "constrained", "node_bias", "head_film", "head_context"):
        if not isinstance(getattr(mc, name), bool):
            raise UserError(f"model.{name} must be true or false, not {getattr(mc, name)!r}")
    if mc.item_vectors not in ITEM_VECTORS:
        raise UserError(f"model.item_vectors must be one of {', '.join(ITEM_VECTORS)}, not {mc.item_vectors!r}")
    if mc.item_vectors != "none" and not mc.constrained:
        raise UserError("model.item_vectors needs model.constrained: true (item vectors exist only for valid IDs)")
    if mc.root_score not in ("mean", "lse", "lse-all"):
        raise UserError(f"model.root_score must be mean, lse or lse-all, not {mc.root_score!r}")
    if mc.root_score != "mean" and mc.item_vectors != "all":
        raise UserError("model.root_score: lse scores first-level nodes by their items: it needs model.item_vectors: all")
    if mc.node_bias and not mc.constrained:
        raise UserError("model.node_bias needs model.constrained: true (trie nodes exist only for valid IDs)")
    if not isinstance(mc.head_dropout, (int, float)) or not 0 <= mc.head_dropout < 1:
        raise UserError(f"model.head_dropout must be a number in [0, 1), not {mc.head_dropout!r}")
    b = mc.backbone
    if b.item_input not in ("id", "sid", "both"):
        raise UserError("model.backbone.item_input must be id, sid or both")
    if b.d_model % b.n_heads:
        raise UserError("model.backbone.d_model must be divisible by n_heads")
    return mc


def train_config(cfg: dict) -> TrainConfig:
    try:
        tc = TrainConfig(**cfg["train"])
    except TypeError as e:
        raise UserError(f"bad train config: {e}") from None
    if tc.schedule not in ("cosine", "inverse-sqrt", "constant"):
        raise UserError("train.schedule must be cosine, inverse-sqrt or constant")
    if tc.batch_size < 1 or tc.lr <= 0:
        raise UserError("train.batch_size must be >= 1 and train.lr > 0")
    return tc


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
