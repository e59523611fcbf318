"""`sidrec serve`: a live server process on 127.0.0.1 and a real HTTP client (httpx).

Answers equal the library's `recommend`; filters act inside decoding; malformed requests get 4xx
and never hurt the server; concurrent requests are batched; SIGTERM finishes what is in flight.
"""

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pandas as pd
import pytest

import sidrec
from sidrec.cli import main
from sidrec.serve.process import ServerProcess

SMALL = {"train": {"epochs": 2, "batch_size": 64}, "tokenizer": {"codebook_size": 8, "levels": 3, "embeddings": "latent"},
         "model": {"backbone": {"d_model": 16, "d_ff": 32, "n_heads": 1}}}


class Live(ServerProcess):
    """A live server with an httpx client on it."""

    def __init__(self, run, *args):
        super().__init__(run, *args)
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def post(self, path, body):
        return self.client.post(path, content=body if isinstance(body, (bytes, str)) else json.dumps(body))

    def stop(self) -> int:
        self.client.close()
        return super().stop()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    data = sidrec.synthetic(root / "data", n_items=300, n_users=1200)
    ar = sidrec.Recommender(head="ar", **SMALL).fit(data, out=root / "ar")
    fv = sidrec.Recommender(head="fv", **SMALL).fit(data, out=root / "fv")
    return {"ar": ar, "fv": fv, "data": data}


@pytest.fixture(scope="module")
def server(runs):
    s = Live(runs["ar"].run.path, "--max-wait-ms", "5")
    yield s
    assert s.stop() == 0


def _histories(runs, n=40, seed=0):
    data, rng = runs["data"], np.random.default_rng(seed)
    raw = data.raw_item_ids()
    out = []
    for u in rng.choice(data.n_users, n, replace=False):
        seq = raw[data.sequence(u)].tolist()
        out.append(seq[: rng.integers(1, len(seq) + 1)])
    return out


@pytest.mark.parametrize("decode", ["beam", "exact"])
def test_served_answers_equal_the_library(runs, server, decode):
    rec = runs["ar"]
    hist = _histories(runs)
    ids, scores = rec.recommend(hist, k=10, decode=decode, beam=20)
    for h, want_ids, want_scores in zip(hist, ids, scores):
        r = server.post("/recommend", {"history": h, "k": 10, "decode": decode})
        assert r.status_code == 200, r.text
        assert r.json()["items"] == [i for i in want_ids.tolist() if i]
        np.testing.assert_allclose(r.json()["scores"], want_scores[np.isfinite(want_scores)], atol=1e-5)
    batch = server.post("/recommend/batch", {"requests": [{"history": h, "k": 10, "decode": decode} for h in hist]})
    assert [x["items"] for x in batch.json()["results"]] == [[i for i in row.tolist() if i] for row in ids]


def test_filters_act_inside_decoding(runs, server):
    """allow / deny / seen items: never an excluded or unknown item, and k items whenever k are allowed."""
    rng = np.random.default_rng(1)
    raw = runs["data"].raw_item_ids().tolist()
    catalogue = set(raw)
    for trial, h in enumerate(_histories(runs, 30, seed=2)):
        k = int(rng.integers(1, 30))
        allow = rng.choice(raw, int(rng.integers(1, 60)), replace=False).tolist() if trial % 2 else None
        deny = rng.choice(raw, int(rng.integers(0, 200)), replace=False).tolist()
        for decode in ("beam", "exact"):
            body = {"history": h, "k": k, "deny": deny, "decode": decode, **({"allow": allow} if allow else {})}
            r = server.post("/recommend", body)
            assert r.status_code == 200, r.text
            items = r.json()["items"]
            ok = (set(allow) if allow else catalogue) - set(deny) - set(h)
            assert set(items) <= ok and len(items) == len(set(items))
            assert len(items) == min(k, len(ok)), (decode, k, len(ok))
    r = server.post("/recommend", {"history": raw[:3], "k": 5, "allow": raw[:3]})  # all allowed items are seen
    assert r.status_code == 200 and r.json()["items"] == []


