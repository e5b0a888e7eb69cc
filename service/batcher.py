"""Asyncio micro-batcher: groups single items from concurrent requests into one engine call.

A request submits its items (one per image) at once; the worker takes the first waiting
item, waits up to max_wait_ms for more (up to max_batch_size), and runs the batch in a
single worker thread so the event loop keeps accepting requests. The queue is bounded:
a request whose items do not all fit is refused at once (Overloaded -> 503 with
Retry-After), and a request that waits longer than its timeout gets RequestTimeout (504);
its items are then skipped if they have not run yet.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Sequence, TypeVar

from service.errors import BackendUnavailable, Overloaded, RequestTimeout

log = logging.getLogger("service.batcher")

T = TypeVar("T")
R = TypeVar("R")

_STOP = object()


@dataclass
class Timed(Generic[R]):
    """A result with how long its item waited in the queue and how long its batch ran."""

    value: R
    queue_ms: float
    run_ms: float
    batch_size: int


@dataclass
class _Entry:
    payload: Any
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher(Generic[T, R]):
    def __init__(
        self,
        run: Callable[[list[T]], Sequence[R]],
        *,
        max_batch_size: int = 8,
        max_wait_ms: float = 5.0,
        queue_size: int = 64,
        timeout_s: float = 30.0,
        retry_after_s: int = 1,
    ) -> None:
        if max_batch_size < 1 or queue_size < 1:
            raise ValueError("max_batch_size and queue_size must be >= 1")
        self._run = run
        self.max_batch_size = int(max_batch_size)
        self.max_wait_s = float(max_wait_ms) / 1000.0
        self.queue_size = int(queue_size)
        self.timeout_s = float(timeout_s)
        self.retry_after_s = int(retry_after_s)
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False
        # statistics
        self.batches = 0
        self.items = 0
        self.skipped = 0
        self.batch_sizes: Counter[int] = Counter()

    # -------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self._queue = asyncio.Queue()  # bounded by hand: all of a request's items or none
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._closing = False
        self._task = asyncio.create_task(self._worker(), name="micro-batcher")

    async def stop(self) -> None:
        """Refuse new items, finish the queued ones (graceful drain), stop the worker."""
        if self._task is None:
            return
        self._closing = True
        self._queue.put_nowait(_STOP)
        await self._task
        self._executor.shutdown(wait=True)
        self._task = None

    @property
    def depth(self) -> int:
        return 0 if self._queue is None else self._queue.qsize()

    @property
    def max_batch_seen(self) -> int:
        return max(self.batch_sizes, default=0)

    def stats(self) -> dict:
        return {
            "max_batch_size": self.max_batch_size,
            "batches": self.batches,
            "items": self.items,
            "skipped": self.skipped,
            "queue_depth": self.depth,
            "max_batch_seen": self.max_batch_seen,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
        }

    # ----------------------------------------------------------------- submit
    async def submit_many(self, payloads: Sequence[T]) -> list[Timed[R]]:
        if self._queue is None or self._closing:
            raise BackendUnavailable("the gateway is not running (starting up or shutting down)")
        if self.depth + len(payloads) > self.queue_size:
            raise Overloaded(
                f"queue full ({self.depth} waiting, limit {self.queue_size}); retry later",
                retry_after_s=self.retry_after_s,
                limit=self.queue_size,
            )
        loop = asyncio.get_running_loop()
        entries = [_Entry(p, loop.create_future()) for p in payloads]
        for e in entries:  # no await in between: all or none
            self._queue.put_nowait(e)
        futures = [e.future for e in entries]
        try:
            return await asyncio.wait_for(asyncio.gather(*futures), self.timeout_s)
        except asyncio.TimeoutError:
            raise RequestTimeout(
                f"request took longer than {self.timeout_s:g} s", limit=self.timeout_s
            ) from None
        finally:
            for f in futures:
                if not f.done():
                    f.cancel()

    async def submit(self, payload: T) -> Timed[R]:
        return (await self.submit_many([payload]))[0]

    # ----------------------------------------------------------------- worker
    async def _collect(self, first: _Entry) -> tuple[list[_Entry], bool]:
        batch, stop = [first], False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            if item is _STOP:
                stop = True
                break
            batch.append(item)
        return batch, stop

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        stop = False
        while not stop:
            first = await self._queue.get()
            if first is _STOP:
                break
            batch, stop = await self._collect(first)
            live = [e for e in batch if not e.future.done()]  # timed out / cancelled: skip
            self.skipped += len(batch) - len(live)
            if not live:
                continue
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self._run, [e.payload for e in live])
                if len(results) != len(live):
                    raise RuntimeError(f"backend returned {len(results)} results for {len(live)} items")
            except Exception as exc:  # the backend failed: every item of the batch gets the error
                log.exception("batch of %d failed", len(live))
                for e in live:
                    if not e.future.done():
                        e.future.set_exception(exc)
                continue
            run_ms = (time.perf_counter() - started) * 1000.0
            self.batches += 1
            self.items += len(live)
            self.batch_sizes[len(live)] += 1
            for e, r in zip(live, results):
                if not e.future.done():
                    queue_ms = (started - e.enqueued) * 1000.0
                    e.future.set_result(Timed(r, queue_ms, run_ms, len(live)))
        # drain whatever is left after the stop marker
        while not self._queue.empty():
            e = self._queue.get_nowait()
            if e is not _STOP and not e.future.done():
                e.future.set_exception(BackendUnavailable("the gateway is shutting down"))
