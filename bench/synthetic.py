"""The quick start's figures: `sidrec run` on the embedded synthetic default (what `make run` does),
and `sidrec verify --synthetic`, recorded with the commit and machine.

    python -m bench.synthetic            # -> bench/results/synthetic.json (+ verify-synthetic.json)

Stages already in bench/out/synthetic are reused when their inputs match (as `sidrec run` does).
"""

from __future__ import annotations

import sys
import time

from bench import common
from bench.common import RESULTS, ROOT, write_result
from sidrec.config import load_config
from sidrec.pipeline import run_pipeline
from sidrec.verify.synthetic import run_suite

KEYS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20")


def main() -> None:
    import argparse

    common.parse_args(argparse.ArgumentParser(prog="python -m bench.synthetic", description=__doc__.split("\n\n")[0]))
    t = time.perf_counter()
    summary = run_pipeline(load_config(None), ROOT / "bench" / "out" / "synthetic")
    rows = {head: {dec: {k: ev["test"][dec][k] for k in KEYS} for dec in ("exact", "beam") if dec in ev["test"]}
            for head, ev in summary["results"].items()}
    write_result("synthetic", {"command": "python -m bench.synthetic  (= sidrec run --out DIR, the make run job)",
                               "test": rows, "bayes_optimal": {k: summary["bayes_optimal"]["test"][k] for k in KEYS},
                               "data": summary["data"], "seconds": round(time.perf_counter() - t, 1)}, RESULTS)
    out = ROOT / "bench" / "out" / "verify-synthetic"
    res = run_suite(out)
    write_result("verify-synthetic", {"command": "sidrec verify --synthetic --out DIR (via python -m bench.synthetic)",
                                      "claims": res["claims"], "all_pass": res["all_pass"], "seconds": res["seconds"]},
                 RESULTS)
    print(f"all verify claims pass: {res['all_pass']}", file=sys.stderr)


if __name__ == "__main__":
    main()