def test_malformed_request_storm_gets_4xx_and_the_server_stays_healthy(runs, server):
    raw = runs["data"].raw_item_ids().tolist()
    bad = [b"", b"{", b"[]", b"null", b'"text"', b"{\"history\": [\"1\"]", "{\"history\": [\"\u00e9\"]}".encode("latin-1"),
           {"history": []}, {"history": "1,2"}, {"history": [1.5]}, {"history": [True]}, {"history": [None]},
           {"history": [{"id": 1}]}, {"history": [raw[0]], "k": 0}, {"history": [raw[0]], "k": -3},
           {"history": [raw[0]], "k": 301}, {"history": [raw[0]], "k": 10**9}, {"history": [raw[0]], "k": "10"},
           {"history": [raw[0]], "k": 2.0}, {"history": [raw[0]], "beam": 0}, {"history": [raw[0]], "decode": "greedy"},
           {"history": ["no-such-item"]}, {"history": [raw[0]], "allow": ["no-such-item"]},
           {"history": [raw[0]], "deny": [7.5]}, {"history": [raw[0]], "extra": 1}, {"history": ["x" * 300]},
           {"history": [raw[0]] * 2001}, {"history": [raw[0]], "exclude_seen": "yes"}, {"requests": []},
           {"history": [raw[0]], "on_unknown": "maybe"}]
    codes = []
    for body in bad:
        r = server.post("/recommend", body)
        codes.append(r.status_code)
        assert 400 <= r.status_code < 500, (body if not isinstance(body, bytes) else body[:40], r.status_code, r.text)
        err = r.json()["error"]
        assert err["status"] == r.status_code and err["message"]
    assert server.post("/recommend", {"history": ["no-such-item"]}).json()["error"]["field"] == "history"
    assert server.post("/recommend", {"history": [raw[0]], "k": 0}).json()["error"]["field"] == "k"
    assert server.post("/recommend/batch", {"requests": [{"history": [raw[0]]}, {"history": [raw[0]], "k": 0}]}) \
        .json()["error"]["field"] == "requests[1].k"
    big = b'{"history": ["' + b"1" * (5 << 20) + b'"]}'
    assert server.post("/recommend", big).status_code == 413
    assert server.client.get("/nope").status_code == 404 and server.client.get("/recommend").status_code == 405
    r = server.post("/recommend", {"history": [raw[0], "no-such-item"], "k": 3, "on_unknown": "ignore"})
    assert r.status_code == 200 and r.json()["ignored"] == {"history": ["no-such-item"]} and len(r.json()["items"]) == 3
    assert server.client.get("/health").json() == {"status": "ok"}
    metrics = server.client.get("/metrics").text
    assert not re.search(r'status="5\d\d"', metrics)


def test_info_and_concurrent_requests_are_batched(runs, server):
    info = server.client.get("/info").json()
    assert info["head"] == "ar" and info["n_items"] == 300 and info["codebook"]["sizes"] == [8, 8, 8]
    assert info["decode"] == "beam" and info["beam"] == 20
    hist = _histories(runs, 64, seed=4)

    async def fire():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            return await asyncio.gather(*(c.post("/recommend", json={"history": h, "k": 5}) for h in hist))

    answers = asyncio.run(fire())
    assert all(a.status_code == 200 and len(a.json()["items"]) == 5 for a in answers)
    text = server.client.get("/metrics").text
    count = float(re.search(r"^sidrec_batch_rows_count ([\d.e+]+)$", text, re.M).group(1))
    largest = [float(le) for le, n in re.findall(r'^sidrec_batch_rows_bucket\{le="([\d.]+)"\} ([\d.e+]+)$', text, re.M)
               if float(n) == count][0]
    assert largest > 1  # some call decoded more than one request
    assert re.search(r'^sidrec_requests_total\{endpoint="/recommend",status="200"\} ', text, re.M)
    assert "sidrec_request_seconds_bucket" in text and "sidrec_queue_depth" in text


