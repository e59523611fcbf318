"""The model in a process of its own: `DecodeProcess`, what `sidrec serve` decodes with.

Why a process and not a thread: in one process the event loop (HTTP parsing, validation, JSON)
and the decode thread share one interpreter lock, and a decode batch is hundreds of small torch
ops, each giving the lock up and taking it back. The two took turns on one core: at concurrency
64 on two cores the server used 0.98 CPU cores and the tail latency was 4x the median. With the
model in a child process, parsing and decoding run in parallel, each on its own core, and a
batch crosses a pipe (a few KB each way for 64 users: the raw ids in, the ranked raw ids out).

The child owns the catalogue: ids are mapped, decoded and mapped back there, so a reload swaps
everything at once. It ignores SIGINT/SIGTERM (the server finishes its requests, then stops it)
and exits when the pipe closes, so it never outlives the server.
"""

from __future__ import annotations

import gc
import multiprocessing
import queue
import signal
import threading
from pathlib import Path
from typing import Callable

from sidrec.errors import UserError
from sidrec.serve.batcher import Overloaded


class DecodePool:
    """`workers` decode processes, each the whole model, for a server that decodes several batches at
    once (a machine with cores to spare; on 2 cores one is best). Each batch goes to a free process;
    a reload waits until every process is idle, then swaps the catalogue in all of them, so every
    batch decodes with one catalogue and no answer mixes versions. Same interface as a `DecodeProcess`."""

    def __init__(self, make: Callable, run: str | Path, *, workers: int, threads: int, **settings):
        self.procs = [DecodeProcess(make, run, threads=threads, **settings) for _ in range(workers)]  # load in parallel
        try:
            for p in self.procs:
                p.wait_ready()
        except BaseException:
            self.close()
            raise
        self.checks = self.procs[0].checks
        self._free: queue.Queue = queue.Queue()
        for p in self.procs:
            self._free.put(p)

    def row(self, req, where: str = ""):
        return self.checks.row(req, where)

    def _take(self) -> "DecodeProcess":
        """A free live process (a dead one is dropped, not handed out again); 503 when none is left."""
        while True:
            try:
                p = self._free.get(timeout=1.0)
            except queue.Empty:
                if not any(p.alive for p in self.procs):
                    raise Overloaded("every decode worker has exited") from None
                continue
            if p.alive:
                return p

    def decode_rows(self, rows: list) -> list:
        """In one of the micro-batcher's threads: decode on the first free process."""
        p = self._take()
        try:
            return p.decode_rows(rows)
        finally:
            self._free.put(p)

    def reload(self) -> dict:
        """Every process idle, then each loads the active version; if they end on different versions
        (an `items add` landed in between) they load again; a worker that fails leaves the pool
        unhealthy (/health 503: restart the server) rather than serving mixed catalogues."""
        taken = [self._take() for _ in self.procs]  # no batch sees a half-done swap
        try:
            for _ in range(3):
                outs = [p.reload() for p in taken]
                if len({p.info()["catalog_version"] for p in taken}) == 1:
                    done = [o for o in outs if o["reloaded"]]
                    return done[0] if done else outs[0]
            raise RuntimeError("the decode workers could not agree on a catalogue version")
        except BaseException:
            self.broken = True
            raise
        finally:
            for p in taken:
                self._free.put(p)

    def info(self) -> dict:
        return self.procs[0].info()

    broken = False  # a reload failed part-way: the workers may serve different catalogues

    @property
    def alive(self) -> bool:
        return not self.broken and all(p.alive for p in self.procs)

    def close(self) -> None:
        for p in self.procs:
            p.close()


class DecodeProcess:
    """`make(run, **settings)` (sidrec.serve.app.Service, passed in: this module does not import the
    app) built and run in a child process, with the interface the app uses: `row`, `decode_rows`,
    `reload`, `info`, `alive`, `close`. Calls are serialised (one pipe): the micro-batcher makes one
    at a time anyway, and a reload waits for the batch in flight."""

    def __init__(self, make: Callable, run: str | Path, *, threads: int, **settings):
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no state forked from the server
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_child, args=(child, make, str(run), settings, threads),
                                 name="sidrec-decode", daemon=True)
        self._proc.start()
        child.close()
        self._lock = threading.Lock()

    def wait_ready(self) -> None:
        """Wait for the child's first message: the run is loaded (or why not: UserError, RuntimeError)."""
        try:
            self._info, self.checks = self._call(None)
        except Overloaded:
            self._proc.join(5)
            raise RuntimeError(f"the decode worker exited while loading the run (code {self._proc.exitcode})") from None

    def _call(self, op: str | None, arg=None):
        with self._lock:
            try:
                if op is not None:
                    self._conn.send((op, arg))
                status, payload = self._conn.recv()
            except (EOFError, OSError, BrokenPipeError):
                raise Overloaded(f"the decode worker exited (code {self._proc.exitcode})") from None  # 503
        if status == "user-error":
            raise UserError(payload)
        if status == "error":
            raise RuntimeError(payload)
        return payload

    def row(self, req, where: str = ""):
        return self.checks.row(req, where)

    def decode_rows(self, rows: list) -> list:
        return self._call("decode", rows)

    def reload(self) -> dict:
        out, self._info = self._call("reload")
        return out

    def info(self) -> dict:
        return self._info

    @property
    def alive(self) -> bool:
        return self._proc.is_alive()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the child once it has answered what it was given."""
        if self._lock.acquire(timeout=timeout):  # a call still in flight (hung?) is not waited for forever
            try:
                self._conn.send(("stop", None))
            except (OSError, BrokenPipeError):
                pass
            finally:
                self._lock.release()
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._conn.close()


def _child(conn, make: Callable, run: str, settings: dict, threads: int) -> None:
    """The worker's loop: load the run, then answer ("decode", rows) and ("reload", None) until
    ("stop", None) or the server's end of the pipe closes."""
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server decides
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(threads)
    try:
        service = make(run, **settings)
    except UserError as e:
        conn.send(("user-error", str(e)))
        return
    except Exception as e:  # noqa: BLE001 - reported by the server, which exits
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    gc.freeze()  # the loaded run lives as long as the worker: full collections skip it (tail latency)
    conn.send(("ok", (service.info(), service.checks)))
    while True:
        try:
            op, arg = conn.recv()
        except (EOFError, OSError):
            return
        if op == "stop":
            return
        try:
            out = service.decode_rows(arg) if op == "decode" else (service.reload(), service.info())
        except Exception as e:  # noqa: BLE001 - one failed batch or reload: the worker goes on
            conn.send(("error", f"{type(e).__name__}: {e}"))
            continue
        if op == "reload" and out[0]["reloaded"]:  # the old catalogue was frozen with the rest: free it
            gc.unfreeze()
            gc.collect()
            gc.freeze()
        conn.send(("ok", out))
