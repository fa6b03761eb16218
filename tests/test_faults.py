"""Fault injection against the real server: inference failures inside a batch, and clients that vanish at
every point of the protocol. After each fault the server holds no stream, task or queued decode for it, and
other streams are unaffected."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import wave
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from streaming.engine import Engine, configure_threads, inference
from streaming.server import Server, ServerConfig

pytestmark = pytest.mark.real_model

CHUNK = 3200  # 100 ms of 16 kHz s16 PCM
JFK = 11.5 * 32000  # bytes of the JFK sentence at the start of en_mixed


@pytest.fixture(scope="module")
def engine() -> Engine:
    configure_threads(1)
    return Engine.load("tiny.en")


@pytest.fixture(scope="module")
def clip(shared_eval: Path) -> bytes:
    with wave.open(str(shared_eval / "streams" / "en_mixed.wav")) as w:
        return w.readframes(int(12 * 16000))


async def messages_until_close(ws, timeout: float = 120) -> list[dict]:
    out = []
    async with asyncio.timeout(timeout):
        with contextlib.suppress(ConnectionClosed):  # raised after an abnormal close code
            async for raw in ws:
                out.append(json.loads(raw))
    return out


async def stream(url: str, pcm: bytes, start: dict | None = None, speed: float = 20) -> tuple[list[dict], int]:
    """Send ``pcm`` at ``speed`` times real time, then stop; every reply and the close code (the server may
    end the stream early)."""
    async with connect(url) as ws:
        receiving = asyncio.create_task(messages_until_close(ws))
        with contextlib.suppress(ConnectionClosed):
            if start:
                await ws.send(json.dumps({"type": "start", **start}))
            for i in range(0, len(pcm), CHUNK):
                await ws.send(pcm[i:i + CHUNK])
                await asyncio.sleep(0.1 / speed)
            await ws.send('{"type": "stop"}')
        replies = await receiving
        return replies, ws.close_code


def transcript(replies: list[dict]) -> str:
    return "".join(m["text"] for m in replies if m["type"] == "final").lower()


async def settled(server: Server, tasks_before: int) -> None:
    """Wait until the server holds no stream, task or queued decode beyond the baseline; fail otherwise.
    (A decode queued by a stream that left stays queued until the worker reaches it and skips it.)"""
    for _ in range(400):
        if server.active_streams == 0 and len(asyncio.all_tasks()) <= tasks_before and not server._scheduler.queued:
            break
        await asyncio.sleep(0.05)
    assert server.active_streams == 0 and server.metrics.streams_active == 0
    assert len(asyncio.all_tasks()) <= tasks_before
    assert server._scheduler.queued == 0


async def still_serves(server: Server, clip: bytes) -> None:
    replies, close_code = await stream(server.url, clip[:int(JFK)], speed=40)
    assert close_code == 1000 and "fellow americans" in transcript(replies)


async def test_an_inference_fault_in_a_shared_batch_fails_only_the_stream_that_caused_it(
        engine: Engine, clip: bytes, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    prepare = inference._prepare

    def faulty(engine, requests, encoded):
        if any(request.initial_prompt == "poison" for request in requests):
            raise RuntimeError("injected model fault")
        return prepare(engine, requests, encoded)

    monkeypatch.setattr(inference, "_prepare", faulty)
    sizes: list[int] = []
    async with Server(engine, ServerConfig(port=0, max_wait_ms=300)) as server:
        observe = server.metrics.observe_batch
        server.metrics.observe_batch = lambda delays, busy, failures: sizes.append(len(delays)) or observe(
            delays, busy, failures)
        tasks_before = len(asyncio.all_tasks())
        healthy, poisoned = await asyncio.gather(
            stream(server.url, clip[:int(JFK)], speed=4),
            stream(server.url, clip[:int(JFK)], {"prompt": "poison"}, speed=4))
        assert max(sizes) > 1  # the two streams did share batches
        assert healthy[1] == 1000 and "fellow americans" in transcript(healthy[0])
        replies, close_code = poisoned
        assert close_code == 1011 and [m["code"] for m in replies if m["type"] == "error"] == ["internal"]
        assert "injected" not in json.dumps(replies)  # internals stay in the server's log
        assert server.metrics.request_failures >= 1
        await settled(server, tasks_before)
        await still_serves(server, clip)
    assert any("injected model fault" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


async def raw_handshake(port: int, request: bytes) -> None:
    """Open a TCP connection, send ``request`` (possibly a partial handshake) and vanish."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.transport.abort()


HANDSHAKE = (b"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


async def test_clients_that_vanish_at_every_point_of_the_protocol_leave_nothing_behind(
        engine: Engine, clip: bytes) -> None:
    fds_before = len(os.listdir("/proc/self/fd"))
    async with Server(engine, ServerConfig(port=0)) as server:
        tasks_before = len(asyncio.all_tasks())
        await raw_handshake(server.port, b"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpg")  # mid-handshake
        await raw_handshake(server.port, HANDSHAKE)  # upgraded, gone before reading `ready`
        await settled(server, tasks_before)

        async with connect(server.url) as ws:  # mid-audio
            for i in range(0, CHUNK * 20, CHUNK):
                await ws.send(clip[i:i + CHUNK])
            ws.transport.abort()
        await settled(server, tasks_before)

        release = threading.Event()
        running = threading.Event()
        runner = server._scheduler._runner

        def held(engine, requests):
            running.set()
            release.wait(30)
            return runner(engine, requests)

        server._scheduler._runner = held
        async with connect(server.url) as ws:  # mid-inference
            for i in range(0, CHUNK * 40, CHUNK):  # 4 s: under the 10 s backlog at which the server stops reading
                await ws.send(clip[i:i + CHUNK])
            assert await asyncio.to_thread(running.wait, 30)
            ws.transport.abort()
        await asyncio.sleep(0.2)
        release.set()
        await settled(server, tasks_before)
        server._scheduler._runner = runner

        async with connect(server.url) as ws:  # after stop, before done
            for i in range(0, int(JFK), CHUNK):
                await ws.send(clip[i:i + CHUNK])
            await ws.send('{"type": "stop"}')
            ws.transport.abort()
        await settled(server, tasks_before)
        await still_serves(server, clip)
        assert server.metrics.request_failures == 0
    assert not [t.name for t in threading.enumerate() if t.name.startswith("whisper-stream")]  # workers stopped
    assert len(os.listdir("/proc/self/fd")) <= fds_before + 1


async def test_a_decode_that_fails_to_deliver_is_logged_once_and_the_stream_still_ends(
        engine: Engine, clip: bytes, caplog: pytest.LogCaptureFixture) -> None:
    """A runner that breaks mid-batch (after some replies) fails the rest of that batch only."""
    caplog.set_level(logging.ERROR, logger="streaming")
    async with Server(engine, ServerConfig(port=0)) as server:
        runner = server._scheduler._runner
        calls = 0

        def flaky(engine, requests):
            nonlocal calls
            calls += 1
            if calls == 3:
                raise RuntimeError("worker fault")
            return runner(engine, requests)

        server._scheduler._runner = flaky
        replies, close_code = await stream(server.url, clip[:int(JFK)], speed=10)
        assert close_code == 1011 and [m["code"] for m in replies if m["type"] == "error"] == ["internal"]
        server._scheduler._runner = runner
        await still_serves(server, clip)
    assert sum("inference batch of" in r.getMessage() for r in caplog.records) == 1
