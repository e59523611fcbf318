"""`sidrec serve RUN`: an HTTP JSON service over a trained run (FastAPI + uvicorn).

    POST /recommend        {history, k, exclude_seen, allow, deny, decode, beam, on_unknown} -> {items, scores}
    POST /recommend/batch  {requests: [...]} -> {results: [...]}
    GET  /health, /info, /metrics (Prometheus text)

Requests are validated on the event loop (strict types, bounded sizes, raw ids mapped to the
catalogue), then decoded in micro-batches by one worker thread (`MicroBatcher`): the same
`Recommender.recommend_indices` the library uses, so a served answer equals `recommend`'s.
Filters (allow, deny, seen items) act inside decoding (`sidrec.decode.filters`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics,
                               generate_latest)
from starlette.exceptions import HTTPException

from sidrec.errors import UserError
from sidrec.serve.batcher import MicroBatcher, Overloaded
from sidrec.serve.schemas import BadRequest, Limits, parse, request_models


class JSON(Response):
    """JSON responses serialised by orjson (faster than the standard library's;
    handlers return it directly, which also skips FastAPI's generic encoder)."""

    media_type = "application/json"

    def render(self, content) -> bytes:
        return orjson.dumps(content)


@dataclass(frozen=True)
class Batching:
    max_batch: int = 64  # rows decoded in one call (1: one request per call)
    max_wait_ms: float = 2.0  # under concurrent load, how long a batch may wait to fill
    max_queue: int = 1024  # requests waiting; beyond it: 503


@dataclass
class Row:
    """One user's request, in internal item ids, as the decode worker takes it."""

    history: np.ndarray
    k: int
    decode: str
    beam: int
    exclude: np.ndarray  # the history (when seen items are excluded) and the deny list
    allow: np.ndarray | None


class Service:
    """The loaded run and the decode function the micro-batcher runs."""

    def __init__(self, run: str | Path, *, device: str = "auto", decode: str | None = None, beam: int = 20):
        from sidrec.api import Recommender

        self.run, self.device = Path(run), device
        self.rec = Recommender.load(run, device=device)
        self.decode = decode or ("beam" if self.rec.model.supports_beam else "exact")
        if self.decode == "beam" and not self.rec.model.supports_beam:
            raise UserError(f"--decode beam needs an AR-NTP run; this run's head is {self.rec.head}")
        self.beam = beam

    def reload(self) -> dict:
        """Load the run's active catalogue version and swap it in if it changed. Runs off the event
        loop; requests keep being answered by the old one until the swap (one attribute assignment).
        Internal ids of existing items never change across versions, so requests mapped with the old
        catalogue decode correctly with the new one."""
        from sidrec.api import Recommender

        before = self.rec.catalog_version
        if self.rec.run.catalog_version() == before:
            return {"reloaded": False, "version": before or "v0000", "n_items": int(self.rec.model.n_items)}
        rec = Recommender.load(self.run, device=self.device)
        self.rec = rec
        return {"reloaded": True, "version": rec.catalog_version or "v0000", "previous": before or "v0000",
                "n_items": int(rec.model.n_items)}

    def info(self) -> dict:
        from sidrec.run import array_digest

        cb = self.rec.codebook
        return {"run": str(self.run), "head": self.rec.head, "n_items": int(self.rec.model.n_items),
                "catalog_version": self.rec.catalog_version or "v0000",
                "max_len": self.rec.model.cfg.backbone.max_len, "device": str(self.rec.device),
                "decode": self.decode, "beam": self.beam if self.decode == "beam" else None,
                "codebook": None if cb is None else {"levels": cb.levels, "sizes": cb.sizes, "method": cb.meta.get("method"),
                                                     "fingerprint": array_digest(cb.codes, np.array(cb.sizes))}}

    # -- on the event loop: validate and map ids ----------------------------------------------
    def row(self, req, where: str = "") -> tuple[Row, dict]:
        """A validated request as a Row (+ the unknown ids it ignored); BadRequest naming the field."""
        n = self.rec.model.n_items
        decode = req.decode or self.decode
        if decode == "beam" and not self.rec.model.supports_beam:
            raise BadRequest(422, where + "decode", f"beam decoding needs an AR-NTP model; this one is {self.rec.head}")
        if req.k > n:
            raise BadRequest(422, where + "k", f"k must be at most the catalogue size ({n}), not {req.k}")
        ignored: dict[str, list[str]] = {}
        rec = self.rec
        history = self._ids(rec, req.history, where + "history", req.on_unknown, ignored)
        if not len(history):
            raise BadRequest(422, where + "history", "no item of the history is in the catalogue", unknown=ignored["history"])
        deny = self._ids(rec, req.deny, where + "deny", req.on_unknown, ignored) if req.deny else history[:0]
        allow = self._ids(rec, req.allow, where + "allow", req.on_unknown, ignored) if req.allow is not None else None
        exclude = np.concatenate([history, deny]) if req.exclude_seen else deny
        return Row(history, req.k, decode, max(req.beam or self.beam, req.k), exclude, allow), ignored

    @staticmethod
    def _ids(rec, raw: list, field: str, on_unknown: str, ignored: dict) -> np.ndarray:
        raw = [str(x) for x in raw]
        idx = rec.item_index(raw)
        if (idx < 0).any():
            unknown = [r for r, i in zip(raw, idx) if i < 0]
            if on_unknown == "error":
                raise BadRequest(422, field, f"unknown item id(s): {', '.join(unknown[:20])}"
                                 + (" ..." if len(unknown) > 20 else ""), unknown=unknown[:1000])
            ignored[field.rsplit(".", 1)[-1]] = unknown
            idx = idx[idx >= 0]
        return idx

    # -- in the decode worker: one batched call per (decode, beam) --------------------------------
    def decode_rows(self, rows: list[Row]) -> list[tuple[list, list]]:
        rec = self.rec  # one catalogue for the whole batch, at least as new as its rows' (see reload)
        out: list = [None] * len(rows)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault((r.decode, r.beam), []).append(i)
        raw = rec.raw_ids
        for (decode, beam), members in groups.items():
            rs = [rows[i] for i in members]
            k = max(r.k for r in rs)
            idx, scores = rec.recommend_indices([r.history for r in rs], k, decode=decode, beam=beam,
                                                     exclude_seen=False, allow=[r.allow for r in rs],
                                                     deny=[r.exclude for r in rs])
            for i, r, ids, sc in zip(members, rs, idx, scores):
                keep = ids[: r.k] >= 0
                out[i] = (raw[ids[: r.k][keep]].tolist(), np.round(sc[: r.k][keep].astype(np.float64), 6).tolist())
        return out


class Metrics:
    """Prometheus metrics of one app (its own registry, so tests can run several apps)."""

    def __init__(self, batcher: MicroBatcher):
        disable_created_metrics()  # no *_created series: counters and histograms only
        r = self.registry = CollectorRegistry()
        self.requests = Counter("sidrec_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.latency = Histogram("sidrec_request_seconds", "Request latency by endpoint", ["endpoint"], registry=r,
                                 buckets=(.0005, .001, .002, .003, .005, .0075, .01, .015, .02, .03, .05, .075, .1,
                                          .25, .5, 1, 2.5, 5))
        self.batch_rows = Histogram("sidrec_batch_rows", "Rows (users) decoded per batched call", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
        self.decode_s = Histogram("sidrec_decode_seconds", "Seconds per batched decode call", registry=r,
                                  buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .25, .5, 1, 5))
        self.rejected = Counter("sidrec_rejected", "Requests refused with 503 (queue full, shutting down)", registry=r)
        Gauge("sidrec_queue_depth", "Requests waiting for the decode worker", registry=r).set_function(lambda: batcher.depth)

    def on_batch(self, rows: int, seconds: float) -> None:
        self.batch_rows.observe(rows)
        self.decode_s.observe(seconds)


ENDPOINTS = {"/recommend", "/recommend/batch", "/health", "/info", "/metrics", "/admin/reload"}


class MetricsMiddleware:
    """Pure ASGI middleware: count and time every request by endpoint and status (cheap: no
    BaseHTTPMiddleware task per request)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t = time.perf_counter()
        status = [500]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            ep = scope["path"] if scope["path"] in ENDPOINTS else "other"
            self.metrics.requests.labels(ep, str(status[0])).inc()
            self.metrics.latency.labels(ep).observe(time.perf_counter() - t)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) beyond `limit` bytes whether or not Content-Length says so."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise BadRequest(413 if declared.isdigit() else 400, None, f"the body must be at most {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, None, f"the body must be at most {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(service: Service, batching: Batching = Batching(), limits: Limits = Limits()) -> FastAPI:
    single, batch = request_models(limits)
    batcher = MicroBatcher(service.decode_rows, max_batch=batching.max_batch, max_wait=batching.max_wait_ms / 1000,
                           max_queue=batching.max_queue)
    metrics = Metrics(batcher)
    batcher.on_batch = metrics.on_batch

    reloading = asyncio.Lock()

    async def reload() -> dict:
        async with reloading:  # one reload at a time; requests are answered throughout
            return await asyncio.to_thread(service.reload)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not on Windows / not main thread
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload()))
        yield
        await batcher.close()  # uvicorn has finished the in-flight requests by now

    app = FastAPI(title="sidrec", lifespan=lifespan, default_response_class=JSON)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.state.service, app.state.batcher, app.state.metrics = service, batcher, metrics

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, e: BadRequest):
        return JSON(e.body(), status_code=e.status)

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, e: Overloaded):
        metrics.rejected.inc()
        return JSON(BadRequest(503, None, str(e)).body(), status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return JSON(BadRequest(e.status_code, None, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        print(f"sidrec serve: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return JSON(BadRequest(500, None, f"internal error ({type(e).__name__})").body(), status_code=500)

    @app.post("/recommend", summary="Top-k next items for one history of raw item ids")
    async def recommend(request: Request):
        req = parse(single, await read_body(request, limits.max_body_bytes))
        row, ignored = service.row(req)
        [(items, scores)] = await batcher.submit([row])
        return JSON({"items": items, "scores": scores, **({"ignored": ignored} if ignored else {})})

    @app.post("/recommend/batch", summary="Top-k next items for many histories in one call")
    async def recommend_batch(request: Request):
        reqs = parse(batch, await read_body(request, limits.max_body_bytes)).requests
        rows = [service.row(r, f"requests[{i}].") for i, r in enumerate(reqs)]
        results = await batcher.submit([r for r, _ in rows])
        return JSON({"results": [{"items": items, "scores": scores, **({"ignored": ign} if ign else {})}
                                 for (items, scores), (_, ign) in zip(results, rows)]})

    @app.post("/admin/reload", summary="Serve the run's active catalogue version (after `sidrec items add`)")
    async def admin_reload():
        return JSON(await reload())

    @app.get("/health")
    async def health():
        if batcher.closing:
            return JSON({"status": "shutting down"}, status_code=503)
        return {"status": "ok"}

    @app.get("/info")
    async def info():
        return {**service.info(), "batching": asdict(batching), "limits": asdict(limits)}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(run: str | Path, *, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          decode: str | None = None, beam: int = 20, batching: Batching = Batching(), limits: Limits = Limits(),
          threads: int | None = None) -> None:
    """Load the run, bind host:port (0: any free port) and serve until SIGINT/SIGTERM, which finish the
    requests in flight before exiting."""
    import torch
    import uvicorn

    # micro-batches are small: intra-op threads beyond half the cores mostly spin and starve the
    # event loop that parses requests (and, on one machine, the clients)
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 2) // 2))
    service = Service(run, device=device, decode=decode, beam=beam)
    app = create_app(service, batching, limits)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # connections wait in the backlog until the server takes them: none refused
    except OSError as e:
        raise UserError(f"--host/--port: cannot listen on {host}:{port} ({e.strerror})") from None
    bound = sock.getsockname()[1]
    info = service.info()
    print(f"sidrec: serving {run} on http://{host}:{bound} ({info['head']}, {info['n_items']:,} items, decode "
          f"{info['decode']}{' ' + str(beam) if info['decode'] == 'beam' else ''}, batches of up to "
          f"{batching.max_batch})", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=30)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it with the handler it found: a no-op
    # here, so a graceful stop exits 0 (SIGINT keeps Python's handler: exit 130, as for other commands)
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.Server(config).run(sockets=[sock])  # uvloop + httptools when installed
