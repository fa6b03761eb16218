"""Runs every stream's window decodes on one inference thread, batching the ones that wait together.

The event loop only queues work and awaits a future; the model runs on the worker thread. Requests that
arrive while the worker is busy (or within ``max_wait_ms`` of the first one) go into one ``run_windows``
call, so several streams share each pass over the model.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .inference import WindowReply, WindowRequest, run_windows
from .metrics import Metrics

log = logging.getLogger(__name__)

CLOSED_BEFORE_RUN = "the scheduler was closed before this request ran"

Runner = Callable[[Any, list[WindowRequest]], list[WindowReply | Exception]]


@dataclass(eq=False)
class _Job:
    request: WindowRequest
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    submitted: float = field(default_factory=time.monotonic)
    abandoned: bool = False  # the caller stopped waiting: skip it if it has not run yet

    def deliver(self, result: WindowReply | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(_settle, self.future, result)
        except RuntimeError:  # the caller's event loop is closed: nobody is waiting
            pass


def _settle(future: asyncio.Future, result: WindowReply | BaseException) -> None:
    if future.done():  # cancelled: the stream is gone
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


class Scheduler:
    """One inference worker thread shared by all streams.

    ``runner`` is called on the worker thread as ``runner(engine, requests)`` and must return one reply or
    exception per request (default: :func:`streaming.inference.run_windows`).
    """

    def __init__(self, engine: Any, max_batch: int = 8, max_wait_ms: float = 5, metrics: Metrics | None = None,
                 runner: Runner = run_windows):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch={max_batch!r} is invalid; use an integer >= 1")
        if not 0 <= max_wait_ms <= 1000:
            raise ValueError(f"max_wait_ms={max_wait_ms!r} is out of range; allowed: 0 to 1000")
        self.engine = engine
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.metrics = metrics if metrics is not None else Metrics()
        self._runner = runner
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="whisper-stream-inference", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Requests waiting for the worker (approximate)."""
        return self._queue.qsize()

    async def submit(self, request: WindowRequest) -> WindowReply:
        """Run ``request`` on the worker; returns its reply or raises its exception.

        Cancelling the caller abandons the request: it is skipped if it has not started, and its result is
        dropped if it has.
        """
        if self._closed:
            raise RuntimeError("the scheduler is closed; create a new one to run more requests")
        loop = asyncio.get_running_loop()
        job = _Job(request, loop.create_future(), loop)
        self._queue.put(job)
        try:
            return await job.future
        finally:
            job.abandoned = True

    def close(self, timeout: float | None = None) -> None:
        """Stop the worker after the batch it is running; requests still queued fail with RuntimeError."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.deliver(RuntimeError(CLOSED_BEFORE_RUN))

    # --- worker thread -------------------------------------------------------------------------------

    def _work(self) -> None:
        while not self._closed:
            job = self._queue.get()
            if job is None:
                break
            batch = [job] if not job.abandoned else []
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    break
                if not job.abandoned:
                    batch.append(job)
            if self._closed:
                for job in batch:
                    job.deliver(RuntimeError(CLOSED_BEFORE_RUN))
            elif batch:
                self._run(batch)

    def _run(self, batch: list[_Job]) -> None:
        started = time.monotonic()
        try:
            results = self._runner(self.engine, [job.request for job in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"runner returned {len(results)} results for {len(batch)} requests")
        except Exception as exc:  # noqa: BLE001 - a runner bug fails this batch, not the worker
            log.exception("inference batch of %d failed", len(batch))
            results = [exc] * len(batch)
        busy = time.monotonic() - started
        failures = sum(isinstance(r, BaseException) for r in results)
        self.metrics.observe_batch([started - job.submitted for job in batch], busy, failures)
        if len(batch) > 1:
            log.debug("ran a batch of %d window decodes in %.3f s", len(batch), busy)
        for job, result in zip(batch, results):
            job.deliver(result)
