"""Trust: no command loses a user's file, stale stages are remade or refused, failures are loud,
and every user error (corrupt run files, typed config values, option ranges, devices, output
paths) is one line and exit 2 with no traceback."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidrec.cli import main

TINY = ["data.synthetic.n_items=120", "data.synthetic.n_users=300", "train.epochs=2", "train.batch_size=64",
        "model.backbone.d_model=16", "model.backbone.d_ff=32", "model.backbone.n_heads=1",
        "tokenizer.embeddings=latent", "tokenizer.levels=2", "tokenizer.codebook_size=16"]


def snapshot(root: Path) -> dict:
    """Every file under root with its content hash (the user's data, to compare before/after)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def user_error(capsys, argv) -> str:
    """Run the CLI; assert exit 2 with one 'sidrec...: error:' line and no traceback; return stderr."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, (argv, code, err)
    assert "Traceback" not in err and "error:" in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small trained AR-NTP run with its own data/ and codebook/ (sidrec train)."""
    run = tmp_path_factory.mktemp("trust") / "run"
    assert main(["train", "--out", str(run), "--set", *TINY]) == 0
    return run


@pytest.fixture()
def user_dir(tmp_path):
    """A user's folder with a file of their own and a small interaction log."""
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("precious")
    rng = np.random.default_rng(0)
    rows = [f"{u},{rng.integers(0, 25)},{t}" for u in range(60) for t in range(8)]
    (d / "log.csv").write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    return d


# ------------------------------------------------------------------------------------ no data loss
def test_no_command_touches_a_foreign_directory(capsys, tmp_path, user_dir, trained):
    before = snapshot(user_dir)
    log = str(user_dir / "log.csv")
    cases = [
        ["data", "prepare", "--format", "csv", "--path", log, "--out", str(user_dir), "--kcore", "2"],
        ["data", "prepare", "--format", "csv", "--path", log, "--out", str(user_dir), "--kcore", "2", "--overwrite"],
        ["data", "synth", "--out", str(user_dir), "--items", "50", "--users", "50", "--overwrite"],
        ["tokenize", str(trained / "data"), "--embeddings", "latent", "--out", str(user_dir), "--overwrite"],
        ["train", "--out", str(user_dir), "--set", *TINY],
        ["train", "--out", str(user_dir), "--overwrite", "--set", *TINY],
        ["run", "--out", str(user_dir), "--set", *TINY],
        ["verify", "--synthetic", "--quick", "--out", str(user_dir), "--overwrite"],
        ["data", "download", "ml-100k", "--out", str(user_dir)],
        ["export-items", str(trained), "--out", str(user_dir)],
        ["compare", str(trained), str(trained), "--out", str(user_dir / "notes.txt")],
    ]
    for argv in cases:
        err = user_error(capsys, argv)
        assert str(user_dir) in err
    assert snapshot(user_dir) == before
    assert sorted(p.name for p in user_dir.parent.iterdir()) == ["mine"], "no temp files next to it either"


def test_input_folder_and_other_kinds_are_refused(capsys, tmp_path, user_dir, trained):
    log = str(user_dir / "log.csv")
    data = tmp_path / "data"
    assert main(["data", "prepare", "--format", "csv", "--path", log, "--out", str(data), "--kcore", "2"]) == 0
    before = snapshot(data)
    # the dataset given as a codebook's --out, even with --overwrite: a data dir is not a codebook dir
    err = user_error(capsys, ["tokenize", str(data), "--embeddings", "collab", "--codebook-size", "4", "--out",
                              str(data), "--overwrite"])
    assert "own input" in err
    err = user_error(capsys, ["train", "--out", str(data), "--set", *TINY])
    assert "data directory, not a run directory" in err
    # an existing data dir is replaced only with --overwrite, and then only by a data dir
    err = user_error(capsys, ["data", "prepare", "--format", "csv", "--path", log, "--out", str(data), "--kcore", "2"])
    assert "--overwrite" in err
    assert snapshot(data) == before
    assert main(["data", "prepare", "--format", "csv", "--path", log, "--out", str(data), "--kcore", "3",
                 "--overwrite"]) == 0
    assert json.loads((data / "prepare.json").read_text())["kcore"] == 3
    # a file at --out is never moved aside
    f = tmp_path / "afile"
    f.write_text("x")
    user_error(capsys, ["data", "prepare", "--format", "csv", "--path", log, "--out", str(f)])
    assert f.read_text() == "x" and not list(tmp_path.glob(".afile*"))


def test_file_outputs_need_overwrite(capsys, tmp_path, trained):
    npy = tmp_path / "items.npy"
    npy.write_bytes(b"mine")
    err = user_error(capsys, ["export-items", str(trained), "--out", str(npy)])
    assert "--overwrite" in err and npy.read_bytes() == b"mine"
    assert main(["export-items", str(trained), "--out", str(npy), "--overwrite"]) == 0
    assert np.load(npy, allow_pickle=False).shape[0] == 120


def test_stale_temp_files_are_cleaned_on_the_next_start(tmp_path, trained):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / ".trainer_state.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    (run / ".codebook.xyz.tmp").mkdir()
    assert main(["train", "--out", str(run), "--resume", "--set", *TINY]) == 0
    assert not list(run.glob(".*.tmp"))


# ------------------------------------------------------------------------------- stale results
def test_run_remakes_exactly_the_stale_stages(tmp_path, capsys):
    out = tmp_path / "p"
    small = [*TINY, "heads=[ar,fv]"]
    assert main(["run", "--out", str(out), "--set", *small]) == 0
    stamp = {h: (out / h / "model.safetensors").stat().st_mtime_ns for h in ("ar", "fv")}
    capsys.readouterr()
    assert main(["run", "--out", str(out), "--set", *small]) == 0  # nothing changed: everything reused
    assert "again" not in capsys.readouterr().err
    assert all((out / h / "model.safetensors").stat().st_mtime_ns == stamp[h] for h in stamp)
    # a tokenizer change refits the codebook and retrains AR-NTP; FV-MLE (item ids) is reused
    assert main(["run", "--out", str(out), "--set", *small, "tokenizer.codebook_size=12"]) == 0
    err = capsys.readouterr().err
    assert "tokenizer.codebook_size" in err and "ar was trained with other settings" in err
    assert (out / "ar" / "model.safetensors").stat().st_mtime_ns != stamp["ar"]
    assert (out / "fv" / "model.safetensors").stat().st_mtime_ns == stamp["fv"]
    # the report and configs describe what ran
    assert yaml.safe_load((out / "ar" / "config.yaml").read_text())["tokenizer"]["codebook_size"] == 12
    assert main(["run", "--out", str(out), "--set", *small, "tokenizer.codebook_size=12", "train.lr=0.003"]) == 0
    err = capsys.readouterr().err
    assert "fv was trained with other settings (train.lr)" in err


def test_resume_with_changed_settings_is_refused_before_writing(capsys, tmp_path, trained):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = snapshot(run)
    err = user_error(capsys, ["train", "--out", str(run), "--resume", "--set", *TINY, "train.lr=0.01",
                              "model.backbone.d_model=32"])
    assert "model.backbone.d_model, train.lr" in err
    err = user_error(capsys, ["train", "--out", str(run), "--resume", "--set", *TINY, "tokenizer.codebook_size=12"])
    assert "codebook" in err and "tokenizer.codebook_size" in err
    err = user_error(capsys, ["train", "--out", str(run), "--set", *TINY])  # neither --resume nor --overwrite
    assert "--resume" in err and "--overwrite" in err
    assert snapshot(run) == before
    # settings that do not change the weights may change on resume
    assert main(["train", "--out", str(run), "--resume", "--set", *TINY, "train.device=cpu",
                 "train.eval_batch_size=7"]) == 0


# -------------------------------------------------------------------------------- loud failures
def test_verify_exits_1_and_names_colliding_items(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--set", *TINY, "tokenizer.resolve=none",
                 "tokenizer.codebook_size=4"]) == 0
    capsys.readouterr()
    assert main(["verify", str(run), "--contexts", "32"]) == 1
    out, err = capsys.readouterr()
    v = json.loads((run / "verify.json").read_text())
    bij = next(c for c in v["checks"] if c["check"] == "bijection")
    assert not bij["pass"] and bij["colliding_items"] and all(len(g) >= 2 for g in bij["colliding_items"])
    assert " = ".join(bij["colliding_items"][0]) in out
    assert "verify failed: bijection" in err and not v["all_pass"]
    # loading the run elsewhere warns
    assert main(["recommend", str(run), "--history", "1,2,3", "-k", "3"]) == 0
    assert "not bijective" in capsys.readouterr().err