def test_fv_run_serves_exact_and_refuses_beam(runs):
    s = Live(runs["fv"].run.path)
    try:
        h = _histories(runs, 5, seed=5)
        want, _ = runs["fv"].recommend(h, k=7)
        for hh, w in zip(h, want):
            assert s.post("/recommend", {"history": hh, "k": 7}).json()["items"] == w.tolist()
        r = s.post("/recommend", {"history": h[0], "decode": "beam"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "decode"
        assert s.client.get("/info").json()["decode"] == "exact"
    finally:
        assert s.stop() == 0


def test_joint_run_serves_its_tuned_mix_and_reloads_a_new_one(runs, tmp_path):
    """AR beam + FV rescoring served with the mix chosen on validation; `sidrec tune-mix` on the
    live run and /admin/reload switch the server to the new mix."""
    joint = sidrec.Recommender(head="joint", **SMALL).fit(runs["data"], out=tmp_path / "joint")
    tuned = json.loads((tmp_path / "joint" / "joint-mix.json").read_text())["mix"]
    s = Live(joint.run.path)
    try:
        assert s.client.get("/info").json()["mix"] == tuned
        h = _histories(runs, 5, seed=7)
        want, _ = joint.recommend(h, k=6, decode="beam")
        for hh, w in zip(h, want):
            assert s.post("/recommend", {"history": hh, "k": 6}).json()["items"] == w.tolist()
        other = 1.0 if tuned < 1 else 0.0
        assert main(["tune-mix", str(joint.run.path), "--grid", str(other)]) == 0
        assert s.post("/admin/reload", {}).json()["reloaded"] is True
        assert s.client.get("/info").json()["mix"] == other
        want, _ = sidrec.Recommender.load(joint.run.path).recommend(h, k=6, decode="beam")
        for hh, w in zip(h, want):
            assert s.post("/recommend", {"history": hh, "k": 6}).json()["items"] == w.tolist()
    finally:
        assert s.stop() == 0


def test_full_queue_answers_503_and_shutdown_finishes_in_flight(runs):
    """Back-pressure: beyond --max-queue waiting requests the server answers 503 at once; SIGTERM
    during a burst lets every accepted request finish with 200 and the process exit 0."""
    s = Live(runs["ar"].run.path, "--max-queue", "2", "--max-batch", "1")
    hist = _histories(runs, 40, seed=6)

    async def burst():
        async with httpx.AsyncClient(base_url=s.url, timeout=30) as c:
            return await asyncio.gather(*(c.post("/recommend", json={"history": h, "k": 10, "beam": 64}) for h in hist))

    codes = [a.status_code for a in asyncio.run(burst())]
    assert set(codes) <= {200, 503} and 503 in codes and 200 in codes
    assert s.client.get("/health").status_code == 200

    async def burst_then_stop():
        async with httpx.AsyncClient(base_url=s.url, timeout=30) as c:
            tasks = [asyncio.create_task(c.post("/recommend", json={"history": h, "k": 10, "beam": 64})) for h in hist[:2]]
            await asyncio.sleep(0.05)
            s.proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks)

    assert [a.status_code for a in asyncio.run(burst_then_stop())] == [200, 200]
    assert s.proc.wait(60) == 0
    s.client.close()


def test_serve_option_errors_are_one_line(runs, tmp_path):
    r = subprocess.run([sys.executable, "-m", "sidrec.cli", "serve", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "not a trained run directory" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "sidrec.cli", "serve", str(runs["fv"].run.path), "--decode", "beam"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "AR-NTP" in r.stderr
    r = subprocess.run([sys.executable, "-m", "sidrec.cli", "serve", str(runs["ar"].run.path), "--max-wait-ms", "nan"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--max-wait-ms" in r.stderr
    r = subprocess.run([sys.executable, "-m", "sidrec.cli", "serve", str(runs["fv"].run.path), "--table-precision",
                        "int8"], capture_output=True, text=True)
    assert r.returncode == 2 and "node-table model" in r.stderr and "Traceback" not in r.stderr


def test_batch_calls_beyond_max_batch_and_catalogue_rollback(runs, tmp_path):
    """A batch call larger than --max-batch is decoded in chunks (same answers); after a reload to a
    smaller catalogue, ids of removed items are unknown (422), never a crash or a wrong item."""
    run = tmp_path / "ar"
    runs["ar"].save(run)
    new = pd.DataFrame({"item_id": ["new-a", "new-b"], "title": ["a", "b"]})
    rec = sidrec.Recommender.load(run)
    rec.add_items(new, embeddings=np.eye(2, 16, dtype=np.float32))
    s = Live(run, "--max-batch", "4")
    try:
        hist = _histories(runs, 20, seed=8)
        want, _ = rec.recommend(hist, k=6, decode="beam")
        got = s.post("/recommend/batch", {"requests": [{"history": h, "k": 6} for h in hist]}).json()["results"]
        assert [g["items"] for g in got] == [[i for i in w.tolist() if i] for w in want]
        assert s.post("/recommend", {"history": ["new-a"], "k": 3}).status_code == 200
        assert main(["items", "use", str(run), "v0000"]) == 0
        assert s.client.post("/admin/reload").json()["n_items"] == 300
        r = s.post("/recommend", {"history": ["new-a", hist[0][0]], "k": 3})
        assert r.status_code == 422 and r.json()["error"]["unknown"] == ["new-a"]
        assert s.post("/recommend", {"history": hist[0], "k": 3, "allow": ["new-b"]}).status_code == 422
        assert not re.search(r'status="5\d\d"', s.client.get("/metrics").text)
    finally:
        assert s.stop() == 0


def _children(pid: int) -> list[int]:
    tasks = f"/proc/{pid}/task"
    return [int(c) for t in os.listdir(tasks) for c in open(f"{tasks}/{t}/children").read().split()]


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads the process tree from /proc")
def test_decode_worker_is_a_child_that_stops_with_the_server_and_whose_death_is_reported(runs):
    """The model decodes in a child process: SIGTERM stops it with the server (nothing left behind);
    if it dies, /health says so and requests get 503 with the reason instead of hanging."""
    s = Live(runs["ar"].run.path)
    kids = _children(s.proc.pid)
    assert kids and s.post("/recommend", {"history": _histories(runs, 1)[0], "k": 3}).status_code == 200
    assert s.stop() == 0
    assert not any(os.path.exists(f"/proc/{k}") and "sidrec" in open(f"/proc/{k}/cmdline").read() for k in kids)
    s = Live(runs["ar"].run.path)
    try:
        for k in _children(s.proc.pid):
            if "spawn_main" in open(f"/proc/{k}/cmdline").read():
                os.kill(k, signal.SIGKILL)
        time.sleep(1)
        assert s.client.get("/health").status_code == 503
        r = s.post("/recommend", {"history": _histories(runs, 1)[0], "k": 3})
        assert r.status_code == 503 and "decode worker has exited" in r.json()["error"]["message"]
    finally:
        s.stop()


def test_two_decode_processes_answer_like_the_library_and_reload_together(runs, tmp_path):
    """--workers 2: two decode processes take batches at once; answers equal `recommend`'s, and a
    reload reaches both (every later request, whichever process decodes it, knows the new items)."""
    run = tmp_path / "ar"
    runs["ar"].save(run)
    s = Live(run, "--workers", "2", "--max-batch", "4")
    try:
        spawned = [k for k in _children(s.proc.pid) if "spawn_main" in open(f"/proc/{k}/cmdline").read()]
        assert len(spawned) == 2
        hist = _histories(runs, 48, seed=9)
        want, _ = runs["ar"].recommend(hist, k=5, decode="beam")

        async def fire(bodies):
            async with httpx.AsyncClient(base_url=s.url, timeout=30) as c:
                return await asyncio.gather(*(c.post("/recommend", json=b) for b in bodies))

        got = asyncio.run(fire([{"history": h, "k": 5} for h in hist]))
        assert [g.json()["items"] for g in got] == [w.tolist() for w in want]
        sidrec.Recommender.load(run).add_items(pd.DataFrame({"item_id": ["new-a"], "title": ["a"]}),
                                               embeddings=np.eye(1, 16, dtype=np.float32))
        assert s.client.post("/admin/reload").json()["n_items"] == 301
        got = asyncio.run(fire([{"history": ["new-a", *h], "k": 5} for h in hist]))
        assert all(g.status_code == 200 for g in got)
    finally:
        assert s.stop() == 0


def test_int8_tables_serve_like_the_library_loaded_the_same_way(runs):
    s = Live(runs["ar"].run.path, "--table-precision", "int8")
    try:
        assert s.client.get("/info").json()["table_precision"] == "int8"
        h = _histories(runs, 8, seed=9)
        want, _ = sidrec.Recommender.load(runs["ar"].run.path, table_precision="int8").recommend(h, k=6, decode="beam")
        for hh, w in zip(h, want):
            assert s.post("/recommend", {"history": hh, "k": 6}).json()["items"] == w.tolist()
    finally:
        assert s.stop() == 0
