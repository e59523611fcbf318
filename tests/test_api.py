"""The Python API: the README's block runs as written; runs cross between Python and the CLI."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import sidrec
from sidrec.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"train": {"epochs": 2, "batch_size": 64}, "tokenizer": {"codebook_size": 16, "levels": 2, "embeddings": "latent"},
         "model": {"backbone": {"d_model": 16, "d_ff": 32, "n_heads": 1}}}


def test_readme_python_block_runs_as_written(tmp_path, monkeypatch, capsys):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Python API.*?```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert len(re.findall(r"'[^']+'", out[0])) == 5  # five raw item ids
    assert 0 <= float(out[-1]) <= 1
    assert (tmp_path / "runs/api-ar/model.safetensors").exists()


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return sidrec.synthetic(tmp_path_factory.mktemp("api") / "data", n_items=120, n_users=300)


def test_python_run_is_a_cli_run_and_back(tmp_path, syn, capsys):
    rec = sidrec.Recommender(head="ar", **SMALL).fit(syn, out=tmp_path / "py")
    # after fit the object holds the selected weights, the ones on disk
    disk, _ = sidrec.run.RunDir(tmp_path / "py").load_model()
    for (n, a), (_, b) in zip(rec.model.state_dict().items(), disk.state_dict().items()):
        assert torch.equal(a, b), n
    assert main(["evaluate", str(tmp_path / "py"), "--decode", "exact"]) == 0
    assert main(["verify", str(tmp_path / "py"), "--contexts", "32"]) == 0
    assert main(["recommend", str(tmp_path / "py"), "--history", "3,17,42", "-k", "4"]) == 0
    cli_ids = [ln.split()[1] for ln in capsys.readouterr().out.splitlines() if re.match(r"\s+\d+\s", ln)][-4:]
    ids, _ = rec.recommend([["3", "17", "42"]], k=4)
    assert cli_ids == list(ids[0])
    # and the reverse: a CLI run opened in Python
    cli = tmp_path / "cli"
    assert main(["train", "--out", str(cli), "--head", "fv", "--set", f"data.dir={syn.path}", "train.epochs=1",
                 "model.backbone.d_model=16", "model.backbone.d_ff=32", "model.backbone.n_heads=1"]) == 0
    fv = sidrec.Recommender.load(cli)
    assert fv.head == "fv" and fv.evaluate(splits="test", save=False)["test"]["exact"]["n_users"] == syn.n_users
    with pytest.raises(sidrec.errors.UserError, match="beam"):
        fv.recommend([["3"]], decode="beam")


def test_recommend_excludes_history_and_pads(tmp_path, syn):
    rec = sidrec.Recommender(head="ar", **SMALL).fit(syn, out=tmp_path / "r")
    hist = [[str(i) for i in range(0, 60)], ["5"]]
    for decode in ("exact", "beam"):
        ids, scores = rec.recommend(hist, k=80, decode=decode, beam=20)
        assert ids.shape == (2, 80) and not set(ids[0]) & set(hist[0])
        assert np.all(np.diff(scores[0][np.isfinite(scores[0])]) <= 1e-6)
    # one flag per history (a server batch mixes requests) = each history decoded on its own
    ih = [rec.item_index(h) for h in hist]
    for decode in ("exact", "beam"):
        mixed = rec.recommend_indices(ih, 10, decode=decode, exclude_seen=[False, True])[0]
        alone = [rec.recommend_indices([h], 10, decode=decode, exclude_seen=f)[0][0] for h, f in zip(ih, (False, True))]
        assert mixed.tolist() == [a.tolist() for a in alone]
    with pytest.raises(sidrec.errors.UserError, match="one per history"):
        rec.recommend_indices(ih, 10, exclude_seen=[True, False, True])
    ids, scores = rec.recommend(hist, k=120, exclude_seen=True)
    assert (ids[0] == "").sum() == 60 and np.isneginf(scores[0][-60:]).all()  # only 60 items are left
    with pytest.raises(sidrec.errors.UserError, match="unknown item"):
        rec.recommend([["nope"]])
    # ids match exactly: NumPy strings would read "5\x00" as "5"
    assert rec.item_index(["5\x00", "5", "\x005"]).tolist() == [-1, rec.item_index(["5"])[0], -1]
    with pytest.raises(sidrec.errors.UserError, match="unknown item"):
        rec.recommend([["5\x00"]])
    saved = rec.save(tmp_path / "copy")
    assert sidrec.Recommender.load(saved).recommend(hist[:1], k=5)[0].tolist() == rec.recommend(hist[:1], k=5)[0].tolist()
    (saved / "joint-mix.json").write_text('{"mix": 0.5}')  # what a joint run holds: sidrec's own file
    assert rec.save(saved, overwrite=True) == saved and not (saved / "joint-mix.json").exists()


def test_a_run_another_process_writes_is_refused_until_it_ends(tmp_path, syn, capsys):
    run = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from sidrec import io; "
                               "io.own_dir(sys.argv[1], 'run'); print('held', flush=True); time.sleep(120)", str(run)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (run / ".model.safetensors.123.tmp").write_bytes(b"half a checkpoint")  # the writer's, mid-save
        args = ["train", "--out", str(run), "--head", "fv", "--set", f"data.dir={syn.path}", "train.epochs=1",
                "model.backbone.d_model=16", "model.backbone.d_ff=32", "model.backbone.n_heads=1"]
        for extra in ([], ["--overwrite"], ["--resume"]):
            if extra:  # a checkpoint of the writer's: what --overwrite would delete, --resume would load
                (run / "model.safetensors").write_bytes(b"the writer's last checkpoint")
            assert main(args[:3] + extra + args[3:]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and "another sidrec process is writing" in err[0] and str(run) in err[0]
        for kw in ({"overwrite": True}, {"resume": True}):
            with pytest.raises(sidrec.errors.UserError, match="another sidrec process"):
                sidrec.Recommender(head="ar", **SMALL).fit(syn, out=run, **kw)
        # nothing of the writer's was deleted: not its temp file (a stale sweep), not its checkpoint (--overwrite)
        assert (run / ".model.safetensors.123.tmp").exists() and (run / "model.safetensors").exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(args[:3] + ["--overwrite"] + args[3:]) == 0  # the OS dropped the lock with its process
    assert main(args[:3] + ["--overwrite"] + args[3:]) == 0  # and this process let go of it when done


def test_from_frame_and_pyarrow(tmp_path):
    import pyarrow as pa

    rng = np.random.default_rng(0)
    df = pd.DataFrame({"u": np.repeat(np.arange(80), 6), "i": rng.integers(0, 25, 480), "t": np.tile(np.arange(6), 80)})
    data = sidrec.from_frame(pa.Table.from_pandas(df).to_pandas(), user_col="u", item_col="i", time_col="t", kcore=2)
    assert data.path is None and data.n_users == 80
    rec = sidrec.Recommender(head="fv", train={"epochs": 1}, model={"backbone": {"d_model": 16, "n_heads": 1}}).fit(
        data, out=tmp_path / "fv")
    assert (tmp_path / "fv" / "data" / "sequences.npz").exists()  # in-memory data travels with the run
    cfg = json.loads(json.dumps(rec.config))
    assert cfg["data"]["dir"] == "data"  # relative: the run directory can be moved
    os.rename(tmp_path / "fv", tmp_path / "moved")
    assert sidrec.Recommender.load(tmp_path / "moved").recommend([["1", "2"]], k=3)[0].shape == (1, 3)
    with pytest.raises(sidrec.errors.UserError, match="missing column"):
        sidrec.from_frame(df, user_col="user")


def test_defaults_are_the_recipe():
    from sidrec.config import load_config
    from sidrec.model import ModelConfig

    beauty = load_config(ROOT / "configs/beauty.yaml")
    recipe = load_config(None, default="recipe")
    for section in ("tokenizer", "model", "train", "eval"):
        assert beauty[section] == recipe[section], section
    m = ModelConfig()
    assert m.item_vectors and m.constrained and m.tied and m.backbone.dropout == beauty["model"]["backbone"]["dropout"]


def test_a_run_recorded_before_the_node_table_default_loads_as_trained(tmp_path, syn):
    """Runs written before `model.node_table` / `train.sparse` existed were free-item-vector heads on
    dense AdamW: with those keys missing from their config they still load and rank as trained,
    although the defaults are now the node table on the row-sparse path."""
    import yaml

    rec = sidrec.Recommender(head="ar", **{**SMALL, "model": {**SMALL["model"], "node_table": False},
                                           "train": {**SMALL["train"], "sparse": False}}).fit(syn, out=tmp_path / "r")
    want = rec.recommend([["3", "17"]], k=5)
    cfg_path = tmp_path / "r" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    del cfg["model"]["node_table"], cfg["train"]["sparse"]
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    old = sidrec.Recommender.load(tmp_path / "r")
    assert old.model.cfg.node_table is False
    assert old.recommend([["3", "17"]], k=5)[0].tolist() == want[0].tolist()
    from sidrec.model import ModelConfig
    from sidrec.train import TrainConfig

    assert ModelConfig().node_table and TrainConfig().sparse  # what a new run gets