def test_float32_tolerance_scales_with_the_logits():
    import torch

    from sidrec.verify.checks import check_loss_identity, check_normalization, rounding_tolerance

    class Head:  # a correct distribution whose logits are large: float32 rounding only
        def __init__(self, scale):
            self.w = torch.randn(8, 500, generator=torch.Generator().manual_seed(0)) * scale

        def log_prob_all(self, h):
            return torch.log_softmax(h @ self.w.to(h.dtype), 1)

        def nll(self, h, t):  # the same quantity by another float path
            z = h @ self.w.to(h.dtype)
            return torch.logsumexp(z, 1) - z.gather(1, t[:, None]).squeeze(1)

    h, t = torch.randn(64, 8), torch.randint(0, 500, (64,))
    for scale in (1.0, 30.0):
        head = Head(scale)
        assert check_normalization(head, h)["pass"] and check_loss_identity(head, h, t)["pass"]
    tol_small, _ = rounding_tolerance(torch.tensor([-0.5]), 1e-5)
    tol_big, _ = rounding_tolerance(torch.tensor([-2000.0]), 1e-5)
    assert tol_small == 1e-5 < tol_big


# ------------------------------------------------------------------------------ user errors: exit 2
CORRUPT = {
    "model.safetensors": b"\x00\x01not safetensors",
    "config.yaml": b"model: [1, 2\n",
    "codebook/codebook.npz": b"PK\x03\x04 truncated",
    "codebook/codebook.json": b"{\"sizes\": [16,",
    "trainer_state.pt": b"garbage",
    "data/sequences.npz": b"",
    "data/items.parquet": b"PAR1 nope",
    "data/prepare.json": b"[1,",
    ".sidrec.json": b"{\"kind\": \"nope\"}",
}


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_corrupt_run_files_name_the_file(capsys, tmp_path, trained, name):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["dir"] = str(run / "data")  # the copy reads its own data
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / name).write_bytes(CORRUPT[name])
    commands = [["evaluate", str(run), "--decode", "exact"], ["recommend", str(run), "--history", "1,2"],
                ["verify", str(run), "--contexts", "8"], ["train", "--out", str(run), "--resume", "--set", *TINY],
                ["export-items", str(run), "--out", str(tmp_path / "e.npy")]]
    if name == "trainer_state.pt":
        commands = commands[3:4]  # only a resume reads the checkpoint
    if name.startswith(".sidrec"):  # read by the commands that write into the run
        commands = [c for c in commands if c[0] in ("evaluate", "train")]
    if name == "config.yaml":  # train --resume takes its config from the command line (and rewrites it)
        commands = [c for c in commands if c[0] != "train"]
    if name.startswith("data/"):
        commands = [c for c in commands if c[0] != "export-items"]  # export reads no data
    if name == "data/prepare.json":
        commands = commands[:3]
    for argv in commands:
        err = user_error(capsys, argv)
        assert Path(name).name in err, (argv, err)


