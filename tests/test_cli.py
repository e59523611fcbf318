"""The CLI end to end: synthetic default pipeline, real data (MovieLens-100k, Beauty), recommend, verify."""

import json

import pytest

from sidrec.cli import main

from .conftest import shared

SMALL = ["data.synthetic.n_items=200", "data.synthetic.n_users=500", "train.epochs=2", "train.batch_size=64",
         "model.backbone.d_model=32", "model.backbone.d_ff=64"]


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "syn"
    assert main(["run", "--out", str(out), "--set", *SMALL]) == 0
    return out


def test_run_writes_report_and_evals(synthetic_run):
    out = synthetic_run
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == {"ar", "fv", "parallel"}
    ar = json.loads((out / "ar" / "eval.json").read_text())
    assert set(ar["test"]) >= {"exact", "beam", "overlap@10"} and ar["test"]["beam"]["invalid_ids"] == 0
    assert ar["n_users"] == 500 and ar["n_items"] == 200 and ar["exclude_seen"] is False
    fv = json.loads((out / "fv" / "eval.json").read_text())
    assert set(fv["test"]) == {"exact"}
    for m in (ar["test"]["exact"], fv["test"]["exact"]):
        assert 0 < m["ndcg@10"] <= m["recall@10"] <= m["recall@20"] <= 1
    report = (out / "report.md").read_text()
    assert "Bayes-optimal" in report and "AR-NTP" in report and "plots/training.png" in report
    assert (out / "plots" / "training.png").stat().st_size > 1000
    assert (out / "ar" / "model.safetensors").exists() and (out / "ar" / "codebook" / "codebook.json").exists()
    assert summary["codebook"]["bijective"] is True


def test_recommend_and_errors(synthetic_run, capsys):
    assert main(["recommend", str(synthetic_run / "ar"), "--history", "3,17,42", "-k", "5"]) == 0
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines()[1:] if line.strip()]) == 5
    assert main(["recommend", str(synthetic_run / "ar"), "--history", "3,nope,x9", "--decode", "beam"]) == 2
    err = capsys.readouterr().err
    assert "unknown item id(s): nope, x9" in err


def test_evaluate_and_verify_cli(synthetic_run, capsys):
    assert main(["evaluate", str(synthetic_run / "ar"), "--decode", "beam", "--beam", "10"]) == 0
    ev = json.loads((synthetic_run / "ar" / "eval.json").read_text())
    assert ev["test"]["beam"]["beam"] == 10
    assert main(["verify", str(synthetic_run / "ar"), "--contexts", "64"]) == 0
    v = json.loads((synthetic_run / "ar" / "verify.json").read_text())
    assert v["all_pass"], v
    assert main(["verify", str(synthetic_run / "parallel"), "--contexts", "64"]) == 1  # a check fails: exit 1
    v = json.loads((synthetic_run / "parallel" / "verify.json").read_text())
    ident = [c for c in v["checks"] if c["check"] == "loss_identity"]
    assert not any(c["pass"] for c in ident)  # the non-AR head's loss is not -log of an item likelihood
    assert "Verification" in (synthetic_run / "parallel" / "report.md").read_text()


def test_export_items_feeds_tokenize(synthetic_run, tmp_path, capsys):
    """A trained run's item table round-trips to .npy and a codebook can be fitted on it."""
    import numpy as np
    import yaml

    from sidrec.run import RunDir

    npy = tmp_path / "items.npy"
    assert main(["export-items", str(synthetic_run / "fv"), "--out", str(npy)]) == 0
    w = np.load(npy, allow_pickle=False)
    model, cfg = RunDir.open(synthetic_run / "fv").load_model()
    np.testing.assert_array_equal(w, model.backbone.item_emb.weight[:200].detach().numpy())
    data_dir = yaml.safe_load((synthetic_run / "fv" / "config.yaml").read_text())["data"]["dir"]
    assert main(["tokenize", data_dir, "--embeddings", str(npy), "--codebook-size", "8", "--out",
                 str(tmp_path / "cb")]) == 0
    meta = json.loads((tmp_path / "cb" / "codebook.json").read_text())
    assert meta["bijective"] is True
    assert meta["tokenizer"]["codebook_size"] == 8 and meta["tokenizer"]["embeddings"] == str(npy)  # as train records
    assert main(["export-items", str(tmp_path / "nope"), "--out", str(npy)]) == 2
    assert main(["export-items", str(synthetic_run / "fv"), "--out", str(tmp_path / "x.txt")]) == 2


