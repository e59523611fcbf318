"""The theorem, executable: checks on trained runs and controlled synthetic experiments.

    from sidrec.verify import check_bijection, check_normalization, check_loss_identity, check_beam_recall
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sidrec.verify.checks import check_beam_recall, check_bijection, check_loss_identity, check_normalization


def verify_run(run: str | Path, n_contexts: int = 512, beams=(1, 5, 10, 20), seed: int = 0) -> dict:
    """All checks on a trained run, for a random sample of real test contexts; writes verify.json.
    Failed checks name what failed: the colliding items, the worst context (its raw user id)."""
    import warnings

    from sidrec.data.batching import eval_batches
    from sidrec.run import NonBijectiveWarning, RunDir
    from sidrec.run.layout import VERIFY
    from sidrec.verify.report import write_run_section

    rd = RunDir.open(run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonBijectiveWarning)  # the bijection check reports it
        model, cfg = rd.load_model()
    data = rd.data(cfg)
    rng = np.random.default_rng(seed)
    users = np.sort(rng.choice(data.n_users, min(n_contexts, data.n_users), replace=False))
    users, items, lens = next(iter(eval_batches(data, "test", model.cfg.backbone.max_len, len(users), users)))
    targets = torch.from_numpy(data.targets("test")[users].astype(np.int64))
    checks = []
    head = model.head.token_model()  # a joint head: the theorem is about its AR-NTP part
    codebook = head.codebook
    if codebook is not None:
        c = check_bijection(codebook)
        raw = data.raw_item_ids()
        c["colliding_items"] = [[str(raw[i]) for i in g] for g in c["colliding_items"]]
        checks.append(c)
    # identities in float64 (exact up to rounding) and in float32 (what training and serving use)
    for dtype in (torch.float64, torch.float32):
        model.to(dtype)
        with torch.no_grad():
            h = model.encode(items, lens)
        for c in (check_normalization(head, h), check_loss_identity(head, h, targets)):
            c["worst_user"] = str(data.user_ids[users[c["worst_context"]]])
            checks.append(c)
    if model.supports_beam:
        checks.append(check_beam_recall(head, h, beams=beams))
    result = {"run": str(run), "head": model.cfg.head, "constrained": model.cfg.constrained,
              "n_contexts": int(len(users)), "checks": checks, "all_pass": all(c["pass"] for c in checks if not c.get("informational"))}
    result["file"] = str(rd.write_json(VERIFY, result))
    write_run_section(rd, result)
    return result


__all__ = ["check_bijection", "check_normalization", "check_loss_identity", "check_beam_recall", "verify_run"]