BAD_SETTINGS = ["train.epochs=0", "train.epochs=-3", "train.patience=-1", "train.lr=0", "train.lr=fast",
                "train.batch_size=2.5", "train.schedule=linear", "train.device=tpu", "train.amp=maybe",
                "model.head=gpt", "model.backbone.dropout=1", "model.backbone.n_heads=0", "model.tied=1",
                "model.head_hidden=0", "data.kcore=-5", "data.max_seq_len=0", "data.dedup=some",
                "data.synthetic.n_items=x", "tokenizer.levels=0", "tokenizer.codebook_size=1",
                "tokenizer.method=lsh", "eval.beam=0", "eval.beam_widths=[0]", "heads=[]", "heads=[gpt]",
                "name=null", "train.nope=1", "model.backbone.d_model=31"]


@pytest.mark.parametrize("setting", BAD_SETTINGS)
def test_bad_config_values_are_user_errors(capsys, tmp_path, setting):
    err = user_error(capsys, ["train", "--out", str(tmp_path / "r"), "--set", setting])
    assert setting.split("=")[0].split(".")[-1] in err
    assert not (tmp_path / "r").exists(), "nothing is written for a bad config"


def test_bad_yaml_types_name_the_key(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  epochs: ten\n")
    assert "train.epochs" in user_error(capsys, ["run", str(cfg), "--out", str(tmp_path / "r")])
    cfg.write_text("model: 3\n")
    user_error(capsys, ["run", str(cfg), "--out", str(tmp_path / "r")])


BAD_OPTIONS = [["recommend", "{run}", "--history", "1", "-k", "0"], ["recommend", "{run}", "--history", "1", "--beam", "0"],
               ["recommend", "{run}", "--history", "1", "-k", "100000"], ["recommend", "{run}", "--history", " , "],
               ["evaluate", "{run}", "--beam", "0"], ["evaluate", "{run}", "--batch-size", "-1"],
               ["evaluate", "{run}", "--device", "cuda"], ["verify", "{run}", "--contexts", "0"],
               ["data", "prepare", "--format", "seq", "--path", "x", "--out", "{tmp}/d", "--kcore", "-5"],
               ["data", "prepare", "--format", "seq", "--path", "x", "--out", "{tmp}/d", "--max-seq-len", "0"],
               ["data", "synth", "--out", "{tmp}/d", "--items", "0"],
               ["tokenize", "{run}/data", "--levels", "0", "--out", "{tmp}/cb"],
               ["tokenize", "{run}/data", "--codebook-size", "1", "--out", "{tmp}/cb"],
               ["compare", "{run}", "{run}", "--batch-size", "0"],
               ["evaluate", "{tmp}/nothing"], ["recommend", "{tmp}", "--history", "1"]]


@pytest.mark.parametrize("argv", BAD_OPTIONS, ids=lambda a: " ".join(a[:1] + a[2:])[:40])
def test_out_of_range_options_are_user_errors(capsys, tmp_path, trained, argv):
    import torch

    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("a GPU is there")
    user_error(capsys, [a.format(run=trained, tmp=tmp_path) for a in argv])


def test_unwritable_output_is_a_user_error(capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    user_error(capsys, ["data", "synth", "--out", str(f / "sub"), "--items", "20", "--users", "20"])
    assert f.read_text() == "x"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(sorted(__import__("sidrec.config", fromlist=["SCHEMA"]).SCHEMA)),
       value=st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                       st.text(max_size=8), st.lists(st.integers(), max_size=3)))
