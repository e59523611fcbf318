"""Where `items add` spends its time (#33): bench.coldstart's 605 cold Beauty items added to its warm
text-ID AR-NTP run (seed 0; trained in bench.coldstart's layout when missing, ~5 min), in one process:

1. the text embedding alone, twice (the first pays the sentence-transformers import, as a fresh
   `sidrec items add` process does);
2. `add_items` as the benchmark calls it (the run's text model embeds the new items' text; imported by now);
3. `add_items` with those embeddings given (`items add --embeddings`: what is left without the text model).

Each add starts from the catalogue as trained, in a copy of the run (the benchmark's run is untouched).

    python -m bench.experiments.items_add
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT
from bench.coldstart import warm_data
from bench.quality import prepared, trained


def main() -> None:
    from sidrec.api import Recommender
    from sidrec.config import load_config
    from sidrec.embed import embed_table_text
    from sidrec.pipeline import ensure_codebook, head_config
    from sidrec.run import catalog

    base = load_config(ROOT / "configs" / "beauty.yaml", [])
    out = ROOT / "bench" / "out"
    full = prepared("beauty", base, out / "quality-beauty", None)
    cold = np.sort(np.random.default_rng(0).choice(full.n_items, int(round(0.05 * full.n_items)), replace=False))
    warm = warm_data(full, cold, out / "coldstart" / "warm-seed0")
    cfg = copy.deepcopy(base)
    cfg["tokenizer"].update({"embeddings": "text"})
    cfg = head_config(cfg, "ar")
    run = out / "coldstart" / "seed0" / "warm-ar-text"  # bench.coldstart's own run: it reuses it
    trained(cfg, warm, ensure_codebook(cfg, warm, run.parent / "warm-ar-text-codebook" / "codebook"), run)
    new = full.item_table.iloc[cold].reset_index(drop=True)
    res: dict = {"items": len(new)}
    with tempfile.TemporaryDirectory() as tmp:
        def fresh() -> Recommender:
            dst = Path(tmp) / "run"
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(run, dst)
            catalog.clear(dst)
            return Recommender.load(dst, device="cpu")

        for name in ("embed_first", "embed_again"):
            t = time.perf_counter()
            x = embed_table_text(new, cfg["tokenizer"]["text_model"])
            res[name + "_seconds"] = round(time.perf_counter() - t, 2)
        info = fresh().add_items(new, id_col="item")
        res["add_items_text"] = {k: info[k] for k in ("seconds", "embed_seconds", "total_seconds", "ids")}
        info = fresh().add_items(new, id_col="item", embeddings=x)
        res["add_items_given_embeddings"] = {k: info[k] for k in ("seconds", "total_seconds", "ids")}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
