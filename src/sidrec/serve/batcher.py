"""Micro-batching: concurrent requests decoded together in one batched call, off the event loop.

Requests wait in a queue bounded in rows (users): beyond `max_queue` waiting rows a request is
refused at once (back-pressure, never an unbounded pile-up). One worker coroutine takes everything queued, up to `max_batch` rows, and runs
the decode function in a single worker thread, so the event loop keeps accepting and validating
requests while the model runs. Requests that arrive during a decode form the next batch, which is
sent as soon as a decoder is free: the batch in flight is the window in which the next one fills.
With `in_flight` > 1 (several decode processes) that many batches are decoded at once.
Optionally (`max_wait` > 0), when the server is under concurrent load (the last batch held more
than one request) the worker also waits up to `max_wait` seconds for a batch to fill; with a decoder
in another process that wait is idle decoder time (measured: 2 ms cost 25% of the throughput at
concurrency 64), so the server's default is 0. At concurrency 1 it never waits. `max_batch=1` is
one request per call (the baseline the benchmark compares with).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable


class Overloaded(Exception):
    """The queue is full, the server is shutting down or its decode worker has died: answer 503."""


@dataclass
class _Entry:
    rows: list[Any]
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """`await submit(rows)` -> the decode function's results for those rows.

    fn(rows) -> results (one per row, same order) runs in one worker thread; an exception it raises
    fails every request of that batch (the server answers 500 and keeps running). A request with
    more rows than `max_batch` forms a batch of its own: `fn` splits what it decodes at once.
    on_batch(n_rows, seconds) is called after every decode (metrics).
    """

    def __init__(self, fn: Callable[[list], list], *, max_batch: int = 64, max_wait: float = 0.0,
                 max_queue: int = 1024, on_batch: Callable[[int, float], None] | None = None, in_flight: int = 1):
        self.fn, self.max_batch, self.max_wait, self.max_queue = fn, max_batch, max_wait, max_queue
        self.on_batch = on_batch
        self.in_flight = in_flight  # batches decoded at once (one per decode process)
        self.queue: asyncio.Queue | None = None
        self.pool = ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="sidrec-decode")
        self.closing = False
        self._task: asyncio.Task | None = None
        self._slots: asyncio.Semaphore | None = None
        self._running: set[asyncio.Task] = set()
        self._last_batch = 1
        self._queued_rows = 0

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self._slots = asyncio.Semaphore(self.in_flight)
        self._task = asyncio.get_running_loop().create_task(self._loop())

    @property
    def depth(self) -> int:
        """Rows (users) waiting for the decode worker."""
        return self._queued_rows

    async def submit(self, rows: list) -> list:
        if self.closing or self.queue is None:
            raise Overloaded("the server is shutting down")
        if self._queued_rows + len(rows) > self.max_queue and self._queued_rows:
            raise Overloaded(f"the request queue is full ({self._queued_rows} users waiting, at most {self.max_queue})")
        entry = _Entry(rows, asyncio.get_running_loop().create_future())
        self._queued_rows += len(rows)
        self.queue.put_nowait(entry)
        return await entry.future

    async def close(self) -> None:
        """Refuse new requests, finish every queued one, stop the worker."""
        self.closing = True
        if self._task is not None:
            await self.queue.put(_STOP)
            await self._task
        self.pool.shutdown(wait=True)

    async def _loop(self) -> None:
        pending = None  # an entry taken from the queue that belongs to the next batch (or _STOP)
        while True:  # _run fails a batch's requests on any error: the loop itself never dies
            await self._slots.acquire()  # a decoder is free: until then the queue goes on filling
            first = pending if pending is not None else await self.queue.get()
            pending = None
            if first is _STOP:
                await asyncio.gather(*self._running)  # the batches in flight finish first
                return
            batch, n = [first], len(first.rows)
            deadline = time.perf_counter() + (self.max_wait if self._last_batch > 1 else 0.0)
            while n < self.max_batch:
                if self.queue.empty():
                    if time.perf_counter() >= deadline:
                        break
                    await asyncio.sleep(0.0002)  # let the event loop read more requests
                    continue
                nxt = self.queue.get_nowait()
                if nxt is _STOP or n + len(nxt.rows) > self.max_batch:
                    pending = nxt
                    break
                batch.append(nxt)
                n += len(nxt.rows)
            # hand the batch to the decoder now, before this loop yields to the answers of the last
            # one (a task would start only after them, leaving the decoder idle meanwhile)
            rows = [r for e in batch for r in e.rows]
            self._queued_rows -= len(rows)
            t = time.perf_counter()
            work = asyncio.get_running_loop().run_in_executor(self.pool, self.fn, rows)
            if self.in_flight == 1:  # answer here: the next batch is formed the moment this one is done
                await self._answer(batch, rows, work, t)
                continue
            task = asyncio.get_running_loop().create_task(self._answer(batch, rows, work, t))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _answer(self, batch: list[_Entry], rows: list, work: asyncio.Future, t: float) -> None:
        """Wait for a batch's decode (sent at `t`), free its decoder, answer its requests."""
        try:
            results = await work
            error = None
        except Exception as e:  # noqa: BLE001 - one bad batch must not stop the server
            results, error = None, e
        finally:
            # free the decoder before answering: the loop sends the next batch (already queued) before
            # these answers are written, so the decoder never waits for the HTTP side
            self._slots.release()
        if error is None and self.on_batch is not None:
            self.on_batch(len(rows), time.perf_counter() - t)
        self._last_batch = len(batch)
        i = 0
        for e in batch:
            if not e.future.done():  # done: the client went away
                if error is not None:
                    e.future.set_exception(error)
                else:
                    e.future.set_result(results[i:i + len(e.rows)])
            i += len(e.rows)


_STOP = object()
