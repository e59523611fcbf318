"""New items: IDs from the fitted tokenizer (no refit), catalogue versions of a trained run, and the
model, CLI, API and server serving them at once."""

import time

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sidrec
from sidrec.model.extend import prefix_mean
from sidrec.cli import main
from sidrec.errors import UserError
from sidrec.serve.process import ServerProcess
from sidrec.tokenize import fit_codebook
from sidrec.tokenize.encode import FittedQuantizer, encode_new

METHODS = ["rq-kmeans", "rq-kmeans-balanced", "pq", "opq", "rq-vae"]


def _fit(method, x, levels=3, size=16, **kw):
    if method == "rq-vae":
        from sidrec.tokenize import RQVAEConfig

        kw["rqvae"] = RQVAEConfig(hidden=(32,), latent_dim=8, epochs=3)
    return fit_codebook(x, method, levels, size, seed=0, **kw)


@pytest.mark.parametrize("method", ["rq-kmeans", "pq", "opq", "rq-vae"])
def test_encoding_a_fitted_item_again_gives_its_own_code(method):
    """The saved parameters map a fitted item's embedding back to its own code, except for the items
    collision resolution moved off their nearest ID (at most one per collision; none in a sparse ID
    space). Balanced RQ-KMeans is the exception by design: its fit caps cluster sizes, while a new
    item simply takes the nearest centroid."""
    x = np.random.default_rng(0).normal(size=(150, 12)).astype(np.float32)
    cb = _fit(method, x, levels=3, size=32)
    moved = (FittedQuantizer.from_codebook(cb).encode(x) != cb.codes).any(1).sum()
    assert moved <= cb.meta["collisions_before_resolution"] <= 2
    codes, report = encode_new(cb, x[:0])
    assert codes.shape == (0, 3) and report.n_new == 0


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(METHODS[:4] + ["extra"]), n=st.integers(20, 200), m=st.integers(1, 120),
       size=st.sampled_from([4, 8]), seed=st.integers(0, 1000))
def test_new_items_keep_the_bijection_and_existing_codes(method, n, m, size, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n + m, 6)).astype(np.float32)
    if method == "extra":
        cb = fit_codebook(x[:n], "rq-kmeans", 2, size, resolve_strategy="extra-token", seed=0)
        if n + m > np.prod(cb.sizes):  # more items than IDs: refused, naming the way out
            with pytest.raises(UserError, match="no free semantic ID"):
                encode_new(cb, x[n:])
            return
    else:
        if n + m > size ** 3:
            return
        cb = _fit(method, x[:n], levels=3, size=size)
    before = cb.codes.copy()
    codes, report = encode_new(cb, x[n:])
    ext = cb.extend(codes)  # refuses a non-bijective result
    assert ext.bijective and ext.n_items == n + m
    np.testing.assert_array_equal(ext.codes[:n], before)  # existing codes never move
    assert report.direct + report.resolved + report.fallback == m
    again, _ = encode_new(cb, x[n:])  # deterministic: same items, same order, same IDs
    np.testing.assert_array_equal(again, codes)
    # items that found their nearest ID free got exactly it
    fq = FittedQuantizer.from_codebook(cb)
    nearest = fq.encode(x[n:])
    assert (codes[:, : fq.levels] == nearest).all(1).sum() >= report.direct


def test_a_full_prefix_falls_back_and_a_full_space_is_a_user_error():
    x = np.random.default_rng(1).normal(size=(60, 4)).astype(np.float32)
    cb = fit_codebook(x[:14], "rq-kmeans", 2, 4, seed=0)  # 16 IDs, 14 taken
    codes, report = encode_new(cb, x[14:16])
    assert cb.extend(codes).bijective and report.direct + report.resolved + report.fallback == 2
    with pytest.raises(UserError, match="no free semantic ID"):
        encode_new(cb, x[14:17])


def test_prefix_mean_uses_the_longest_shared_prefix():
    base = np.array([[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0]])
    vals = torch.tensor([[1.0], [3.0], [10.0], [100.0]], dtype=torch.float64)
    query = np.array([[0, 0, 2], [0, 1, 3], [0, 2, 0], [2, 0, 0]])
    got = prefix_mean(base, vals, query, [3, 4, 4]).squeeze(1).tolist()
    assert got == [2.0, 10.0, (1 + 3 + 10) / 3, (1 + 3 + 10 + 100) / 4]


