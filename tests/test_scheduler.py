"""Tests for the inference scheduler: batching across streams, failure isolation, cancellation, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from streaming.engine.inference import WindowReply, WindowRequest
from streaming.scheduler import Scheduler


def request(tag: float = 0.0) -> WindowRequest:
    return WindowRequest(audio=np.full(160, tag, np.float32))


class FakeRunner:
    """Records each batch; replies with the request's tag; can hold the worker until released."""

    def __init__(self, hold_first: bool = False, fail_tags: tuple[float, ...] = ()):
        self.batches: list[list[float]] = []
        self.release = threading.Event()
        self.started = threading.Event()
        if not hold_first:
            self.release.set()
        self.fail_tags = fail_tags

    def __call__(self, engine: object, requests: list[WindowRequest]) -> list[WindowReply | Exception]:
        self.started.set()
        self.release.wait(5)
        tags = [float(r.audio[0]) for r in requests]
        self.batches.append(tags)
        return [ValueError(f"bad window {t}") if t in self.fail_tags else WindowReply(language=str(t)) for t in tags]


async def wait_started(runner: FakeRunner) -> None:
    assert await asyncio.to_thread(runner.started.wait, 5)


@contextlib.asynccontextmanager
async def busy_worker(runner: FakeRunner, **settings: Any) -> AsyncIterator[tuple[Scheduler, asyncio.Task]]:
    """A scheduler whose worker is held running request 0 (``runner`` holds its first batch), so that the
    requests submitted next wait together; yields the scheduler and request 0's task, closes it after."""
    scheduler = Scheduler(object(), runner=runner, **settings)
    try:
        first = asyncio.create_task(scheduler.submit(request(0)))
        await wait_started(runner)
        yield scheduler, first
    finally:
        scheduler.close()


async def test_submit_returns_the_reply() -> None:
    runner = FakeRunner()
    scheduler = Scheduler(object(), runner=runner)
    try:
        reply = await scheduler.submit(request(1))
        assert reply.language == "1.0" and runner.batches == [[1.0]]
    finally:
        scheduler.close()


async def test_requests_that_wait_while_the_worker_is_busy_run_as_one_batch() -> None:
    runner = FakeRunner(hold_first=True)
    async with busy_worker(runner, max_batch=8, max_wait_ms=0) as (scheduler, first):
        others = [asyncio.create_task(scheduler.submit(request(t))) for t in (1, 2, 3)]
        await asyncio.sleep(0.05)
        runner.release.set()
        replies = await asyncio.gather(first, *others)
        assert [r.language for r in replies] == ["0.0", "1.0", "2.0", "3.0"]
        assert runner.batches == [[0.0], [1.0, 2.0, 3.0]]
    # A batch's metrics are recorded after its replies are delivered; closing joined the worker, so they are in.
    histogram = scheduler.metrics.batch_size
    assert histogram.count == 2 and histogram.sum == 4
    assert scheduler.metrics.requests == 4 and scheduler.metrics.busy_seconds >= 0.04
    assert scheduler.metrics.queue_delay.count == 4 and scheduler.metrics.queue_delay.sum >= 0.1


async def test_max_batch_caps_the_batch_and_max_wait_gathers_stragglers() -> None:
    runner = FakeRunner(hold_first=True)
    async with busy_worker(runner, max_batch=2, max_wait_ms=0) as (scheduler, first):
        others = [asyncio.create_task(scheduler.submit(request(t))) for t in (1, 2, 3, 4, 5)]
        await asyncio.sleep(0.05)
        runner.release.set()
        await asyncio.gather(first, *others)
        assert runner.batches == [[0.0], [1.0, 2.0], [3.0, 4.0], [5.0]]
    runner = FakeRunner()
    scheduler = Scheduler(object(), max_batch=8, max_wait_ms=200, runner=runner)
    try:
        async def late(tag: float) -> WindowReply:
            await asyncio.sleep(0.02)
            return await scheduler.submit(request(tag))

        await asyncio.gather(scheduler.submit(request(0)), late(1))
        assert runner.batches == [[0.0, 1.0]]
    finally:
        scheduler.close()


