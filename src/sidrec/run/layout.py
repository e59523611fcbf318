"""Every name sidrec gives a file in a run, a `sidrec run` directory and a catalogue version.

Only the run package joins these names to paths; everything else asks `RunDir`, `PipelineDir` or
`catalog` for what it needs. The names are sidrec's on-disk format: changing one breaks the runs
users already have.

A run (one trained model):

    .sidrec.json          marker: kind "run", the stage's inputs and their fingerprint
    config.yaml           the resolved config (n_items, data.dir)
    data/                 the prepared data, when `sidrec train` prepared it (own marker)
    codebook/             the semantic IDs the model was built on (absent for FV-MLE on item ids)
    model.safetensors     the best weights on validation
    trainer_state.pt      the latest checkpoint (model, optimizer, schedule, RNG, counters)
    metrics.jsonl         one JSON line per log step and per epoch: deterministic values only
    timings.jsonl         the same steps' wall-clock figures (seconds, throughput)
    joint-mix.json        a joint head's ranking weight, chosen on validation after training
    eval.json, eval-seen-excluded.json, verify.json, report.md
    catalog/              catalogue versions: items added after training (below)
    bench.json            a benchmark's record of how the run was made (written by bench/)

A `sidrec run` directory: config.yaml, data/, codebook/, one run per head (ar/, fv/, ...),
summary.json, report.md and its figures (plots/).

A catalogue (inside a run):

    catalog/CURRENT       the active version's name (replaced atomically)
    catalog/.lock         serialises writers: version names are taken in order
    catalog/v0001/        one directory per version, never changed once written
        catalog.json      version, parent, sizes, the added ids and how their IDs were found
        items.parquet     the whole item table: trained items first (same order), then added ones
        codebook/         the extended codebook (existing codes unchanged)
        vectors.npz       content vectors of the added items and the weights' stamp (if any)
"""

from __future__ import annotations

import re

from sidrec import io

# ------------------------------------------------------------------------------------- a run
CONFIG, WEIGHTS, STATE = "config.yaml", "model.safetensors", "trainer_state.pt"
METRICS, TIMINGS = "metrics.jsonl", "timings.jsonl"
DATA, CODEBOOK, CATALOG = "data", "codebook", "catalog"
EVALS = ("eval.json", "eval-seen-excluded.json")  # all items ranked / seen items excluded
JOINT_MIX, VERIFY, REPORT = "joint-mix.json", "verify.json", "report.md"
BENCH = "bench.json"
#: What training and evaluation write (deleted by --overwrite; their presence makes a run "trained").
PRODUCTS = (WEIGHTS, STATE, METRICS, TIMINGS, JOINT_MIX, *EVALS, VERIFY, REPORT)

# ----------------------------------------------------------------------- a `sidrec run` directory
SUMMARY, FIGURES = "summary.json", "plots"

# ------------------------------------------------------------------------------- a catalogue
CURRENT, CATALOG_LOCK = "CURRENT", ".lock"
VERSION = re.compile(r"v\d{4}")  # v0000 is the catalogue the run was trained on (no directory)
CATALOG_INFO, ITEMS, VECTORS = "catalog.json", "items.parquet", "vectors.npz"

io.register_entries("run", {CONFIG, DATA, CODEBOOK, CATALOG, BENCH, *PRODUCTS})
io.register_entries("catalog", {CATALOG_INFO, ITEMS, CODEBOOK, VECTORS})


def eval_file(exclude_seen: bool) -> str:
    """The evaluation file of a protocol: the two never overwrite each other."""
    return EVALS[1] if exclude_seen else EVALS[0]
