"""The theorem, executable: checks on trained runs and controlled synthetic experiments.

    from sidrec.verify import check_bijection, check_normalization, check_loss_identity, check_beam_recall
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sidrec.verify.checks import check_beam_recall, check_bijection, check_loss_identity, check_normalization


def verify_run(run: str | Path, n_contexts: int = 512, beams=(1, 5, 10, 20), seed: int = 0) -> dict:
    """All checks on a trained run, for a random sample of real test contexts; writes verify.json."""
    from sidrec import io
    from sidrec.data import SequenceData
    from sidrec.data.batching import eval_histories
    from sidrec.train.trainer import load_model
    from sidrec.verify.report import write_run_section

    run = Path(run)
    model, cfg = load_model(run)
    data = SequenceData.load(cfg["data"]["dir"])
    rng = np.random.default_rng(seed)
    users = np.sort(rng.choice(data.n_users, min(n_contexts, data.n_users), replace=False))
    start, length = eval_histories(data, "test", model.cfg.backbone.max_len)
    from sidrec.data.batching import _pad

    items = torch.from_numpy(_pad(data.items, start[users], length[users], data.n_items))
    lens = torch.from_numpy(length[users].astype(np.int64))
    targets = torch.from_numpy(data.targets("test")[users].astype(np.int64))
    checks = []
    codebook = getattr(model.head, "cb", None)
    if codebook is not None:
        checks.append(check_bijection(codebook))
    # identities in float64 (exact up to rounding) and in float32 (what training and serving use)
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-5)):
        model.to(dtype)
        with torch.no_grad():
            h = model.encode(items, lens)
        checks.append(check_normalization(model.head, h, tol=tol))
        checks.append(check_loss_identity(model.head, h, targets, tol=tol))
    if model.cfg.head == "ar":
        checks.append(check_beam_recall(model.head, h, beams=beams))
    result = {"run": str(run), "head": model.cfg.head, "constrained": model.cfg.constrained,
              "n_contexts": int(len(users)), "checks": checks, "all_pass": all(c["pass"] for c in checks)}
    io.write_json(run / "verify.json", result)
    write_run_section(run, result)
    return result


__all__ = ["check_bijection", "check_normalization", "check_loss_identity", "check_beam_recall", "verify_run"]