async def test_a_failing_request_fails_only_its_own_stream() -> None:
    runner = FakeRunner(hold_first=True, fail_tags=(2.0,))
    async with busy_worker(runner, max_wait_ms=0) as (scheduler, first):
        tasks = [asyncio.create_task(scheduler.submit(request(t))) for t in (1, 2, 3)]
        await asyncio.sleep(0.05)
        runner.release.set()
        results = await asyncio.gather(first, *tasks, return_exceptions=True)
        assert isinstance(results[2], ValueError) and "bad window 2.0" in str(results[2])
        assert [r.language for i, r in enumerate(results) if i != 2] == ["0.0", "1.0", "3.0"]
        for _ in range(100):  # replies go out as they are ready; the batch's metrics follow
            if scheduler.metrics.request_failures:
                break
            await asyncio.sleep(0.01)
        assert scheduler.metrics.request_failures == 1


async def test_a_runner_that_raises_fails_the_batch_but_not_the_worker() -> None:
    calls = []

    def runner(engine: object, requests: list[WindowRequest]) -> list[WindowReply | Exception]:
        calls.append(len(requests))
        if len(calls) == 1:
            raise RuntimeError("runner bug")
        return [WindowReply() for _ in requests]

    scheduler = Scheduler(object(), runner=runner)
    try:
        with pytest.raises(RuntimeError, match="runner bug"):
            await scheduler.submit(request())
        assert isinstance(await scheduler.submit(request()), WindowReply)
    finally:
        scheduler.close()


async def test_a_cancelled_request_is_skipped_and_never_delivered() -> None:
    runner = FakeRunner(hold_first=True)
    async with busy_worker(runner, max_wait_ms=0) as (scheduler, first):
        gone = asyncio.create_task(scheduler.submit(request(1)))
        kept = asyncio.create_task(scheduler.submit(request(2)))
        await asyncio.sleep(0.02)
        gone.cancel()
        first.cancel()  # already running: its result is dropped
        await asyncio.sleep(0.02)
        runner.release.set()
        assert (await kept).language == "2.0"
        assert runner.batches == [[0.0], [2.0]]
        assert gone.cancelled() and first.cancelled()


async def test_the_event_loop_keeps_running_during_inference() -> None:
    def slow(engine: object, requests: list[WindowRequest]) -> list[WindowReply | Exception]:
        time.sleep(0.3)
        return [WindowReply() for _ in requests]

    scheduler = Scheduler(object(), runner=slow)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        await scheduler.submit(request())
        assert ticks >= 10
    finally:
        task.cancel()
        scheduler.close()


async def test_close_fails_queued_requests_and_refuses_new_ones() -> None:
    runner = FakeRunner(hold_first=True)
    scheduler = Scheduler(object(), max_batch=1, max_wait_ms=0, runner=runner)
    first = asyncio.create_task(scheduler.submit(request(0)))
    await wait_started(runner)
    queued = asyncio.create_task(scheduler.submit(request(1)))
    await asyncio.sleep(0.02)
    closing = asyncio.create_task(asyncio.to_thread(scheduler.close, 5))
    await asyncio.sleep(0.05)
    runner.release.set()
    await closing
    assert (await first).language == "0.0"
    with pytest.raises(RuntimeError, match="closed before this request ran"):
        await queued
    with pytest.raises(RuntimeError, match="scheduler is closed"):
        await scheduler.submit(request())
    assert not any(thread.is_alive() for thread in scheduler._threads)
    scheduler.close()  # idempotent


async def test_each_reply_is_delivered_when_the_runner_yields_it() -> None:
    gate = threading.Event()

    def runner(engine: object, requests: list[WindowRequest]):
        yield WindowReply(language="first")
        assert gate.wait(5)  # the first reply reaches its stream before the second is computed
        for r in requests[1:]:
            yield WindowReply(language=str(float(r.audio[0])))

    scheduler = Scheduler(object(), max_wait_ms=200, runner=runner)
    try:
        first = asyncio.create_task(scheduler.submit(request(2.0)))
        second = asyncio.create_task(scheduler.submit(request(1.0)))
        assert (await asyncio.wait_for(first, 5)).language == "first"
        assert not second.done()
        gate.set()
        assert (await asyncio.wait_for(second, 5)).language == "1.0"
    finally:
        gate.set()
        scheduler.close()


