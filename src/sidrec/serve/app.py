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
import gc
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
from starlette.requests import ClientDisconnect

from sidrec.api import unknown_ids_message
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
    max_wait_ms: float = 0.0  # under concurrent load, how long a batch may wait to fill (see MicroBatcher)
    max_queue: int = 1024  # users (rows) waiting; beyond it: 503
    workers: int = 1  # decode processes, each decoding one batch at a time


@dataclass
class Row:
    """One user's request as the decode worker takes it: raw ids, mapped to the catalogue the
    batch decodes with (so a catalogue swap between queueing and decoding can never mix ids)."""

    history: list[str]
    k: int
    decode: str
    beam: int
    exclude_seen: bool
    allow: list[str] | None
    deny: list[str]
    on_unknown: str
    where: str  # the field prefix of this request in error messages ("" or "requests[3].")


@dataclass(frozen=True)
class RowChecks:
    """What the event loop checks of a request before it is queued (no catalogue needed): the
    run's decoding defaults and whether its head can beam-search. Small and picklable, so a server
    whose model lives in another process (`sidrec.serve.worker`) checks requests the same way."""

    decode: str
    beam: int
    supports_beam: bool
    head: str

    def row(self, req, where: str = "") -> Row:
        decode = req.decode or self.decode
        if decode == "beam" and not self.supports_beam:
            raise BadRequest(422, where + "decode", f"beam decoding needs an AR-NTP model; this one is {self.head}")
        return Row([str(x) for x in req.history], req.k, decode, max(req.beam or self.beam, req.k), req.exclude_seen,
                   None if req.allow is None else [str(x) for x in req.allow], [str(x) for x in req.deny or ()],
                   req.on_unknown, where)


