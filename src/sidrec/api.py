"""The Python API: data in, a fitted generative recommender out (scikit-learn style).

    import sidrec
    data = sidrec.load_data("log.csv", format="csv")          # or sidrec.from_frame(df), sidrec.synthetic()
    rec = sidrec.Recommender(head="ar").fit(data, out="runs/mine")
    ids, scores = rec.recommend([["i1", "i2", "i3"]], k=10)    # raw item ids, log Q(item | history)
    rec.evaluate()                                             # full-ranking leave-one-out metrics
    rec = sidrec.Recommender.load("runs/mine")                 # any run directory, CLI-made or not

Everything goes through a run directory (`sidrec.run`), so a run fitted here is one the CLI can
evaluate, verify and recommend from, and the reverse. The defaults are the tuned recipe
(`sidrec.config.DEFAULTS`); keyword sections override it: `Recommender(train={"epochs": 20})`.
One device rule (`auto`: the GPU when there is one) covers training, evaluation and recommending.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sidrec import io
from sidrec import run as rundir
from sidrec.config import load_config
from sidrec.data import Dataset, SequenceData, prepare, read
from sidrec.errors import UserError
from sidrec.model import HEADS
from sidrec.run import RunDir


# ------------------------------------------------------------------------------------------ data
def load_data(path: str | Path, format: str = "csv", *, meta: str | Path | None = None, kcore: int = 5,
              dedup: str = "exact", max_seq_len: int | None = None, **columns) -> SequenceData:
    """Read an interaction log (`sidrec data prepare`'s formats) and prepare it: dedup, k-core,
    chronological order, leave-one-out split. csv: user_col, item_col, time_col, sep, item_id_col."""
    return prepare(read(format, path, meta, **columns), kcore_k=kcore, dedup=dedup, max_seq_len=max_seq_len)


def from_frame(interactions: pd.DataFrame, *, user_col: str = "user_id", item_col: str = "item_id",
               time_col: str | None = "timestamp", items: pd.DataFrame | None = None, item_id_col: str = "item_id",
               kcore: int = 5, dedup: str = "exact") -> SequenceData:
    """Prepare a pandas (or pyarrow, via .to_pandas()) interaction table; `items`: side information
    (title, categories, ...) keyed by `item_id_col`. Rows with equal timestamps keep their order."""
    missing = [c for c in (user_col, item_col, time_col) if c and c not in interactions.columns]
    if missing:
        raise UserError(f"missing column(s) {', '.join(missing)}; columns are {list(interactions.columns)}")
    df = interactions
    ts = pd.to_numeric(df[time_col], errors="coerce").to_numpy(np.float64) if time_col else np.arange(len(df), dtype=np.float64)
    if np.isnan(ts).any():
        raise UserError(f"column {time_col!r} has missing or non-numeric timestamps (row {int(np.flatnonzero(np.isnan(ts))[0])})")
    frame = pd.DataFrame({"user": df[user_col].astype(str).to_numpy(object),
                          "item": df[item_col].astype(str).to_numpy(object), "timestamp": ts})
    side = None
    if items is not None:
        if item_id_col not in items.columns:
            raise UserError(f"items: missing column {item_id_col!r}")
        side = items.rename(columns={item_id_col: "item"})
    return prepare(Dataset(frame, side, source="DataFrame", has_time=time_col is not None),
                   kcore_k=kcore, dedup=dedup)


def synthetic(out: str | Path | None = None, *, n_items: int = 2000, n_users: int = 20000, dim: int = 16,
              seed: int = 0) -> SequenceData:
    """The synthetic catalogue with a known P*(item | history), written to `out` (default: a new
    temporary directory) so that its ground truth travels with it."""
    from sidrec.pipeline import write_data

    spec = {"synthetic": {"n_items": n_items, "n_users": n_users, "dim": dim, "seed": seed}}
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="sidrec-synthetic-")) / "data"
    io.check_output_dir(out, "data")
    return write_data(spec, out, rundir.data_inputs(spec))


def unknown_ids_message(missing: list[str]) -> str:
    """How the API, the CLI and the server name ids the catalogue does not hold (the first 20)."""
    return f"unknown item id(s): {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else "")


# ----------------------------------------------------------------------------------- the estimator
class Recommender:
    """A generative recommender on semantic IDs: `head` "ar" (AR-NTP, the default), "fv" (FV-MLE,
    full softmax) or "parallel" (non-auto-regressive). `config`: a YAML file of the CLI's format;
    `sections`: nested overrides by section, e.g. model={"backbone": {"d_model": 128}}."""

    def __init__(self, head: str = "ar", *, config: str | Path | None = None, device: str = "auto", **sections):
        if head not in HEADS:
            raise UserError(f"head must be one of {', '.join(HEADS)}, not {head!r}")
        unknown = set(sections) - {"data", "tokenizer", "model", "train", "eval"}
        if unknown:
            raise UserError(f"unknown config section(s) {', '.join(sorted(unknown))} (tokenizer, model, train, eval)")
        from sidrec.train.config import pick_device

        self.head = head
        self.device = pick_device(device)
        sections = copy.deepcopy(sections)
        sections.setdefault("train", {})["device"] = self.device.type
        self.config = load_config(config, sections=sections, default="recipe")
        self.run: RunDir | None = None
        self.model = None
        self.data: SequenceData | None = None

    # -- fitting ---------------------------------------------------------------------------
    def fit(self, data: SequenceData | str | Path, *, out: str | Path | None = None, resume: bool = False,
            overwrite: bool = False) -> "Recommender":
        """Fit the tokenizer (when the head needs semantic IDs) and the model on `data` (prepared
        data, or a data directory) into the run directory `out` (default: a new temporary one; see
        `save`). Afterwards the object holds the best-validation weights."""
        from sidrec.pipeline import claim_run_dir, ensure_codebook, head_config, needs_semantic_ids, train_one

        if not isinstance(data, SequenceData):
            data = SequenceData.load(data)
        run = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="sidrec-run-")) / "run"
        with io.writer_session():  # the run is this process's until the fit ends
            rundir.check_claim(run, resume=resume, overwrite=overwrite, option="out")
            if data.path is None:  # in-memory data travels inside the run
                data = RunDir(run).keep_data(data, replace=not resume)
            cfg = head_config(self.config, self.head)
            cfg["data"] = {**cfg["data"], "dir": str(Path(data.path).resolve()), "synthetic": None, "format": None}
            claim_run_dir(cfg, run, resume=resume, overwrite=overwrite)  # takes the run's writer lock
            codebook = (ensure_codebook(cfg, data, RunDir(run).codebook_path)
                        if needs_semantic_ids(cfg, [self.head]) else None)
            train_one(cfg, data, codebook, run, resume=resume, overwrite=overwrite)
        return self._open(RunDir(run), data)

    @classmethod
    def load(cls, run: str | Path, device: str = "auto", table_precision: str = "float32") -> "Recommender":
        """A trained run directory (from `fit`, `sidrec train` or `sidrec run DIR/<head>`).
        table_precision: float16, bfloat16 or int8 keep the item tables of a node-table model (AR-NTP,
        joint) that narrow for serving, at 1/2 or 1/4 of their float32 memory (`sidrec.model.lowp`);
        such a Recommender recommends, it does not add items or tune."""
        from sidrec.model.lowp import PRECISIONS
        from sidrec.train.config import pick_device

        if table_precision not in PRECISIONS:
            raise UserError(f"table_precision must be one of {', '.join(PRECISIONS)}, not {table_precision!r}")
        rd = RunDir.open(run)
        self = cls.__new__(cls)
        self.device = pick_device(device)
        self.config = rd.config()
        self.head = self.config["model"]["head"]
        self._open(rd, None)
        try:
            self.model.narrow_tables_(table_precision)
        except ValueError as e:
            raise UserError(f"table_precision {table_precision}: {e}; this run's head is {self.head}", str(run)) from None
        return self

    def _open(self, rd: RunDir, data: SequenceData | None) -> "Recommender":
        self.run = rd
        self._version = rd.catalog_version()  # read once: model and item table from the same version
        self.model, cfg = rd.load_model(self.device, version=self._version)
        self.config = cfg
        self.data = data if data is not None else rd.data(cfg, version=self._version)
        self._raw = self.data.raw_item_ids()  # built once: every request maps ids through these
        order = np.argsort(self._raw)
        self._sorted = (self._raw[order], order)
        return self

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Copy the run directory to `path` (a new directory, or with `overwrite` a run directory)."""
        self._fitted()
        path = Path(path)
        if path.resolve() == self.run.path.resolve():
            return path
        return self.run.copy_to(path, overwrite=overwrite)

    # -- using it ----------------------------------------------------------------------------
    def recommend(self, histories: list[list[str]], k: int = 10, *, decode: str = "exact", beam: int = 20,
                  exclude_seen: bool = True, allow: list | None = None,
                  deny: list | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k next items for each history of raw item ids (oldest first): (ids [B, k] raw item ids,
        scores [B, k] log Q(item | history)); "" / -inf pad rows with fewer than k allowed items.
        decode: "exact" ranks all items; "beam" is trie-constrained beam search (AR-NTP only).
        exclude_seen: items of the history are never recommended. allow / deny: one list of raw ids
        per history (or None): only / never these items. All three act inside decoding, so k items
        come back whenever k are allowed."""
        self._fitted()
        if not histories or any(not isinstance(h, (list, tuple)) or not h for h in histories):
            raise UserError("histories must be a non-empty list of non-empty lists of item ids")
        b = len(histories)
        lists = {"allow": allow, "deny": deny}
        for name, value in lists.items():
            if value is not None and (not isinstance(value, (list, tuple)) or len(value) != b or
                                      any(x is not None and not isinstance(x, (list, tuple)) for x in value)):
                raise UserError(f"{name} must be a list with one list of item ids (or None) per history")
        hist = [self._indices(h, "histories") for h in histories]
        allow_i = [None if a is None else self._indices(a, "allow") for a in allow] if allow is not None else None
        deny_i = [None if d is None else self._indices(d, "deny") for d in deny] if deny is not None else None
        idx, scores = self.recommend_indices(hist, k, decode=decode, beam=beam, exclude_seen=exclude_seen,
                                             allow=allow_i, deny=deny_i)
        ok = idx >= 0
        return np.where(ok, self.raw_ids[np.where(ok, idx, 0)], ""), np.where(ok, scores, -np.inf)

    @property
    def raw_ids(self) -> np.ndarray:
        """Raw item id of every internal item id."""
        return self._raw

    def item_index(self, raw: list[str] | np.ndarray) -> np.ndarray:
        """Internal ids of raw item ids, -1 for ids the catalogue does not hold (one sorted lookup).

        Ids match exactly: NumPy's fixed-width strings drop trailing NULs, so "1\\x00" would look
        like "1"; catalogue ids never end in NUL (they pass through the same strings), so such ids are unknown."""
        keys, order = self._sorted
        if not len(raw):
            return np.zeros(0, np.int64)
        padded = np.fromiter((str(r).endswith("\x00") for r in raw), dtype=bool, count=len(raw))
        raw = np.asarray(raw, dtype=str)
        pos = np.searchsorted(keys, raw).clip(max=len(keys) - 1)
        return np.where((keys[pos] == raw) & ~padded, order[pos], -1)

    def _indices(self, raw: list, what: str) -> np.ndarray:
        idx = self.item_index([str(i) for i in raw])
        if (idx < 0).any():
            raise UserError(f"{what}: {unknown_ids_message([str(r) for r, i in zip(raw, idx) if i < 0])}")
        return idx

    def recommend_indices(self, histories: list[np.ndarray], k: int, *, decode: str = "exact", beam: int = 20,
                          exclude_seen: bool | Sequence[bool] = True, allow: list[np.ndarray | None] | None = None,
                          deny: list[np.ndarray | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`recommend` on internal item ids (what the server batches): ([B, k] ids, -1 where fewer
        than k items are allowed; [B, k] log Q, -inf there). `exclude_seen` may be one flag per
        history (a server batch mixes requests)."""
        from sidrec.data.batching import pad_windows
        from sidrec.decode import ItemFilter, beam_search

        self._fitted()
        if decode not in ("exact", "beam"):
            raise UserError(f"decode must be exact or beam, not {decode!r}")
        if decode == "beam" and not self.model.supports_beam:
            raise UserError(f"beam decoding needs an AR-NTP run; this run's head is {self.head}")
        n = self.model.n_items
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n or \
                isinstance(beam, bool) or not isinstance(beam, (int, np.integer)) or beam < 1:
            raise UserError(f"k must be in [1, {n}] and beam >= 1 (got k={k}, beam={beam})")
        counts = np.array([len(h) for h in histories], dtype=np.int64)
        flat = np.concatenate(histories).astype(np.int64)
        if not len(flat) or counts.min() < 1 or flat.min() < 0 or flat.max() >= n:
            raise UserError(f"every history needs at least one item id in [0, {n})")
        ends = np.cumsum(counts)
        lengths = np.minimum(counts, self.model.cfg.backbone.max_len)
        recent = pad_windows(flat, ends - lengths, lengths, n)  # the most recent max_len items
        try:  # one flag, or one per history (any sequence type; a wrong length is an error, not a truncation)
            seen = np.broadcast_to(np.asarray(exclude_seen, dtype=bool), (len(histories),))
        except ValueError:
            raise UserError(f"exclude_seen: one flag or one per history ({len(histories)}), "
                            f"not {np.size(exclude_seen)}") from None
        excl = [np.concatenate([h if s else h[:0], d if d is not None else h[:0]])
                for h, d, s in zip(histories, deny or [None] * len(histories), seen)]
        filt = ItemFilter.build(n, len(histories), exclude=excl, allow=allow)
        dev = self.device
        with torch.no_grad():  # not inference_mode: caches built here (trie index tensors) must stay usable in training
            h = self.model.encode(torch.from_numpy(recent).to(dev), torch.from_numpy(lengths).to(dev))
            if decode == "exact":  # log Q (a joint head: the mixture score its beam search also returns)
                s = filt.mask_scores(self.model.head.served_scores(h).contiguous())
                scores, idx = torch.topk(s, int(k), dim=1)
            else:
                r = beam_search(self.model.head, h, beam=max(int(beam), int(k)), k=int(k), item_filter=filt)
                idx, scores = r.items, r.log_probs
        idx, scores = idx.cpu().numpy(), scores.float().cpu().numpy()
        ok = (idx >= 0) & np.isfinite(scores)
        return np.where(ok, idx, -1), np.where(ok, scores, -np.inf)

    def evaluate(self, splits=("valid", "test"), *, decode: str | None = None, beam: int = 20,
                 exclude_seen: bool | None = None, save: bool = True, extra_beams: tuple[int, ...] = ()) -> dict:
        """Full-ranking leave-one-out metrics (exact, and beam for AR-NTP) on `splits`; with `save`,
        written to the run's eval.json / eval-seen-excluded.json as `sidrec evaluate` does."""
        from sidrec.pipeline import evaluate_run

        self._fitted()
        splits = (splits,) if isinstance(splits, str) else tuple(splits)
        return evaluate_run(self.run.path, decodes=(decode,) if decode else None, beam=beam,
                            exclude_seen=exclude_seen, splits=splits, device=self.device, data=self.data, write=save,
                            extra_beams=tuple(extra_beams))

    def tune_mix(self, grid: tuple[float, ...] | None = None, *, exclude_seen: bool | None = None,
                 batch_size: int = 1024) -> dict:
        """Choose a joint head's ranking weight on validation again (`fit` already did) and rank with
        it from now on; returns the chosen weight and the validation curve."""
        from sidrec.pipeline import MIX_GRID, tune_joint_mix

        self._fitted()
        self._full_precision("tune the mix")
        rec = tune_joint_mix(self.run.path, data=None if self._version else self.data, grid=grid or MIX_GRID,
                             exclude_seen=exclude_seen, device=self.device, batch_size=batch_size)
        self.model.head.mix = rec["mix"]
        return rec

    def add_items(self, items: pd.DataFrame | str | Path, *, embeddings: np.ndarray | str | Path | None = None,
                  id_col: str = "item_id", vectors: str = "content") -> dict:
        """Add new items to the fitted run, recommendable at once (no retraining): each gets a
        semantic ID from its content with the fitted tokenizer, in a new catalogue version of the run
        (`sidrec.run.catalog`; the previous version is kept). items: a table (or a JSONL / CSV / Parquet
        file) with `id_col` and text fields; embeddings: [m, d] (or a .npy file) in the tokenizer's
        space, needed unless the IDs were fitted on text. vectors: "content" (a new item's vector is
        that of its nearest trained item by content) or "prefix-mean". Returns what was
        added and how the IDs were found (direct / resolved / fallback); this object then serves the
        new catalogue."""
        from sidrec.data.readers import normalise_item_table, read_item_table
        from sidrec.run import catalog
        from sidrec.embed import check_embeddings, load_npy

        self._fitted()
        self._full_precision("add items")
        if vectors not in ("content", "prefix-mean"):
            raise UserError(f"vectors must be content or prefix-mean, not {vectors!r}")
        if isinstance(items, pd.DataFrame):
            if id_col not in items.columns:
                raise UserError(f"items: missing column {id_col!r}; columns are {list(items.columns)}")
            table = normalise_item_table(items.rename(columns={id_col: "item"}).assign(item=lambda t: t["item"].astype(str)),
                                         unique=True, where="items")
        else:
            table = read_item_table(items, id_col, unique=True)
        if not len(table):
            raise UserError("no new items given")
        if isinstance(embeddings, (str, Path)):
            embeddings = load_npy(embeddings, len(table))
        elif embeddings is not None:
            embeddings = check_embeddings(np.asarray(embeddings), len(table), "embeddings")
        t = time.perf_counter()
        mapper = self._content_map() if vectors == "content" else None
        info = catalog.add_items(self.run, self.model, self.codebook, self.data.item_table, table, embeddings,
                                 parent=self._version, content_map=mapper)
        n_items = self._open(self.run, None).model.n_items
        return {**info, "n_items": n_items, "total_seconds": round(time.perf_counter() - t, 2)}  # with writing, reloading

    def _content_map(self):
        """x -> item vectors from the trained items' embeddings (the tokenizer's own source) and their
        trained item vectors; None when either is unavailable (prefix means are used then)."""
        from sidrec.embed import get_embeddings
        from sidrec.model.extend import content_map, item_table

        vectors = item_table(self.model)
        tok = (self.codebook.meta.get("tokenizer") if self.codebook is not None else None) or {}
        source = str(tok.get("embeddings", ""))
        if vectors is None or not source:
            return None
        trained = self.run.data(self.config, version=None)
        try:
            x = get_embeddings(trained, source, model=tok.get("text_model", "all-MiniLM-L6-v2"),
                               dim=tok.get("collab_dim", 64), seed=tok.get("seed", 0))
        except UserError:  # e.g. a .npy file that is no longer there: prefix means instead
            return None
        return content_map(x, vectors[: len(x)].numpy())  # fitted on the trained items only

    @property
    def codebook(self):
        """The semantic-ID codebook of the catalogue this object serves (None for FV-MLE on item ids)."""
        self._fitted()
        from sidrec.run import catalog

        return catalog.load_version(self.run.path, self._version)[0] if self._version else self.run.codebook()

    @property
    def catalog_version(self) -> str | None:
        """The catalogue version this object serves (None: the items it was trained on)."""
        self._fitted()
        return self._version

    def _fitted(self) -> None:
        if self.model is None:
            raise UserError("this Recommender is not fitted: call fit(data) or Recommender.load(run)")

    def _full_precision(self, what: str) -> None:
        if self.model.precision != "float32":
            raise UserError(f"this Recommender serves {self.model.precision} tables: load the run with "
                            f"table_precision='float32' to {what}")

    def __repr__(self) -> str:
        where = f", run={str(self.run.path)!r}" if self.run else ""
        return f"Recommender(head={self.head!r}{where})"


__all__ = ["Recommender", "load_data", "from_frame", "synthetic"]
