"""Runs every stream's window decodes and speaker embeddings on inference worker threads, batching the ones
that wait together.

The event loop only queues work and awaits a future; the model runs on the worker threads. Requests that
arrive while a worker is busy (or within ``max_wait_ms`` of the first one) go into one runner call, so
several streams share each pass over the model. Each reply is delivered as soon as the runner yields it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from .core.messages import EmbedRequest, Reply, Request, WindowReply, WindowRequest
from .engine.inference import iter_requests
from .metrics import Metrics

log = logging.getLogger(__name__)

CLOSED_BEFORE_RUN = "the scheduler was closed before this request ran"

Runner = Callable[[Any, list[Request]], Iterable[Reply | Exception]]


@dataclass(eq=False)
class _Job:
    request: Request
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    submitted: float = field(default_factory=time.monotonic)
    abandoned: bool = False  # the caller stopped waiting: skip it if it has not run yet

    def deliver(self, result: Reply | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(_settle, self.future, result)
        except RuntimeError:  # the caller's event loop is closed: nobody is waiting
            pass


def _settle(future: asyncio.Future, result: Reply | BaseException) -> None:
    if future.done():  # cancelled: the stream is gone
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def check_options(max_batch: int, max_wait_ms: float, workers: int, shed_after_ms: float) -> None:
    """Raise ValueError naming the first scheduler option out of its range (the server checks them with this
    before it loads the model)."""
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch={max_batch!r} is invalid; use an integer >= 1")
    if not 0 <= max_wait_ms <= 1000:
        raise ValueError(f"max_wait_ms={max_wait_ms!r} is out of range; allowed: 0 to 1000")
    if not isinstance(workers, int) or not 1 <= workers <= 16:
        raise ValueError(f"workers={workers!r} is invalid; use an integer from 1 to 16")
    if not 0 <= shed_after_ms <= 60_000:
        raise ValueError(f"shed_after_ms={shed_after_ms!r} is out of range; allowed: 0 (never) to 60000")


class Scheduler:
    """Inference worker threads (``workers``, default one) shared by all streams.

    Speaker embeddings go first, all those waiting in one runner call: they are cheap (about 1/50 of a second
    of CPU per second of audio) and finals may wait for them. Then final decodes (the end of an utterance:
    most of the words a user waits for), one per runner call; interim decodes that wait together share a
    batch. A speculative decode (the final decode asked for at a pause, before the endpoint is certain) runs
    only if a worker is free for it when it arrives, else it is answered at once as skipped: it spends spare
    capacity only. A final decode that waited longer than
    ``shed_after_ms`` (0: never) is overload: it runs with the short audio context of interim decodes (the
    window and its trailing silence instead of Whisper's 30 s), whose encoder pass costs about a third.

    ``runner`` is called on a worker thread as ``runner(engine, requests)`` and must produce one reply or
    exception per request, in order (default: :func:`streaming.engine.inference.iter_requests`). ``on_busy(seconds)``
    hears how long each batch took.
    """

    def __init__(self, engine: Any, max_batch: int = 8, max_wait_ms: float = 5, metrics: Metrics | None = None,
                 runner: Runner = iter_requests, workers: int = 1, on_busy: Callable[[float], None] | None = None,
                 shed_after_ms: float = 0):
        check_options(max_batch, max_wait_ms, workers, shed_after_ms)
        self.engine = engine
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.shed_after = shed_after_ms / 1000
        self.metrics = metrics if metrics is not None else Metrics()
        self._runner = runner
        self._on_busy = on_busy
        self._embeds: deque[_Job] = deque()
        self._finals: deque[_Job] = deque()
        self._interims: deque[_Job] = deque()
        self._ready = threading.Condition()
        self._idle = 0  # workers waiting for work
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"whisper-stream-inference-{i}", daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    @property
    def queued(self) -> int:
        """Requests waiting for a worker (abandoned ones included until a worker skips them)."""
        with self._ready:
            return self._waiting()

    def _waiting(self) -> int:
        return len(self._embeds) + len(self._finals) + len(self._interims)

    async def submit(self, request: Request) -> Reply:
        """Run ``request`` on a worker; returns its reply or raises its exception.

        Cancelling the caller abandons the request: it is skipped if it has not started, and its result is
        dropped if it has.
        """
        if self._closed:
            raise RuntimeError("the scheduler is closed; create a new one to run more requests")
        loop = asyncio.get_running_loop()
        job = _Job(request, loop.create_future(), loop)
        with self._ready:
            if isinstance(request, WindowRequest) and request.speculative and self._idle <= self._waiting():
                self.metrics.count_skipped()
                return WindowReply(skipped=True)
            self._queue(request).append(job)
            self._ready.notify()
        try:
            return await job.future
        finally:
            job.abandoned = True

    def close(self, timeout: float | None = None) -> None:
        """Stop the workers after the batches they are running; requests still queued fail with RuntimeError.
        A runner with a ``close`` method is closed too."""
        with self._ready:
            if self._closed:
                return
            self._closed = True
            self._ready.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        with self._ready:
            left = [*self._embeds, *self._finals, *self._interims]
            for queue in (self._embeds, self._finals, self._interims):
                queue.clear()
        for job in left:
            job.deliver(RuntimeError(CLOSED_BEFORE_RUN))
        close_runner = getattr(self._runner, "close", None)  # e.g. a ProcessRunner's child processes
        if close_runner is not None:
            close_runner()

    def _queue(self, request: Request) -> deque[_Job]:
        if isinstance(request, EmbedRequest):
            return self._embeds
        return self._finals if request.final else self._interims

    # --- worker thread -------------------------------------------------------------------------------

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            if batch:
                self._run(batch)

    def _take(self) -> list[_Job] | None:
        """The next batch: every waiting speaker embedding, else a final decode alone, else interim decodes
        gathered for up to ``max_wait``; None once closed (what was taken then goes back to the queue, to fail
        in :meth:`close`)."""
        with self._ready:
            while not self._closed and not self._embeds and not self._finals and not self._interims:
                self._idle += 1
                self._ready.wait()
                self._idle -= 1
            if self._closed:
                return None
            if self._embeds:
                batch = [job for job in self._embeds if not job.abandoned]
                self._embeds.clear()
                return batch
            if self._finals:
                job = self._finals.popleft()
                if job.abandoned:
                    return []
                if self.shed_after and job.request.context and time.monotonic() - job.submitted > self.shed_after:
                    job.request = replace(job.request, context=0.0)  # the caller keeps its own request
                    self.metrics.count_shed()
                return [job]
            batch: list[_Job] = []
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                while self._interims and len(batch) < self.max_batch:
                    job = self._interims.popleft()
                    if not job.abandoned:
                        batch.append(job)
                remaining = deadline - time.monotonic()
                if len(batch) == self.max_batch or self._embeds or self._finals or remaining <= 0:
                    break
                self._ready.wait(remaining)
                if self._closed:
                    self._interims.extendleft(reversed(batch))
                    return None
            return batch

    def _run(self, batch: list[_Job]) -> None:
        started = time.monotonic()
        delivered = failures = 0
        try:
            for result in self._runner(self.engine, [job.request for job in batch]):
                if delivered == len(batch):
                    raise RuntimeError(f"runner produced more than {len(batch)} results")
                failures += isinstance(result, BaseException)
                batch[delivered].deliver(result)
                delivered += 1
            if delivered < len(batch):
                raise RuntimeError(f"runner produced {delivered} results for {len(batch)} requests")
        except Exception as exc:  # noqa: BLE001 - a runner bug fails the rest of this batch, not the worker
            log.exception("inference batch of %d failed", len(batch))
            for job in batch[delivered:]:
                job.deliver(exc)
            failures += len(batch) - delivered
        busy = time.monotonic() - started
        self.metrics.observe_batch([started - job.submitted for job in batch], busy, failures)
        if self._on_busy is not None:
            self._on_busy(busy)
        if len(batch) > 1:
            log.debug("ran a batch of %d requests in %.3f s", len(batch), busy)