def test_any_config_value_is_accepted_or_a_user_error(key, value):
    """Whatever value a key gets, loading either succeeds with a value of the key's type or raises
    UserError naming the key: never another exception."""
    from sidrec.config import load_config
    from sidrec.errors import UserError

    try:
        cfg = load_config(None, [f"{key}={json.dumps(value)}"])
    except UserError as e:
        assert key.split(".")[-1] in str(e) or "synthetic" in str(e) or "d_model" in str(e) or "needs" in str(e)
        return
    node = cfg
    for part in key.split("."):
        node = node[part]
    assert node is None or isinstance(node, (bool, int, float, str))


# --------------------------------------------- malformed inputs found by an adversarial probe
def _copy_run(trained, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["dir"] = str(run / "data")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run


STRUCTURE = ["data=5", "model=[1]", "model.backbone=5", "_config_dir=5", "train.lr=.inf", "train.seed=-5",
             "data.synthetic.seed=-1", "data.sep=''", "model.backbone.max_len=1000000000", "data=5 data.kcore=3"]


@pytest.mark.parametrize("setting", STRUCTURE)
def test_config_structure_errors(capsys, tmp_path, setting):
    user_error(capsys, ["train", "--out", str(tmp_path / "r"), "--set", *setting.split()])


def test_binary_and_list_config_files(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"\x00\x01\xff\xfe junk")
    assert "c.yaml" in user_error(capsys, ["train", str(cfg), "--out", str(tmp_path / "r")])
    cfg.write_text("data: [1, 2]\n")
    assert "config key data" in user_error(capsys, ["train", str(cfg), "--out", str(tmp_path / "r")])


def _npy(path, arr):
    np.save(path, arr, allow_pickle=False)
    return str(path)


@pytest.mark.parametrize("make", [lambda n: np.zeros((n, 0), np.float32), lambda n: np.ones((n, 4), np.complex64),
                                  lambda n: np.ones((n - 1, 4), np.float32), lambda n: np.full((n, 4), np.nan)])
def test_bad_embedding_files(capsys, tmp_path, trained, make):
    emb = _npy(tmp_path / "e.npy", make(120))
    user_error(capsys, ["tokenize", str(trained / "data"), "--embeddings", emb, "--codebook-size", "16",
                        "--levels", "2", "--out", str(tmp_path / "cb")])
    assert not (tmp_path / "cb").exists()


def test_broken_synthetic_world_and_codebook_sizes(capsys, tmp_path, trained):
    run = _copy_run(trained, tmp_path)
    arrays = dict(np.load(run / "data" / "world.npz"))
    np.savez(run / "data" / "world.npz", **{k: v for k, v in arrays.items() if k != "latent"})
    assert "world.npz" in user_error(capsys, ["tokenize", str(run / "data"), "--embeddings", "latent",
                                               "--codebook-size", "16", "--out", str(tmp_path / "cb")])
    cb = dict(np.load(run / "codebook" / "codebook.npz"))
    np.savez(run / "codebook" / "codebook.npz", **{**cb, "codes": cb["codes"][:50]})
    for argv in (["evaluate", str(run), "--decode", "exact"], ["verify", str(run), "--contexts", "8"]):
        assert "codebook" in user_error(capsys, argv)


def test_malformed_run_state(capsys, tmp_path, trained):
    import torch

    run = _copy_run(trained, tmp_path)
    marker = json.loads((run / ".sidrec.json").read_text())
    (run / ".sidrec.json").write_text(json.dumps({**marker, "inputs": [1, 2]}))
    assert ".sidrec.json" in user_error(capsys, ["train", "--out", str(run), "--resume", "--set", *TINY])
    (run / ".sidrec.json").write_text(json.dumps(marker))
    log = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(log + "5\n")
    assert "metrics.jsonl" in user_error(capsys, ["train", "--out", str(run), "--resume", "--set", *TINY])
    (run / "metrics.jsonl").write_text(log)
    blob = torch.load(run / "trainer_state.pt", weights_only=True)
    torch.save({**blob, "state": {**blob["state"], "step": "x"}}, run / "trainer_state.pt")
    assert "trainer_state.pt" in user_error(capsys, ["train", "--out", str(run), "--resume", "--set", *TINY])


def test_malformed_stored_evaluation_is_made_again(tmp_path):
    out = tmp_path / "p"
    small = [*TINY, "heads=[ar]"]
    assert main(["run", "--out", str(out), "--set", *small]) == 0
    ev = json.loads((out / "ar" / "eval.json").read_text())
    (out / "ar" / "eval.json").write_text(json.dumps({**ev, "valid": [1]}))
    assert main(["run", "--out", str(out), "--set", *small]) == 0
    assert json.loads((out / "ar" / "eval.json").read_text())["valid"]["exact"]["ndcg@10"] >= 0


def test_float_offsets_and_empty_ids(capsys, tmp_path, trained):
    run = _copy_run(trained, tmp_path)
    seq = dict(np.load(run / "data" / "sequences.npz"))
    np.savez(run / "data" / "sequences.npz", **{**seq, "offsets": seq["offsets"].astype(np.float64)})
    assert "sequences.npz" in user_error(capsys, ["data", "stats", str(run / "data")])
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,timestamp\n1,a,1\n1,,2\n")
    assert f"{log}, line 3" in user_error(capsys, ["data", "prepare", "--format", "csv", "--path", str(log),
                                                    "--out", str(tmp_path / "d"), "--kcore", "0"])
    user_error(capsys, ["data", "prepare", "--format", "csv", "--path", str(log), "--out", str(tmp_path / "d"),
                        "--sep", ""])
    user_error(capsys, ["data", "download", "ml-100k", "--out", str(tmp_path / "dl"), "--mirror", "http://[::1"])


def test_overwrite_never_deletes_files_the_user_put_inside(capsys, tmp_path, trained):
    cb = tmp_path / "cb"
    args = ["tokenize", str(trained / "data"), "--embeddings", "latent", "--levels", "2", "--codebook-size", "16",
            "--out", str(cb)]
    assert main(args) == 0
    (cb / "notes.txt").write_text("mine")
    assert "notes.txt" in user_error(capsys, [*args, "--overwrite"])
    assert (cb / "notes.txt").read_text() == "mine"


def test_no_writes_into_a_run_directory_sidrec_did_not_make(capsys, tmp_path, trained):
    run = _copy_run(trained, tmp_path)
    for name in (".sidrec.json", "metrics.jsonl", "timings.jsonl", "trainer_state.pt"):
        (run / name).unlink()
    (run / "eval.json").write_text("MINE")
    (run / "verify.json").write_text("MINE")
    user_error(capsys, ["evaluate", str(run), "--decode", "exact", "--no-exclude-seen"])
    user_error(capsys, ["verify", str(run), "--contexts", "8"])
    assert (run / "eval.json").read_text() == "MINE" and (run / "verify.json").read_text() == "MINE"


# ------------------------------------------------------------------------- the second probe's finds
def test_deep_yaml_and_stored_config_types(capsys, tmp_path, trained):
    cfg = tmp_path / "deep.yaml"
    cfg.write_text("train: " + "[" * 6000 + "\n")
    assert "deep.yaml" in user_error(capsys, ["train", str(cfg), "--out", str(tmp_path / "r")])
    user_error(capsys, ["train", "--out", str(tmp_path / "r"), "--set", "name=" + "[" * 6000 + "]" * 6000])
    for key, value in (("eval.beam", "x"), ("eval.batch_size", 0), ("model.constrained", "yes"), ("model.tied", [1]),
                       ("eval.beam_widths", [0, -1])):
        run = _copy_run(trained, tmp_path / key)
        stored = yaml.safe_load((run / "config.yaml").read_text())
        section, name = key.split(".")
        stored[section][name] = value
        (run / "config.yaml").write_text(yaml.safe_dump(stored))
        err = user_error(capsys, ["evaluate", str(run), "--decode", "exact"])
        assert key in err and "config.yaml" in err


def test_set_data_without_a_config_file_replaces_the_synthetic_default(tmp_path, user_dir):
    from sidrec.config import load_config

    cfg = load_config(None, ["data.format=csv", f"data.path={user_dir / 'log.csv'}"])
    assert cfg["data"]["synthetic"] is None and cfg["data"]["format"] == "csv"
    assert load_config(None, ["data.synthetic=null", "data.dir=/x"])["data"]["synthetic"] is None
    from sidrec.errors import UserError
    with pytest.raises(UserError, match="one data source"):
        load_config(None, ["data.dir=/x", "data.synthetic.n_items=10"])


def test_conflicting_options_and_odd_inputs(capsys, tmp_path, trained, user_dir):
    with pytest.raises(SystemExit) as e:
        main(["train", "--out", str(tmp_path / "r"), "--resume", "--overwrite"])
    assert e.value.code == 2
    capsys.readouterr()
    user_error(capsys, ["verify", str(trained), "--synthetic", "--out", str(tmp_path / "v")])
    user_error(capsys, ["verify", str(trained), "--quick"])
    user_error(capsys, ["data", "download", "ml-100k", "--out", str(tmp_path / "d"), "--mirror", ""])
    user_error(capsys, ["data", "prepare", "--format", "csv", "--path", str(user_dir / "log.csv"), "--out",
                        str(tmp_path / "p"), "--item-col", "user_id"])
    run = _copy_run(trained, tmp_path)
    arrays = dict(np.load(run / "data" / "world.npz"))
    np.savez(run / "data" / "world.npz", **{**arrays, "latent": arrays["latent"][:50], "bias": arrays["bias"][:50],
                                             "category": arrays["category"][:50],
                                             "subcategory": arrays["subcategory"][:50]})
    out = tmp_path / "pipe"
    assert "world.npz" in user_error(capsys, ["run", "--out", str(out), "--set", *TINY, "heads=[fv]",
                                               f"data.dir={run / 'data'}", "data.synthetic=null"])


# ---------------------------------------------------------------------- a reviewer's finds
def test_review_fixes(tmp_path, trained):
    import pandas as pd

    import sidrec
    from sidrec.errors import UserError
    from sidrec.run import RunDir, digest

    assert digest({"train.lr": 1}) == digest({"train.lr": 1.0})
    # a stored evaluation describes the weights it scored: rewritten weights make it stale
    run = _copy_run(trained, tmp_path)
    assert main(["evaluate", str(run), "--decode", "exact", "--no-exclude-seen"]) == 0
    rd = RunDir(run)
    assert rd.read_eval(False, 20) is not None and rd.read_eval(False, 20, ("exact", "beam")) is None
    model, _ = rd.load_model()
    rd.save_weights(model)
    assert rd.read_eval(False, 20) is None
    # fit refuses a trained run before touching its data; save(overwrite) never deletes the user's files
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"user_id": np.repeat(np.arange(60), 6), "item_id": rng.integers(0, 20, 360),
                       "timestamp": np.tile(np.arange(6), 60)})
    small = {"train": {"epochs": 1}, "model": {"backbone": {"d_model": 16, "n_heads": 1}}}
    rec = sidrec.Recommender(head="fv", **small).fit(sidrec.from_frame(df, kcore=2), out=tmp_path / "fv")
    before = snapshot(tmp_path / "fv")
    other = df.assign(item_id=(df["item_id"] + 1) % 20)
    with pytest.raises(UserError, match="already holds a trained run"):
        sidrec.Recommender(head="fv", **small).fit(sidrec.from_frame(other, kcore=2), out=tmp_path / "fv")
    with pytest.raises(UserError, match="other data"):
        sidrec.Recommender(head="fv", **small).fit(sidrec.from_frame(other, kcore=2), out=tmp_path / "fv", resume=True)
    assert snapshot(tmp_path / "fv") == before
    target = tmp_path / "target"
    rec.save(target)
    (target / "important.txt").write_text("mine")
    with pytest.raises(UserError, match="important.txt"):
        rec.save(target, overwrite=True)
    assert (target / "important.txt").read_text() == "mine"
