"""The verifier: every check runs small, passes on correct models and detects each breakage."""

import numpy as np
import pytest
import torch

from sidrec.model import BackboneConfig, ModelConfig, SeqRecModel
from sidrec.tokenize import fit_codebook
from sidrec.verify import check_beam_recall, check_bijection, check_loss_identity, check_normalization
from sidrec.verify.synthetic import SuiteConfig, collide, run_suite


def _model(cb, constrained=True):
    cfg = ModelConfig(head="ar", constrained=constrained, item_vectors=constrained, backbone=BackboneConfig(d_model=16, n_heads=2, max_len=4))
    torch.manual_seed(0)
    m = SeqRecModel(cfg, cb.n_items, cb).double()
    with torch.no_grad():
        for p in m.head.parameters():
            p.normal_(0, 0.3)
    return m


def test_checks_pass_on_a_correct_model():
    cb = fit_codebook(np.random.default_rng(0).normal(size=(150, 8)).astype(np.float32), "rq-kmeans", 2, 16)
    m = _model(cb)
    h = torch.randn(32, 16, dtype=torch.float64)
    assert check_bijection(cb)["pass"]
    assert check_normalization(m.head, h, tol=1e-9)["pass"]
    assert check_loss_identity(m.head, h, torch.randint(0, 150, (32,)), tol=1e-9)["pass"]
    r = check_beam_recall(m.head, h, beams=(5, 256), k=10)
    assert r["pass"] and r["overlap_by_beam"]["256"] == 1.0


def test_detects_broken_codebook():
    cb = fit_codebook(np.random.default_rng(0).normal(size=(150, 8)).astype(np.float32), "rq-kmeans", 2, 16)
    broken = collide(cb, 0.2)
    res = check_bijection(broken)
    assert not res["pass"] and res["value"] == 30


def test_detects_unnormalised_head():
    cb = fit_codebook(np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32), "rq-kmeans", 2, 16)
    m = _model(cb, constrained=False)
    res = check_normalization(m.head, torch.randn(8, 16, dtype=torch.float64), tol=1e-9)
    assert not res["pass"] and res["leaked_mass_mean"] > 1e-3


@pytest.mark.slow
def test_synthetic_suite_small(tmp_path):
    cfg = SuiteConfig(tab_items=24, tab_samples=20_000, tab_codebook=8, neural_items=60, neural_users=(150, 600),
                      neural_epochs=4, tol_neural_nll=0.5)
    res = run_suite(tmp_path, cfg)
    by = {c["id"]: c for c in res["claims"]}
    for cid in ("2.fv_optimum", "2.ar_optimum_rq-kmeans", "2.ar_optimum_opq", "2.kl_rq-kmeans", "2.kl_opq",
                "4.collision_gap", "5.parallel_gap_rq-kmeans", "3.unconstrained_leak"):
        assert by[cid]["pass"], by[cid]
    assert (tmp_path / "report.md").exists() and (tmp_path / "plots" / "neural_equivalence.png").exists()
