"""Most-popular baseline on a dataset's valid and test splits (shows how hard each split is).

    python -m bench.popularity --dataset beauty   -> bench/results/popularity-<dataset>.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench import common
from bench.common import RESULTS, ROOT, write_result
from bench.quality import DATASETS, prepared
from sidrec.config import load_config
from sidrec.evaluate import popularity_ranking


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="beauty", choices=DATASETS)
    ap.add_argument("--out-root", default=str(ROOT / "bench" / "out"), help="shares bench.quality's prepared data")
    ap.add_argument("--results-dir", default=str(RESULTS))
    a = common.parse_args(ap)
    cfg = load_config(ROOT / "configs" / f"{a.dataset}.yaml")
    data = prepared(a.dataset, cfg, Path(a.out_root) / f"quality-{a.dataset}", None)
    res = {s: popularity_ranking(data, s) for s in ("valid", "test")}
    write_result(f"popularity-{a.dataset}", {"dataset": a.dataset, **res}, Path(a.results_dir))
    for s, m in res.items():
        print(s, {k: round(v, 4) for k, v in m.items()})


if __name__ == "__main__":
    main()