def test_compare_ar_and_fv_level_by_level(synthetic_run, tmp_path, capsys):
    """compare splits each run's likelihood per ID level; the split adds up to the run's own -log Q."""
    import numpy as np
    import torch

    from sidrec.data import SequenceData
    from sidrec.data.batching import eval_batches
    from sidrec.run import RunDir

    out = tmp_path / "cmp.json"
    assert main(["compare", str(synthetic_run / "ar"), str(synthetic_run / "fv"), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert "NLL per level" in capsys.readouterr().out
    k = res["levels"]
    assert set(res["ranking"]) == {"A", "B", "ensemble", *[f"{x}{j}+{y}" for j in range(1, k)
                                                         for x, y in (("A", "B"), ("B", "A"))]}
    model, cfg = RunDir.open(synthetic_run / "fv").load_model()
    data = SequenceData.load(cfg["data"]["dir"])
    nll = []
    with torch.no_grad():
        for u, items, lengths in eval_batches(data, "valid", model.cfg.backbone.max_len, 512):
            tgt = torch.from_numpy(data.targets("valid")[u].astype(np.int64))
            nll.append(model.head.nll(model.encode(items, lengths), tgt))
    assert abs(res["level_nll"]["B"]["total"] - torch.cat(nll).mean().item()) < 1e-3
    assert res["n_users"] == data.n_users and all(x > 0 for x in res["level_nll"]["A"]["per_level"])
    assert main(["compare", str(synthetic_run / "fv"), str(synthetic_run / "fv")]) == 2  # no trie
    assert "semantic IDs" in capsys.readouterr().err
    assert main(["compare", str(synthetic_run / "ar"), str(tmp_path)]) == 2


def test_evaluate_beam_on_fv_run_is_user_error(synthetic_run, capsys):
    assert main(["evaluate", str(synthetic_run / "fv"), "--decode", "beam"]) == 2
    assert "beam search needs an AR-NTP run" in capsys.readouterr().err


@pytest.mark.shared
def test_movielens_prepare_tokenize_train_evaluate(tmp_path, capsys):
    data = tmp_path / "ml"
    assert main(["data", "prepare", "--format", "ml-100k", "--path", str(shared("movielens-100k/raw/u.data")),
                 "--meta", str(shared("movielens-100k/raw/u.item")), "--kcore", "0", "--out", str(data)]) == 0
    assert "100000" in capsys.readouterr().out
    assert main(["tokenize", str(data), "--embeddings", "collab", "--levels", "2", "--codebook-size", "64",
                 "--out", str(tmp_path / "cb")]) == 0
    assert "bijective                        True" in capsys.readouterr().out
    run = tmp_path / "run"
    assert main(["train", "configs/ml-100k.yaml", "--out", str(run), "--set", f"data.dir={data}",
                 "tokenizer.embeddings=collab", "tokenizer.codebook_size=16", "train.epochs=3",
                 "train.warmup_steps=5", "train.lr=0.003",
                 "model.backbone.max_len=50", "model.backbone.d_model=32"]) == 0
    assert main(["evaluate", str(run)]) == 0
    ev = json.loads((run / "eval.json").read_text())
    assert ev["n_users"] == 943 and ev["n_items"] == 1682
    assert ev["test"]["exact"]["recall@20"] > 0.03  # 3 epochs beat random ranking (20/1682 = 0.012)
    # AR with tied item vectors at every level, selected and evaluated with seen items excluded
    run2 = tmp_path / "run-items"
    assert main(["train", "configs/ml-100k.yaml", "--out", str(run2), "--set", f"data.dir={data}",
                 "tokenizer.embeddings=collab", "tokenizer.codebook_size=16", "train.epochs=2",
                 "train.warmup_steps=5", "train.lr=0.003", "model.backbone.max_len=50",
                 "model.backbone.d_model=32", "eval.exclude_seen=true"]) == 0
    assert main(["evaluate", str(run2), "--decode", "exact"]) == 0  # the run's own protocol by default
    assert "eval-seen-excluded.json" in capsys.readouterr().out and not (run2 / "eval.json").exists()
    ex = json.loads((run2 / "eval-seen-excluded.json").read_text())
    assert ex["exclude_seen"] is True and ex["test"]["exact"]["recall@20"] > 0.03
    assert main(["evaluate", str(run2), "--decode", "exact", "--no-exclude-seen"]) == 0
    assert json.loads((run2 / "eval.json").read_text())["exclude_seen"] is False


def test_tokenize_beauty_from_cli(tmp_path, capsys, beauty_data):
    d = tmp_path / "beauty"
    beauty_data.save(d)
    assert main(["tokenize", str(d), "--embeddings", "collab", "--method", "opq", "--levels", "4",
                 "--out", str(tmp_path / "cb")]) == 0
    info = json.loads((tmp_path / "cb" / "codebook.json").read_text())
    assert info["bijective"] and info["n_items"] == 12101 and info["collisions"] == 0


def test_config_errors_are_user_errors(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), "--set", "train.nope=1"]) == 2
    assert "unknown config key 'train.nope'" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r"), "--set", "model.item_vectors=maybe"]) == 2
    assert "config key model.item_vectors: must be true or false" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r"), "--set", "model.constrained=false"]) == 2
    assert "model.item_vectors needs model.constrained: true" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r"), "--set", "model.root_score=lse"]) == 2
    assert "ablation that sidrec no longer has" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r"), "--set", "model.node_bias=maybe"]) == 2
    assert "model.node_bias" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    assert main(["run", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "invalid YAML" in capsys.readouterr().err


def test_embedded_default_equals_configs_synthetic():
    from sidrec.config import load_config

    a, b = load_config("configs/synthetic.yaml"), load_config(None)
    a.pop("_config_dir", None), b.pop("_config_dir", None)
    assert a == b


def test_text_embeddings_offline(tmp_path):
    from sidrec.data import SequenceData
    from sidrec.data.synth import make_synthetic, save_synthetic
    from sidrec.embed import get_embeddings

    d, w = make_synthetic(60, 20)
    save_synthetic(d, w, tmp_path / "s")
    data = SequenceData.load(tmp_path / "s")
    e = get_embeddings(data, "text")
    assert e.shape == (60, 384)
    assert (tmp_path / "s" / "embeddings").exists()  # cached
    # same-subcategory titles are closer than random pairs

    same = w.subcategory[:, None] == w.subcategory[None, :]
    sims = e @ e.T
    assert sims[same].mean() > sims[~same].mean()


@pytest.mark.parametrize("cmd", [[], ["data"], ["data", "prepare"], ["data", "synth"], ["data", "stats"],
                                 ["data", "download"], ["tokenize"], ["train"], ["evaluate"], ["run"],
                                 ["recommend"], ["export-items"], ["compare"], ["verify"]])
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    assert "usage: sidrec" in capsys.readouterr().out


def test_items_add_help_names_the_default_vector_rule(capsys):
    with pytest.raises(SystemExit):
        main(["items", "add", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "nearest trained item by content (--vectors content, the default)" in text


def test_run_with_the_joint_head_alone_then_verify_and_save_it(tmp_path, capsys):
    out = tmp_path / "j"
    assert main(["run", "--out", str(out), "--set", *SMALL, "heads=joint"]) == 0
    joint = out / "joint"
    assert (joint / "joint-mix.json").is_file() and (joint / "eval.json").is_file()
    assert not any((out / h).exists() for h in ("ar", "fv", "parallel"))
    capsys.readouterr()
    assert main(["verify", str(joint), "--contexts", "32"]) == 0  # its AR part is the exact FV-MLE it claims
    report = json.loads((joint / "verify.json").read_text())
    assert report["all_pass"] is True and report["head"] == "joint"
    import sidrec

    rec = sidrec.Recommender.load(joint)
    copy = rec.save(tmp_path / "copy")
    assert rec.save(copy, overwrite=True) == copy  # a joint run's own files are sidrec's (joint-mix.json)
    assert json.loads((copy / "joint-mix.json").read_text()) == json.loads((joint / "joint-mix.json").read_text())


def test_a_log_without_timestamps_reads_alike_from_data_prepare_and_from_a_config(tmp_path):
    """time_col "none" (file order) means the same in `data prepare` and in a config's data section."""
    import numpy as np

    rng = np.random.default_rng(0)
    rows = [f"u{u},i{i}" for u in range(120) for i in rng.choice(40, size=8, replace=False)]
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id\n" + "\n".join(rows) + "\n")
    assert main(["data", "prepare", "--format", "csv", "--path", str(log), "--time-col", "none",
                 "--out", str(tmp_path / "d")]) == 0
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--head", "fv", "--set", "data.synthetic=null", "data.format=csv",
                 f"data.path={log}", "data.time_col=none", "train.epochs=1", "model.backbone.d_model=16",
                 "model.backbone.d_ff=32", "model.backbone.n_heads=1"]) == 0
    a, b = (np.load(p / "sequences.npz", allow_pickle=False) for p in (tmp_path / "d", run / "data"))
    assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)


def test_tokenize_options_are_the_config_keys_they_mirror(capsys):
    from sidrec.cli import build_parser
    from sidrec.config import DEFAULTS

    a = build_parser().parse_args(["tokenize", "d", "--out", "o"])
    assert {k: getattr(a, k) for k in DEFAULTS["tokenizer"]} == DEFAULTS["tokenizer"]
    with pytest.raises(SystemExit) as e:
        main(["tokenize", "d", "--out", "o", "--codebook-size", "1"])  # the schema's range: >= 2
    assert e.value.code == 2 and "must be in [2, " in capsys.readouterr().err