# ------------------------------------------------------------------------------------ a trained run
SMALL = {"train": {"epochs": 2, "batch_size": 64}, "tokenizer": {"codebook_size": 8, "levels": 3, "embeddings": "latent"},
         "model": {"backbone": {"d_model": 16, "d_ff": 32, "n_heads": 1}}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("items")
    data = sidrec.synthetic(root / "data", n_items=200, n_users=800)
    ar = sidrec.Recommender(head="ar", **SMALL).fit(data, out=root / "ar")
    fv = sidrec.Recommender(head="fv", **SMALL).fit(data, out=root / "fv")
    rng = np.random.default_rng(3)
    new = pd.DataFrame({"item_id": [f"new-{i}" for i in range(12)], "title": [f"new thing {i}" for i in range(12)]})
    emb = rng.normal(size=(12, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    new.to_json(root / "new.jsonl", orient="records", lines=True)
    np.save(root / "new.npy", emb)
    return {"root": root, "data": data, "ar": ar, "fv": fv, "new": new, "emb": emb}


def test_add_items_to_a_run_then_recommend_evaluate_and_verify(trained, tmp_path, capsys):
    run = tmp_path / "ar"
    trained["ar"].save(run)
    before = sidrec.Recommender.load(run)
    assert main(["items", "add", str(run), "--items", str(trained["root"] / "new.jsonl"),
                 "--embeddings", str(trained["root"] / "new.npy")]) == 0
    assert "catalogue v0001 (212 items): added 12" in capsys.readouterr().out
    rec = sidrec.Recommender.load(run)
    assert rec.catalog_version == "v0001" and rec.model.n_items == 212
    np.testing.assert_array_equal(rec.codebook.codes[:200], before.codebook.codes)  # existing IDs unchanged
    new_ids = trained["new"]["item_id"].tolist()
    hist = [["3", "17", "42"], ["5", new_ids[0]]]  # a history may hold a new item too
    for decode in ("exact", "beam"):
        ids, scores = rec.recommend(hist, k=5, decode=decode, allow=[new_ids, new_ids])
        assert set(ids[0]) <= set(new_ids) and len(set(ids[0])) == 5 and np.isfinite(scores).all()
        assert new_ids[0] not in ids[1]  # seen items are excluded, new ones too
        ids, _ = rec.recommend(hist, k=20, decode=decode)
        assert set(ids.ravel()) <= set(rec.raw_ids.tolist())
    # Q is still a distribution over the whole (extended) catalogue and the loss identity holds
    assert main(["verify", str(run), "--contexts", "64"]) == 0
    ev = rec.evaluate(splits="test", save=False)["test"]
    assert ev["exact"]["n_users"] == trained["data"].n_users and 0 < ev["exact"]["ndcg@10"] <= 1
    # adding the same items again adds nothing and moves nothing
    info = rec.add_items(trained["root"] / "new.jsonl", embeddings=trained["root"] / "new.npy")
    assert info["added"] == 0 and info["already_present"] == 12 and rec.catalog_version == "v0001"


def test_new_items_get_prefix_means_and_old_scores_keep_their_order(trained, tmp_path):
    run = tmp_path / "ar"
    trained["ar"].save(run)
    base = sidrec.Recommender.load(run)
    info = base.add_items(trained["new"], embeddings=trained["emb"], vectors="prefix-mean")
    assert info["version"] == "v0001" and base.model.n_items == 212 and info["item_vectors"] == "prefix mean"
    w = base.model.backbone.item_emb.weight.detach()
    cb = base.codebook
    for i in range(200, 212):  # each new item's vector is the mean of its trained siblings (or a shorter prefix)
        for length in (2, 1, 0):
            sib = np.flatnonzero((cb.codes[:200, :length] == cb.codes[i, :length]).all(1))
            if len(sib):
                torch.testing.assert_close(w[i], w[torch.as_tensor(sib)].mean(0), rtol=1e-4, atol=1e-6)
                break
    if w.shape[0] > 212:  # a plain item-ID table: the padding row stays the last, zero (a node table has none)
        assert torch.count_nonzero(w[212]) == 0


def test_versions_list_use_and_rollback(trained, tmp_path, capsys):
    run = tmp_path / "ar"
    trained["ar"].save(run)
    rec = sidrec.Recommender.load(run)
    rec.add_items(trained["new"].iloc[:5], embeddings=trained["emb"][:5])
    rec.add_items(trained["new"].iloc[5:], embeddings=trained["emb"][5:])
    assert rec.catalog_version == "v0002" and rec.model.n_items == 212
    assert main(["items", "list", str(run)]) == 0
    out = capsys.readouterr().out
    assert "* v0002" in out and "v0001" in out and "v0000" in out
    assert main(["items", "use", str(run), "v0000"]) == 0
    old = sidrec.Recommender.load(run)
    assert old.model.n_items == 200 and old.catalog_version is None
    with pytest.raises(UserError, match="unknown item"):
        old.recommend([["new-0"]])
    assert main(["items", "use", str(run), "v0001"]) == 0
    assert sidrec.Recommender.load(run).model.n_items == 205
    assert main(["items", "use", str(run), "v0009"]) == 2 and main(["items", "use", str(run), "../x"]) == 2


def test_retraining_a_run_deletes_its_catalogue_versions_and_nothing_else(trained, tmp_path):
    """Versions were built on the old weights (their item vectors, node rows): --overwrite deletes
    them with the weights; a file the user put into catalog/ stays."""
    run = tmp_path / "ar"
    trained["ar"].save(run)
    sidrec.Recommender.load(run).add_items(trained["new"], embeddings=trained["emb"])
    assert (run / "catalog" / "v0001").is_dir()
    (run / "catalog" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="--resume|--overwrite"):
        sidrec.Recommender(head="ar", **SMALL).fit(trained["data"], out=run)  # neither: refused, nothing deleted
    assert (run / "catalog" / "v0001").is_dir()
    rec = sidrec.Recommender(head="ar", **SMALL).fit(trained["data"], out=run, overwrite=True)
    assert sorted(p.name for p in (run / "catalog").iterdir()) == ["notes.txt"]
    assert rec.catalog_version is None and rec.model.n_items == 200
    assert sidrec.Recommender.load(run).model.n_items == 200


def test_fv_refuses_and_bad_inputs_are_one_line(trained, tmp_path, capsys):
    root = trained["root"]
    assert main(["items", "add", str(trained["fv"].run.path), "--items", str(root / "new.jsonl")]) == 2
    assert "FV-MLE has no content path" in capsys.readouterr().err
    run = tmp_path / "ar"
    trained["ar"].save(run)
    assert main(["items", "add", str(run), "--items", str(root / "new.jsonl")]) == 2  # latent IDs: no text path
    assert "--embeddings" in capsys.readouterr().err
    np.save(tmp_path / "bad.npy", np.zeros((12, 5), np.float32))
    assert main(["items", "add", str(run), "--items", str(root / "new.jsonl"), "--embeddings", str(tmp_path / "bad.npy")]) == 2
    assert "dimension 16" in capsys.readouterr().err
    (tmp_path / "dup.jsonl").write_text('{"item_id": "a"}\n{"item_id": "a"}\n')
    assert main(["items", "add", str(run), "--items", str(tmp_path / "dup.jsonl"), "--embeddings",
                 str(root / "new.npy")]) == 2
    assert not (run / "catalog").exists()  # nothing written by a refused call


def test_server_reloads_a_new_catalogue_while_answering(trained, tmp_path):
    """SIGHUP reloads while requests are in flight: every request before, during and after the
    reload is answered from one whole catalogue (old or new), none fails."""
    import signal
    import threading

    import httpx

    run = tmp_path / "ar"
    trained["ar"].save(run)
    s = ServerProcess(run)
    try:
        c = httpx.Client(base_url=s.url, timeout=30)
        new_ids = trained["new"]["item_id"].tolist()
        r = c.post("/recommend", json={"history": ["3"], "allow": new_ids[:3]})
        assert r.status_code == 422 and r.json()["error"]["field"] == "allow"
        sidrec.Recommender.load(run).add_items(trained["new"], embeddings=trained["emb"])
        assert c.post("/recommend", json={"history": ["3"], "k": 3}).status_code == 200  # still the old catalogue
        answers, stop = [], threading.Event()

        def ask():  # bounded: at most 400 requests per thread, ends when the reload is seen
            with httpx.Client(base_url=s.url, timeout=30) as h:
                for _ in range(400):
                    r = h.post("/recommend/batch", json={"requests": [{"history": ["3"], "k": 5},
                                                                      {"history": ["17", "42"], "k": 5}]})
                    answers.append((r.status_code, len(r.json().get("results", []))))
                    if stop.is_set():
                        return

        threads = [threading.Thread(target=ask) for _ in range(3)]
        for t in threads:
            t.start()
        deadline = time.time() + 60
        while len(answers) < 10 and time.time() < deadline:  # requests are flowing before the signal
            time.sleep(0.01)
        assert len(answers) >= 10, answers
        s.proc.send_signal(signal.SIGHUP)
        for _ in range(600):  # up to 60 s for the reload
            if c.get("/info").json()["catalog_version"] == "v0001":
                break
            time.sleep(0.1)
        n_at_reload = len(answers)
        while len(answers) < n_at_reload + 10 and any(t.is_alive() for t in threads) and time.time() < deadline + 60:
            time.sleep(0.01)  # and after it
        stop.set()
        for t in threads:
            t.join(60)
        assert len(answers) > n_at_reload and all(code == 200 and n == 2 for code, n in answers), answers[:5]
        assert c.post("/admin/reload").json()["reloaded"] is False  # already serving the active version
        r = c.post("/recommend", json={"history": ["3", new_ids[5]], "k": 3, "allow": new_ids[:3]})
        assert r.status_code == 200 and sorted(r.json()["items"]) == sorted(new_ids[:3])
        info = c.get("/info").json()
        assert info["catalog_version"] == "v0001" and info["n_items"] == 212
        c.close()
    finally:
        assert s.stop() == 0
    assert any("v0001" in line for line in s.stderr), s.stderr[-5:]  # the reload is logged


def test_admin_reload_reports_the_versions_and_a_failed_reload_keeps_serving(trained, tmp_path):
    import signal

    import httpx

    run = tmp_path / "ar"
    trained["ar"].save(run)
    s = ServerProcess(run)
    try:
        with httpx.Client(base_url=s.url, timeout=30) as c:
            sidrec.Recommender.load(run).add_items(trained["new"], embeddings=trained["emb"])
            r = c.post("/admin/reload")
            assert r.json() == {"reloaded": True, "version": "v0001", "previous": "v0000", "n_items": 212}
            assert c.post("/admin/reload").json()["reloaded"] is False
            (run / "catalog" / "CURRENT").write_text("v0009\n")  # a version that does not exist
            s.proc.send_signal(signal.SIGHUP)
            deadline = time.time() + 60
            while not any("reload failed" in line for line in s.stderr) and time.time() < deadline:
                time.sleep(0.05)
            assert any("reload failed, still serving the previous catalogue" in line for line in s.stderr)
            r = c.post("/recommend", json={"history": ["3", "new-5"], "k": 3})
            assert r.status_code == 200 and c.get("/info").json()["catalog_version"] == "v0001"
    finally:
        assert s.stop() == 0


def test_catalogue_pointer_and_stale_parents_are_refused(trained, tmp_path):
    run = tmp_path / "ar"
    trained["ar"].save(run)
    rec = sidrec.Recommender.load(run)
    rec.add_items(trained["new"].iloc[:3], embeddings=trained["emb"][:3])
    old = sidrec.Recommender.load(run)
    rec.add_items(trained["new"].iloc[3:6], embeddings=trained["emb"][3:6])  # v0002
    assert main(["items", "use", str(run), "v0001"]) == 0
    stale = sidrec.Recommender.load(run)  # serves v0001 while v0002 exists: adding on it would reuse ids
    with pytest.raises(UserError, match="v0002 is newer"):
        stale.add_items(trained["new"].iloc[6:], embeddings=trained["emb"][6:])
    assert old.catalog_version == "v0001"
    (run / "catalog" / "CURRENT").write_text("../../elsewhere\n")
    with pytest.raises(UserError, match="names no version"):
        sidrec.Recommender.load(run)


def test_item_filters_refuse_ids_outside_the_catalogue():
    from sidrec.decode import ItemFilter

    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        ItemFilter.build(10, 2, exclude=[np.array([13]), None])
    with pytest.raises(ValueError):
        ItemFilter.build(10, 1, allow=[np.array([-1])])


def test_content_vectors_predict_trained_vectors_and_follow_the_weights(trained, tmp_path):
    """A new item's vector is that of its nearest trained item by content: copies of trained items
    get their twins' trained vectors, nearer than the prefix mean. The vectors are tied to the
    weights they came from: other weights fall back to prefix means, with a warning."""
    from sidrec.data.synth import load_world

    run = tmp_path / "ar"
    trained["ar"].save(run)
    rec = sidrec.Recommender.load(run)
    latent = load_world(trained["data"].path).latent
    copies = np.arange(0, 200, 5)
    new = pd.DataFrame({"item_id": [f"copy-{i}" for i in copies]})
    info = rec.add_items(new, embeddings=latent[copies])
    assert info["item_vectors"].startswith("content")
    w = rec.model.backbone.item_emb.weight.detach()
    err_content = ((w[200:200 + len(copies)] - w[copies]) ** 2).sum(1).mean()  # a copy finds its twin
    plain = sidrec.Recommender.load(run)
    plain.run.path.joinpath("model.safetensors").touch()  # other weights (as after more training)
    with pytest.warns(sidrec.errors.SidrecWarning, match="prefix means"):
        fallback = sidrec.Recommender.load(run)
    wp = fallback.model.backbone.item_emb.weight.detach()
    err_mean = ((wp[200:200 + len(copies)] - wp[copies]) ** 2).sum(1).mean()
    assert err_content < err_mean