async def test_final_decodes_go_first_and_alone() -> None:
    runner = FakeRunner(hold_first=True)
    async with busy_worker(runner, max_batch=8, max_wait_ms=0) as (scheduler, first):
        interims = [asyncio.create_task(scheduler.submit(request(t))) for t in (1, 2)]
        await asyncio.sleep(0.02)
        finals = [asyncio.create_task(scheduler.submit(replace(request(t), final=True))) for t in (3, 4)]
        await asyncio.sleep(0.02)
        runner.release.set()
        await asyncio.gather(first, *interims, *finals)
        assert runner.batches == [[0.0], [3.0], [4.0], [1.0, 2.0]]


async def test_speaker_embeddings_go_first_all_in_one_batch() -> None:
    from streaming.core.messages import EmbedReply, EmbedRequest

    batches: list[list[str]] = []
    release = threading.Event()

    def runner(engine: object, requests: list) -> list:
        release.wait(5)
        batches.append(["embed" if isinstance(r, EmbedRequest) else str(r.audio[0]) for r in requests])
        return [EmbedReply(np.zeros((1, 2))) if isinstance(r, EmbedRequest) else WindowReply() for r in requests]

    scheduler = Scheduler(object(), runner=runner, max_wait_ms=0)
    try:
        first = asyncio.create_task(scheduler.submit(request(0)))
        await asyncio.sleep(0.05)  # the worker holds request 0
        waiting = [asyncio.create_task(scheduler.submit(r)) for r in (
            request(1), replace(request(2), final=True), EmbedRequest((np.zeros(160, np.float32),)),
            EmbedRequest((np.zeros(160, np.float32),)))]
        await asyncio.sleep(0.05)
        release.set()
        replies = await asyncio.gather(first, *waiting)
    finally:
        scheduler.close()
    assert batches == [["0.0"], ["embed", "embed"], ["2.0"], ["1.0"]]
    assert isinstance(replies[3], EmbedReply) and isinstance(replies[1], WindowReply)


async def test_a_runner_that_stops_early_fails_the_rest_of_its_batch() -> None:
    def runner(engine: object, requests: list[WindowRequest]):
        yield WindowReply(language="only one")

    scheduler = Scheduler(object(), max_wait_ms=200, runner=runner)
    try:
        first, second = (asyncio.create_task(scheduler.submit(request(t))) for t in (0.0, 1.0))
        assert (await first).language == "only one"
        with pytest.raises(RuntimeError, match="1 results for 2 requests"):
            await second
        assert (await scheduler.submit(request(3.0))).language == "only one"  # the worker lives on
    finally:
        scheduler.close()


async def test_workers_run_batches_in_parallel() -> None:
    both = threading.Barrier(2, timeout=5)

    def runner(engine: object, requests: list[WindowRequest]):
        both.wait()  # returns only when two batches run at the same time
        return [WindowReply(language=threading.current_thread().name) for _ in requests]

    scheduler = Scheduler(object(), max_batch=1, max_wait_ms=0, runner=runner, workers=2)
    try:
        replies = await asyncio.gather(scheduler.submit(request(0.0)), scheduler.submit(request(1.0)))
        assert {r.language for r in replies} == {"whisper-stream-inference-0", "whisper-stream-inference-1"}
    finally:
        scheduler.close()


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="max_batch=0 is invalid"):
        Scheduler(object(), max_batch=0)
    with pytest.raises(ValueError, match="max_wait_ms=-1 is out of range"):
        Scheduler(object(), max_wait_ms=-1)
    with pytest.raises(ValueError, match="workers=0 is invalid"):
        Scheduler(object(), workers=0)


