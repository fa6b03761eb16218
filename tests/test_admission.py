"""Admission from measured inference cost, and the bounded outbox of a client that does not read."""

from __future__ import annotations

import asyncio
import logging

import pytest

from streaming.admission import Admission
from streaming.core.session import Close, Send
from streaming.server import RefusalLog
from streaming.websocket import LAG_MESSAGES, MAX_OUTBOX, _Outbox


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run_streams(admission: Admission, clock: Clock, streams: int, seconds: int, busy_per_stream: float) -> None:
    """``streams`` open streams for ``seconds``, each costing ``busy_per_stream`` worker-seconds a second."""
    admission.set_streams(streams)
    for _ in range(seconds):
        clock.now += 1
        admission.record_busy(streams * busy_per_stream)


def test_a_cold_server_admits_until_it_has_measured() -> None:
    clock = Clock()
    admission = Admission(workers=1, target=0.8, clock=clock)
    assert admission.cost is None and admission.admits(0) and admission.admits(50)
    run_streams(admission, clock, 2, 2, 0.3)  # 4 stream-seconds: not enough to measure
    assert admission.cost is None and admission.admits(2)


def test_refuses_the_stream_that_would_exceed_the_target() -> None:
    clock = Clock()
    admission = Admission(workers=2, target=0.8, clock=clock)
    run_streams(admission, clock, 3, 10, 0.25)
    assert admission.cost == pytest.approx(0.25)
    assert admission.utilization(3) == pytest.approx(0.375)
    assert admission.admits(5)  # 6 streams: 6 x 0.25 / 2 = 0.75
    assert not admission.admits(6)  # 7 streams: 0.875
    assert admission.admits(0)  # an idle server always takes one stream


def test_the_estimate_follows_the_load_and_survives_idle_time() -> None:
    clock = Clock()
    admission = Admission(workers=1, target=0.8, window=30, clock=clock)
    run_streams(admission, clock, 2, 30, 0.4)
    assert not admission.admits(2)
    run_streams(admission, clock, 4, 40, 0.1)  # cheaper streams (e.g. mostly silence): the old window is gone
    assert admission.cost == pytest.approx(0.1) and admission.admits(6) and not admission.admits(8)
    run_streams(admission, clock, 0, 100, 0.0)  # idle: nothing to measure, the last estimate stands
    assert admission.cost == pytest.approx(0.1)


def test_disabled_admission_admits_everything() -> None:
    clock = Clock()
    admission = Admission(workers=1, target=0.5, clock=clock, enabled=False)
    run_streams(admission, clock, 4, 10, 0.5)
    assert admission.utilization(5) == pytest.approx(2.5) and admission.admits(40)


def test_refusals_are_logged_once_per_interval_per_code_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    refusals = RefusalLog(interval=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="streaming.server"):
        for _ in range(50):  # a load balancer retrying for 5 s
            refusals.refused("overloaded", "8 open")
            clock.now += 0.1
        refusals.refused("capacity", "all 8 streams busy")
        clock.now += 6
        refusals.refused("overloaded", "7 open")
    assert [r.getMessage() for r in caplog.records] == [
        "refused a stream (overloaded): 8 open",
        "refused a stream (capacity): all 8 streams busy",
        "refused a stream (overloaded): 7 open (49 more refused since the last report)",
    ]


def test_invalid_target() -> None:
    with pytest.raises(ValueError, match="target utilization 0 is out of range"):
        Admission(target=0)


def partial(n: int) -> Send:
    return Send({"type": "partial", "segment": 0, "revision": n, "text": f"p{n}", "start": 0.0, "end": 1.0})


def final(n: int) -> Send:
    return Send({"type": "final", "segment": n, "text": f"f{n}", "start": 0.0, "end": 1.0, "words": []})


async def drain(outbox: _Outbox) -> list[dict | int]:
    items = []
    while len(outbox):
        action = await outbox.get()
        items.append(action.message if isinstance(action, Send) else action.code)
    return items


async def test_outbox_keeps_everything_while_the_client_keeps_up() -> None:
    outbox = _Outbox()
    for n in range(LAG_MESSAGES):
        outbox.put(partial(n) if n % 2 else final(n))
    assert [m["text"] for m in await drain(outbox)] == [f"{'p' if n % 2 else 'f'}{n}" for n in range(LAG_MESSAGES)]
    assert outbox.dropped == 0


async def test_a_lagging_client_loses_old_partials_never_finals_and_is_warned_once() -> None:
    outbox = _Outbox()
    for n in range(200):
        outbox.put(final(n) if n % 10 == 0 else partial(n))
    outbox.put(Close(1000, "stop"))
    items = await drain(outbox)
    assert [m["text"] for m in items if isinstance(m, dict) and m["type"] == "final"] == [f"f{n}" for n in
                                                                                        range(0, 200, 10)]
    warnings = [m for m in items if isinstance(m, dict) and m["type"] == "warning"]
    assert [w["code"] for w in warnings] == ["client_lagging"] and "finals never are" in warnings[0]["message"]
    partials = [m["text"] for m in items if isinstance(m, dict) and m["type"] == "partial"]
    assert partials[-1] == "p199" and len(partials) < 40 and outbox.dropped == 180 - len(partials)
    assert items[-1] == 1000 and len(outbox) == 0


async def test_outbox_fills_up_with_finals_only_and_get_waits_for_work() -> None:
    outbox = _Outbox()
    for n in range(MAX_OUTBOX):
        outbox.put(final(n))
    assert outbox.full and outbox.dropped == 0
    getter = asyncio.create_task(drain(outbox))
    assert len(await getter) == MAX_OUTBOX and not outbox.full
    waiting = asyncio.create_task(outbox.get())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    outbox.put(final(1))
    assert (await asyncio.wait_for(waiting, 1)).message["text"] == "f1"