class Service:
    """The loaded run and the decode function: what each of the server's decode processes
    (`sidrec.serve.worker`) holds and runs, one batch or reload at a time."""

    def __init__(self, run: str | Path, *, device: str = "auto", decode: str | None = None, beam: int = 20,
                 max_batch: int = 64, table_precision: str = "float32"):
        from sidrec.api import Recommender

        self.run, self.device, self.max_batch, self.precision = Path(run), device, max_batch, table_precision
        self.rec = Recommender.load(run, device=device, table_precision=table_precision)
        self.decode = decode or ("beam" if self.rec.model.supports_beam else "exact")
        if self.decode == "beam" and not self.rec.model.supports_beam:
            raise UserError(f"--decode beam needs an AR-NTP run; this run's head is {self.rec.head}")
        self.beam = beam
        self.checks = RowChecks(self.decode, beam, self.rec.model.supports_beam, self.rec.head)
        self._info = self._describe(self.rec)

    def reload(self) -> dict:
        """Load the run's active catalogue version and swap it in if it changed (between batches:
        each batch maps its raw ids, decodes and maps back with one catalogue)."""
        from sidrec.api import Recommender

        before = self.rec.catalog_version
        mix = self.rec.model.head.mix
        if self.rec.run.catalog_version() == before and self.rec.run.joint_mix() in (None, mix):
            return {"reloaded": False, "version": before or "v0000", "n_items": int(self.rec.model.n_items)}
        rec = Recommender.load(self.run, device=self.device, table_precision=self.precision)
        info = self._describe(rec)
        self.rec, self._info = rec, info
        return {"reloaded": True, "version": rec.catalog_version or "v0000", "previous": before or "v0000",
                "n_items": int(rec.model.n_items)}

    def info(self) -> dict:
        return self._info

    def _describe(self, rec) -> dict:
        """What /info answers (computed once per catalogue: it hashes every code)."""
        from sidrec.run import array_digest

        cb = rec.codebook
        return {"run": str(self.run), "head": rec.head, "n_items": int(rec.model.n_items),
                "catalog_version": rec.catalog_version or "v0000", "max_len": rec.model.cfg.backbone.max_len,
                "device": str(rec.device), "table_precision": rec.model.precision, "decode": self.decode, "beam": self.beam if self.decode == "beam" else None,
                "mix": rec.model.head.mix,  # a joint head's ranking weight (None: no mixture)
                "codebook": None if cb is None else {"levels": cb.levels, "sizes": cb.sizes, "method": cb.meta.get("method"),
                                                     "fingerprint": array_digest(cb.codes, np.array(cb.sizes))}}

    # -- on the event loop: checks that need no catalogue ---------------------------------------
    def row(self, req, where: str = "") -> Row:
        return self.checks.row(req, where)

    alive = True  # served in this process (`create_app(Service(...))`): as alive as the server

    # -- in the decode worker --------------------------------------------------------------------
    def decode_rows(self, rows: list[Row]) -> list:
        """Per row: (raw ids, scores) or the BadRequest it earned (unknown ids, k too large). Ids of
        the whole batch are mapped in one lookup; rows are decoded in calls of at most max_batch
        per (decode, beam)."""
        rec = self.rec  # one catalogue for the whole batch
        lists = [x for r in rows for x in (r.history, r.deny, r.allow or [])]
        flat = rec.item_index([i for ids in lists for i in ids])
        bounds = np.cumsum([0] + [len(ids) for ids in lists])
        mapped = [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        out: list = [None] * len(rows)
        groups: dict[tuple, list[tuple]] = {}
        for i, r in enumerate(rows):
            try:
                job = self._job(rec, r, mapped[3 * i:3 * i + 3])
            except BadRequest as e:
                out[i] = e
                continue
            groups.setdefault((r.decode, r.beam), []).append((i, *job))
        raw = rec.raw_ids
        for (decode, beam), jobs in groups.items():
            for s in range(0, len(jobs), self.max_batch):
                chunk = jobs[s:s + self.max_batch]
                k = max(rows[i].k for i, *_ in chunk)
                idx, scores = rec.recommend_indices([j[1] for j in chunk], k, decode=decode, beam=max(beam, k),
                                                    exclude_seen=[rows[i].exclude_seen for i, *_ in chunk],
                                                    allow=[j[3] for j in chunk],
                                                    deny=[j[2] for j in chunk])
                for (i, _, _, _, ignored), ids, sc in zip(chunk, idx, scores):
                    ids, sc = ids[: rows[i].k], sc[: rows[i].k]
                    keep = ids >= 0
                    out[i] = (raw[ids[keep]].tolist(), np.round(sc[keep].astype(np.float64), 6).tolist(), ignored)
        return out

    @staticmethod
    def _job(rec, r: Row, mapped: list[np.ndarray]) -> tuple:
        """(history, denied, allowed, ignored ids) of one row in `rec`'s internal ids (seen items are
        excluded by `recommend_indices`, as for any caller)."""
        n = rec.model.n_items
        if r.k > n:
            raise BadRequest(422, r.where + "k", f"k must be at most the catalogue size ({n}), not {r.k}")
        ignored: dict[str, list[str]] = {}
        out = []
        for name, raw, idx in zip(("history", "deny", "allow"), (r.history, r.deny, r.allow or []), mapped):
            if (idx < 0).any():
                unknown = [x for x, i in zip(raw, idx) if i < 0]
                if r.on_unknown == "error":
                    raise BadRequest(422, r.where + name, unknown_ids_message(unknown), unknown=unknown[:1000])
                ignored[name] = unknown
                idx = idx[idx >= 0]
            out.append(idx)
        history, deny, allow = out
        if not len(history):
            raise BadRequest(422, r.where + "history", "no item of the history is in the catalogue",
                             unknown=ignored.get("history", []))
        return history, deny, allow if r.allow is not None else None, ignored


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


def _errors(app: FastAPI, metrics: Metrics) -> None:
    """Every refusal is one JSON error body; an unexpected exception is a 500 and the server goes on."""

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

    @app.exception_handler(ClientDisconnect)
    async def gone(request: Request, e: ClientDisconnect):
        return Response(status_code=499)  # nobody is listening; nothing to report

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        print(f"sidrec serve: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return JSON(BadRequest(500, None, f"internal error ({type(e).__name__})").body(), status_code=500)


def _answer(result) -> dict:
    if isinstance(result, BadRequest):
        raise result
    items, scores, ignored = result
    return {"items": items, "scores": scores, **({"ignored": ignored} if ignored else {})}


def create_app(service: Service, batching: Batching = Batching(), limits: Limits = Limits()) -> FastAPI:
    single, batch = request_models(limits)
    batcher = MicroBatcher(service.decode_rows, max_batch=batching.max_batch, max_wait=batching.max_wait_ms / 1000,
                           max_queue=batching.max_queue, in_flight=batching.workers)
    metrics = Metrics(batcher)
    batcher.on_batch = metrics.on_batch
    reloading, tasks = asyncio.Lock(), set()

    async def reload() -> dict:
        async with reloading:  # one reload at a time; requests are answered throughout
            out = await asyncio.to_thread(service.reload)
        if out["reloaded"]:  # the operator's confirmation (a SIGHUP has no reply)
            print(f"sidrec serve: serving catalogue {out['version']} ({out['n_items']} items; was "
                  f"{out['previous']})", file=sys.stderr, flush=True)
        return out

    def reloaded(task: asyncio.Task) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:  # keep serving the old catalogue; say why
            print(f"sidrec serve: reload failed, still serving the previous catalogue: {task.exception()}",
                  file=sys.stderr, flush=True)

    def on_sighup() -> None:
        task = asyncio.get_running_loop().create_task(reload())
        tasks.add(task)  # keep a reference until it finishes
        task.add_done_callback(reloaded)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not on Windows / not main thread
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_sighup)
        yield
        await batcher.close()  # uvicorn has finished the in-flight requests by now

    app = FastAPI(title="sidrec", lifespan=lifespan, default_response_class=JSON)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.state.service, app.state.batcher, app.state.metrics = service, batcher, metrics
    _errors(app, metrics)

    @app.post("/recommend", summary="Top-k next items for one history of raw item ids")
    async def recommend(request: Request):
        req = parse(single, await read_body(request, limits.max_body_bytes))
        [result] = await batcher.submit([service.row(req)])
        return JSON(_answer(result))

    @app.post("/recommend/batch", summary="Top-k next items for many histories in one call")
    async def recommend_batch(request: Request):
        reqs = parse(batch, await read_body(request, limits.max_body_bytes)).requests
        results = await batcher.submit([service.row(r, f"requests[{i}].") for i, r in enumerate(reqs)])
        return JSON({"results": [_answer(r) for r in results]})

    @app.post("/admin/reload", summary="Serve the run's active catalogue version (after `sidrec items add`)")
    async def admin_reload():
        return JSON(await reload())

    @app.get("/health")
    async def health():
        if batcher.closing:
            return JSON({"status": "shutting down"}, status_code=503)
        if not service.alive:  # its decode process died: every request would fail; let the orchestrator restart us
            return JSON({"status": "decode worker exited or a reload failed part-way"}, status_code=503)
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
          threads: int | None = None, table_precision: str = "float32") -> None:
    """Load the run, bind host:port (0: any free port) and serve until SIGINT/SIGTERM, which finish the
    requests in flight before exiting."""
    from sidrec.serve.worker import DecodePool

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # connections wait in the backlog until the server takes them: none refused
    except OSError as e:
        raise UserError(f"--host/--port: cannot listen on {host}:{port} ({e.strerror})") from None
    # the model decodes in a child process (see sidrec.serve.worker); micro-batches are small, and
    # intra-op threads beyond half the cores mostly spin and starve the event loop (and, on one
    # machine, the clients)
    service = DecodePool(Service, run, workers=batching.workers, device=device, decode=decode, beam=beam,
                         max_batch=batching.max_batch, table_precision=table_precision,
                         threads=threads or max(1, (os.cpu_count() or 2) // 2 // batching.workers))
    try:
        _run_server(service, run, sock, host, beam, batching, limits)  # the workers stop whatever happens
    finally:
        service.close()


def _run_server(service, run, sock: socket.socket, host: str, beam: int, batching: Batching, limits: Limits) -> None:
    """The app on the bound socket until SIGINT/SIGTERM (uvicorn finishes the requests in flight)."""
    import uvicorn

    app = create_app(service, batching, limits)
    bound = sock.getsockname()[1]
    info = service.info()
    print(f"sidrec: serving {run} on http://{host}:{bound} ({info['head']}, {info['n_items']:,} items, decode "
          f"{info['decode']}{' ' + str(beam) if info['decode'] == 'beam' else ''}, batches of up to "
          f"{batching.max_batch})", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=30,
                            limit_concurrency=max(256, 2 * batching.max_queue))  # beyond: 503 before parsing
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it with the handler it found: a no-op
    # here, so a graceful stop exits 0 (SIGINT keeps Python's handler: exit 130, as for other commands)
    signal.signal(signal.SIGTERM, lambda *_: None)
    gc.freeze()  # what is loaded by now lives as long as the server: full collections skip it (the p99 tail)
    uvicorn.Server(config).run(sockets=[sock])  # uvloop + httptools when installed
