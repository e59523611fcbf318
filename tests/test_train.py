"""Training: overfitting, exact resume after a kill, DDP equivalence, CLI end to end."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings, strategies as st

from sidrec.data import SequenceData
from sidrec.data.batching import TrainBatches
from sidrec.model import BackboneConfig, ModelConfig, SeqRecModel
from sidrec.tokenize import Codebook
from sidrec.train import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
SIDREC = [sys.executable, "-m", "sidrec.cli"]


def cyclic_data(n_items=24, n_users=60, length=8, seed=0) -> SequenceData:
    """Each user walks i, i+1, i+2 ... (mod N): the next item is a function of the last one."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, n_items, n_users)
    seqs = (starts[:, None] + np.arange(length)[None, :]) % n_items
    offsets = np.arange(n_users + 1, dtype=np.int64) * length
    table = pd.DataFrame({"item": np.arange(n_items).astype(str)})
    return SequenceData(offsets, seqs.ravel().astype(np.int32), np.arange(n_users).astype(str), table)


def grid_codebook(n_items=24) -> Codebook:
    codes = np.stack([np.arange(n_items) // 6, np.arange(n_items) % 6], 1)
    return Codebook(codes, [4, 6])


@pytest.mark.parametrize("head", ["ar", "fv", "parallel"])
def test_tiny_model_overfits(tmp_path, head):
    data, cb = cyclic_data(), grid_codebook()
    cfg = ModelConfig(head=head, backbone=BackboneConfig(d_model=32, n_heads=2, d_ff=64, dropout=0.0, max_len=8))
    torch.manual_seed(0)
    model = SeqRecModel(cfg, data.n_items, cb)
    tc = TrainConfig(epochs=60, batch_size=16, lr=5e-3, warmup_steps=10, patience=100, eval_every=20, log_every=5)
    Trainer(model, data, tc, tmp_path).fit()
    b = next(iter([Trainer(model, data, tc, tmp_path / "x").batches.make(np.arange(60))]))
    model.eval()
    with torch.no_grad():
        nll = model.nll(b.items, b.targets).mean().item()
    if head == "parallel":
        assert nll < 0.3  # the cyclic walk factorises over the grid codes only approximately
    else:
        assert nll < 0.05, nll


def _train_cmd(run: Path, *extra: str) -> list[str]:
    return SIDREC + ["train", "--out", str(run), "--set", "data.synthetic.n_items=200", "data.synthetic.n_users=600",
                     "tokenizer.embeddings=latent", "tokenizer.levels=2", "tokenizer.codebook_size=16",
                     "train.epochs=3", "train.batch_size=32", "train.ckpt_every_steps=4", "train.log_every=4",
                     "model.backbone.d_model=32", "model.backbone.d_ff=64", *extra]


def _env():
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(ROOT / "src")
    return env


def _final_params(run: Path) -> dict:
    blob = torch.load(run / "trainer_state.pt", weights_only=True)
    return blob["model"], blob["state"]


@pytest.mark.parametrize("sparse", [False, True])
def test_resume_after_kill_is_bit_identical(tmp_path, sparse):
    """Also with a node table and catch-up Adam (its per-row steps and per-step record checkpointed)."""
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    flags = ["model.node_table=true", "train.sparse=true"] if sparse else []
    subprocess.run(_train_cmd(ref, *flags), check=True, env=_env(), capture_output=True)
    p = subprocess.Popen(_train_cmd(killed, *flags), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "trainer_state.pt").exists():
        time.sleep(0.05)
    time.sleep(0.3)
    p.send_signal(signal.SIGKILL)
    p.wait()
    mid = torch.load(killed / "trainer_state.pt", weights_only=True)["state"]
    assert not mid["done"], "the kill must interrupt training"
    subprocess.run(_train_cmd(killed, *flags, "--resume"), check=True,
                   env=_env(), capture_output=True)
    a, sa = _final_params(ref)
    b, sb = _final_params(killed)
    assert sa["step"] == sb["step"] and sa["best"] == sb["best"]
    for k in a:
        assert torch.equal(a[k], b[k]), k

    # the whole log of a resumed run equals the uninterrupted one, byte for byte (epoch train_loss included)
    assert (killed / "metrics.jsonl").read_bytes() == (ref / "metrics.jsonl").read_bytes()
    assert any("train_loss" in json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines())
    assert not list(killed.glob(".*.tmp")), "temp files of the kill are cleaned up on the next start"


@pytest.mark.parametrize("sparse", [False, True])
def test_ddp_two_processes_match_one(tmp_path, sparse):
    """Also with a node table and row-sparse gradients, which DDP does not bucket (averaged apart)."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["model.backbone.dropout=0.0", "train.max_steps=12", "train.log_every=1", "train.eval_every=100",
              f"model.node_table={str(sparse).lower()}", f"train.sparse={str(sparse).lower()}"]
    subprocess.run(_train_cmd(one, *common), check=True, env=_env(), capture_output=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "sidrec.cli"] + _train_cmd(two, *common)[3:]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]

    def losses(run):
        return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]

    l1, l2 = losses(one), losses(two)
    assert len(l1) == len(l2) == 12
    np.testing.assert_allclose(l1, l2, rtol=1e-4, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(4, 12), min_size=5, max_size=40), batch=st.integers(1, 9),
       seed=st.integers(0, 3))
def test_loss_weights_do_not_depend_on_batching(lengths, batch, seed):
    """An epoch's objective is the same with length-bucketed and random batches: every target (or
    every user) keeps its weight whatever batch it lands in. The old per-batch mean did not."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    rng = np.random.default_rng(seed)
    data = SequenceData(offsets, rng.integers(0, 9, offsets[-1]).astype(np.int32),
                        np.arange(len(lengths)).astype(str), pd.DataFrame({"item": np.arange(9).astype(str)}))
    nll = {}  # a fixed per-target loss, keyed by (row, position)
    for bucket in (True, False):
        tb = TrainBatches(data, max_len=50, batch_size=batch, seed=seed, bucket=bucket)
        for weighting in ("target", "user"):
            total, per_user = 0.0, np.zeros(len(tb.length))
            for rows in tb.order(0):
                w = tb.weights(rows, weighting).double().numpy()
                keys = [(r, t) for r in rows for t in range(tb.length[r])]
                vals = np.array([nll.setdefault(k, float(rng.uniform(0, 3))) for k in keys])
                total += float((w * vals).sum())
                np.add.at(per_user, np.repeat(rows, tb.length[rows]), w)
            if weighting == "user":  # every user's targets weigh the same in all
                np.testing.assert_allclose(per_user, per_user[0], rtol=1e-5)
            else:  # every target weighs the same: a user's share is its target count
                np.testing.assert_allclose(per_user / tb.length, per_user[0] / tb.length[0], rtol=1e-5)
            nll.setdefault(("total", weighting, bucket), total)
    for weighting in ("target", "user"):
        assert nll[("total", weighting, True)] == pytest.approx(nll[("total", weighting, False)], rel=1e-5)