@pytest.mark.real_model
async def test_real_engine_decodes_a_stream_request(shared_eval) -> None:
    import wave

    from streaming.core.stream import StreamCore
    from streaming.engine import Engine

    with wave.open(str(shared_eval / "streams" / "en_mixed.wav")) as w:
        pcm = np.frombuffer(w.readframes(16000 * 4), np.int16).astype(np.float32) / 32768
    core = StreamCore()
    core.feed(pcm)
    core.flush()
    scheduler = Scheduler(Engine.load("tiny.en"))
    try:
        req = core.next_request()
        reply = await scheduler.submit(req)
        assert "fellow" in "".join(w.word for w in reply.words).lower()
    finally:
        scheduler.close()


def test_metrics_render_cumulative_histograms() -> None:
    from streaming.metrics import Metrics

    metrics = Metrics()
    metrics.observe_batch([0.002, 0.3, 0.3], busy_seconds=0.5, failures=1)
    metrics.observe_batch([0.0], busy_seconds=0.25, failures=0)
    metrics.add_audio(3.0)
    metrics.count_error("bad_audio")
    text = metrics.render({"streams_capacity": ("Maximum concurrent streams.", 4)})
    lines = {name: float(value) for name, value in
             (line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))}
    assert lines['whisper_stream_batch_size_bucket{le="1.0"}'] == 1
    assert lines['whisper_stream_batch_size_bucket{le="4.0"}'] == 2
    assert lines['whisper_stream_batch_size_bucket{le="+Inf"}'] == 2
    assert lines["whisper_stream_batch_size_sum"] == 4 and lines["whisper_stream_batch_size_count"] == 2
    assert lines['whisper_stream_queue_delay_seconds_bucket{le="0.001"}'] == 1
    assert lines['whisper_stream_queue_delay_seconds_bucket{le="0.25"}'] == 2
    assert lines['whisper_stream_queue_delay_seconds_bucket{le="0.5"}'] == 4
    assert lines["whisper_stream_real_time_factor"] == 0.25
    assert lines["whisper_stream_inference_failures_total"] == 1
    assert lines['whisper_stream_errors_total{code="bad_audio"}'] == 1
    assert lines["whisper_stream_streams_capacity"] == 4
    assert lines["process_cpu_seconds_total"] > 0  # the process collector


async def test_a_final_decode_that_waited_past_shed_after_ms_runs_with_the_short_context() -> None:
    contexts: list[tuple[float, float]] = []

    class Recording(FakeRunner):
        def __call__(self, engine: object, requests: list[WindowRequest]) -> list[WindowReply | Exception]:
            contexts.extend((float(r.audio[0]), r.context) for r in requests)
            return super().__call__(engine, requests)

    runner = Recording(hold_first=True)
    final = replace(request(1), final=True, context=30.0)
    async with busy_worker(runner, shed_after_ms=50) as (scheduler, first):
        waited = asyncio.create_task(scheduler.submit(final))
        await asyncio.sleep(0.2)
        runner.release.set()
        await first
        await waited
        prompt = replace(request(2), final=True, context=30.0)
        await scheduler.submit(prompt)  # a free worker takes it at once: full context
        assert scheduler.metrics.shed_decodes == 1
    assert contexts == [(0.0, 0.0), (1.0, 0.0), (2.0, 30.0)]
    assert final.context == 30.0  # the caller's request is left as it was


def test_shed_after_ms_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="shed_after_ms=-1 is out of range"):
        Scheduler(object(), shed_after_ms=-1)


async def test_a_speculative_decode_runs_on_a_free_worker_and_is_skipped_when_none_is() -> None:
    runner = FakeRunner(hold_first=True)
    speculative = replace(request(1), final=True, speculative=True)
    async with busy_worker(runner) as (scheduler, first):
        reply = await asyncio.wait_for(scheduler.submit(speculative), 1.0)  # answered at once, not queued
        assert reply.skipped and not reply.words and scheduler.queued == 0
        assert scheduler.metrics.skipped_speculative == 1
        runner.release.set()
        await first
        for _ in range(100):  # the worker goes back to waiting
            if scheduler._idle:
                break
            await asyncio.sleep(0.01)
        reply = await scheduler.submit(speculative)
        assert not reply.skipped and reply.language == "1.0"
        assert runner.batches == [[0.0], [1.0]] and scheduler.metrics.skipped_speculative == 1
