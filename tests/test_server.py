"""End-to-end tests of the WebSocket server with the real tiny.en model on free loopback ports."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import urllib.error
import urllib.request
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streaming.engine import Engine, configure_threads
from streaming.server import Server, ServerConfig
from streaming.testing import ServerProcess

pytestmark = pytest.mark.real_model

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "protocol.md"
CHUNK = 3200  # 100 ms of 16 kHz s16 mono
JFK_SECONDS = 12.0


def doc_examples() -> dict[str, dict]:
    found = re.findall(r"<!-- example: (\w+) -->\s*```json\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    return {name: json.loads(body) for name, body in found}


@pytest.fixture(scope="module")
def engine() -> Engine:
    threads = torch.get_num_threads()
    configure_threads(1)
    yield Engine.load("tiny.en")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clip(shared_eval: Path) -> bytes:
    """en_mixed.wav as raw 16 kHz mono s16 PCM (45.6 s; the JFK sentence ends at 11.5 s)."""
    with wave.open(str(shared_eval / "streams" / "en_mixed.wav")) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        return w.readframes(w.getnframes())


@contextlib.asynccontextmanager
async def serving(engine: Engine, **settings) -> AsyncIterator[Server]:
    async with Server(engine, ServerConfig(port=0, **settings)) as server:
        yield server


async def send_audio(ws: ClientConnection, pcm: bytes, speed: float = 10.0) -> None:
    """Send PCM in 100 ms chunks at ``speed`` times real time."""
    for i in range(0, len(pcm), CHUNK):
        await ws.send(pcm[i:i + CHUNK])
        await asyncio.sleep(0.1 / speed)


async def receive_all(ws: ClientConnection, timeout: float = 120) -> list[dict]:
    """Every message until the server closes the connection."""
    messages = []
    async with asyncio.timeout(timeout):
        with contextlib.suppress(ConnectionClosed):
            while True:
                messages.append(json.loads(await ws.recv()))
    return messages


async def receive(ws: ClientConnection, kind: str, timeout: float = 30) -> dict:
    async with asyncio.timeout(timeout):
        while True:
            message = json.loads(await ws.recv())
            if message["type"] == kind:
                return message


def finals_text(messages: list[dict]) -> str:
    """The transcript in lower case without punctuation."""
    text = "".join(m["text"] for m in messages if m["type"] == "final").lower()
    return " ".join(re.sub(r"[^\w\s']", " ", text).split())


def http_get(url: str, headers: dict | None = None) -> tuple[int, dict, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


# --- transcription -----------------------------------------------------------------------------------


async def test_stream_a_real_clip_with_the_documented_messages(engine: Engine, clip: bytes) -> None:
    examples = doc_examples()
    async with serving(engine) as server, connect(server.url) as ws:
        ready = json.loads(await ws.recv())
        assert set(ready) == set(examples["ready"]) and ready["model"] == "tiny.en"
        await ws.send(json.dumps(examples["start"]))
        receiver = asyncio.create_task(receive_all(ws))
        # Twice real time: at ten times, on a busy machine, the first words ("And so, my fellow Americans")
        # were sometimes lost (a known defect, being looked into; JOURNAL 2026-12-03).
        await send_audio(ws, clip, speed=2.0)
        await ws.send(json.dumps(examples["finalize"]))
        await ws.send(json.dumps(examples["stop"]))
        messages = await receiver
        assert ws.close_code == 1000
    assert set(messages[0]) == set(examples["started"])
    for message in messages:
        assert set(message) == set(examples[message["type"]]), message
    assert messages[-1]["type"] == "done"
    text = finals_text(messages)
    for phrase in ("fellow americans", "ask not what your country", "fail better", "forward", "forever"):
        assert phrase in text, (phrase, text)
    finals = [m for m in messages if m["type"] == "final"]
    assert [m["start"] for m in finals] == sorted(m["start"] for m in finals)
    assert all(0 <= m["start"] <= m["end"] <= 45.6 for m in finals)
    assert [m["segment"] for m in finals] == sorted(m["segment"] for m in finals)
    done = messages[-1]
    assert done["reason"] == "stop" and done["audio_seconds"] == pytest.approx(len(clip) / 32000, abs=0.01)
    assert done["finals"] == len(finals) and done["errors"] == 0
    assert done["utterances"] == sum(m["type"] == "utterance_end" for m in messages)
    assert done["partials"] == sum(m["type"] == "partial" for m in messages)
    assert done["words"] == sum(len(m["words"]) for m in finals)
    metrics = server.metrics
    assert metrics.audio_seconds == pytest.approx(45.6, abs=0.1) and metrics.requests == done["decodes"]


async def test_a_vanished_client_frees_its_stream_while_another_gets_its_transcript(
        engine: Engine, clip: bytes, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="streaming")
    async with serving(engine) as server:
        async with connect(server.url) as keeper, connect(server.url) as leaver:
            await receive(keeper, "ready")
            await receive(leaver, "ready")
            leaving = asyncio.create_task(send_audio(leaver, clip[:CHUNK * 80], speed=20))
            keeping = asyncio.create_task(send_audio(keeper, clip[:int(JFK_SECONDS * 32000)]))
            await receive(leaver, "final", timeout=30)
            await leaving
            leaver.transport.abort()  # gone without stop or close handshake
            await keeping
            await keeper.send('{"type": "stop"}')
            messages = await receive_all(keeper)
        assert "fellow americans" in finals_text(messages)
        assert messages[-1]["type"] == "done"
        for _ in range(100):
            if server.active_streams == 0:
                break
            await asyncio.sleep(0.05)
        assert server.active_streams == 0 and server.metrics.streams_active == 0
        assert server.metrics.request_failures == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("client left" in r.getMessage() for r in caplog.records)


# --- bad input ---------------------------------------------------------------------------------------


async def run_session(server: Server, *messages: str | bytes, stop: bool = True) -> tuple[list[dict], int | None]:
    """Send ``messages`` after ``ready`` (then stop), return what came back and the close code."""
    async with connect(server.url) as ws:
        assert json.loads(await ws.recv())["type"] == "ready"
        for message in messages:
            await ws.send(message)
        if stop:
            with contextlib.suppress(ConnectionClosed):
                await ws.send('{"type": "stop"}')
        replies = await receive_all(ws, timeout=60)
    return replies, ws.close_code


def codes(messages: list[dict]) -> list[str]:
    return [m["code"] for m in messages if m["type"] == "error"]


@pytest.mark.parametrize("message, code", [
    ("{not json", "bad_json"),
    ('["start"]', "bad_json"),
    ('{"type": "pause"}', "unknown_type"),
    (b"\x00\x01\x02", "bad_audio"),
])
async def test_recoverable_errors_keep_the_stream(engine: Engine, message: str | bytes, code: str) -> None:
    async with serving(engine) as server:
        replies, close_code = await run_session(server, message)
    assert codes(replies) == [code] and close_code == 1000
    assert replies[-1]["type"] == "done" and replies[-1]["errors"] == 1
    assert server.metrics.errors[code] == 1


@pytest.mark.parametrize("start, code, close_code, needle", [
    ({"sample_rate": "16000"}, "bad_start", 1008, "sample_rate must be an integer"),
    ({"interim_results": "yes"}, "bad_start", 1008, "interim_results must be true or false"),
    ({"vad": {"aggressiveness": 9}}, "bad_start", 1008, "aggressiveness=9 is out of range"),
    ({"language": "fr"}, "bad_start", 1008, "English-only"),
    ({"colour": "blue"}, "bad_start", 1008, "unknown field 'colour'"),
    ({"sample_rate": 4000}, "unsupported_format", 1003, "unsupported sample rate"),
    ({"encoding": "mp3"}, "unsupported_format", 1003, "unsupported encoding"),
    ({"channels": 12}, "unsupported_format", 1003, "unsupported channel count"),
])
async def test_bad_start_messages_close_the_stream(engine: Engine, start: dict, code: str, close_code: int,
                                                   needle: str) -> None:
    async with serving(engine) as server:
        replies, closed_with = await run_session(server, json.dumps({"type": "start", **start}), stop=False)
    assert codes(replies) == [code] and needle in replies[0]["message"]
    assert [m["type"] for m in replies] == ["error", "done"] and closed_with == close_code


async def test_start_after_audio_is_too_late_and_the_audio_is_still_transcribed(engine: Engine, clip: bytes) -> None:
    async with serving(engine) as server, connect(server.url) as ws:
        await receive(ws, "ready")
        await send_audio(ws, clip[:int(JFK_SECONDS * 32000)], speed=20)
        await ws.send('{"type": "start"}')
        replies = await receive_all(ws)
        assert ws.close_code == 1008
    assert codes(replies) == ["start_too_late"]
    assert "fellow americans" in finals_text(replies)
    assert replies[-1]["type"] == "done" and replies[-1]["reason"] == "start_too_late"


async def test_oversize_messages(engine: Engine) -> None:
    async with serving(engine, max_message_bytes=4096) as server:
        replies, close_code = await run_session(server, bytes(4096), bytes(4098), stop=False)
        assert codes(replies) == ["frame_too_large"] and close_code == 1008
        assert "4098 bytes exceeds the 4096-byte limit" in replies[1]["message"]
        replies, close_code = await run_session(server, bytes(3 * 4096), stop=False)
        assert replies == [] and close_code == 1009  # beyond twice the limit: the WebSocket layer cuts it off


async def test_text_and_audio_after_stop(engine: Engine, clip: bytes) -> None:
    async with serving(engine) as server, connect(server.url) as ws:
        await receive(ws, "ready")
        await send_audio(ws, clip[:CHUNK * 30], speed=50)
        await ws.send('{"type": "stop"}')
        await ws.send(clip[:CHUNK])
        await ws.send(clip[:CHUNK])
        await ws.send('{"type": "finalize"}')
        replies = await receive_all(ws)
        assert ws.close_code == 1000
    assert codes(replies) == ["audio_after_stop", "unexpected_text"]
    assert replies[-1]["type"] == "done" and replies[-1]["audio_seconds"] == pytest.approx(3.0)


async def test_idle_timeout(engine: Engine, clip: bytes) -> None:
    async with serving(engine, idle_timeout=0.5) as server, connect(server.url) as ws:
        await receive(ws, "ready")
        await send_audio(ws, clip[:CHUNK * 30], speed=50)
        replies = await receive_all(ws, timeout=30)
        assert ws.close_code == 1001
    assert codes(replies) == ["idle_timeout"]
    assert replies[-1]["type"] == "done" and replies[-1]["reason"] == "idle_timeout"
    assert "fellow" in finals_text(replies)


async def refused_handshake(server: Server) -> dict:
    """Open a stream that the server must refuse with HTTP 503 before the upgrade; its JSON error."""
    with pytest.raises(InvalidStatus) as info:
        async with connect(server.url):
            pass
    response = info.value.response
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    assert response.headers["Content-Type"] == "application/json"
    return json.loads(response.body)


async def test_capacity(engine: Engine) -> None:
    async with serving(engine, max_streams=1) as server, connect(server.url) as first:
        await receive(first, "ready")
        status, _, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{server.port}/healthz")
        assert status == 503 and json.loads(body)["status"] == "full"
        refusal = await refused_handshake(server)
        assert refusal["type"] == "error" and refusal["code"] == "capacity" and "limit of 1" in refusal["message"]
        await first.send('{"type": "stop"}')
        assert (await receive_all(first))[-1]["type"] == "done"
        assert server.metrics.errors["capacity"] == 1


async def test_a_stream_beyond_the_measured_capacity_is_refused_as_overloaded(engine: Engine, clip: bytes) -> None:
    async with serving(engine, max_utilization=0.001) as server, connect(server.url) as first:
        await receive(first, "ready")
        await send_audio(first, clip[:int(JFK_SECONDS * 32000)], speed=1.5)  # > 5 s of stream time measured
        assert server.admission.cost is not None and server.admission.cost > 0
        status, _, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{server.port}/healthz")
        assert status == 503 and json.loads(body)["status"] == "full"
        refusal = await refused_handshake(server)
        assert refusal["code"] == "overloaded" and "retry later" in refusal["message"]
        await first.send('{"type": "stop"}')
        messages = await receive_all(first)
        assert messages[-1]["type"] == "done" and "fellow americans" in finals_text(messages)
        assert server.metrics.errors["overloaded"] == 1


async def test_audio_far_faster_than_real_time_is_paused_with_a_warning_and_fully_transcribed(
        engine: Engine, clip: bytes) -> None:
    async with serving(engine) as server, connect(server.url) as ws:
        await receive(ws, "ready")
        for i in range(0, len(clip), CHUNK):  # 45 s of audio at once
            await ws.send(clip[i:i + CHUNK])
        await ws.send('{"type": "stop"}')
        messages = await receive_all(ws)
    warnings = [m for m in messages if m["type"] == "warning"]
    assert [w["code"] for w in warnings] == ["audio_backlog"] and "real time" in warnings[0]["message"]
    assert set(warnings[0]) == set(doc_examples()["warning"])
    done = messages[-1]
    assert done["type"] == "done" and done["audio_seconds"] == pytest.approx(45.6, abs=0.1)
    assert "fellow americans" in finals_text(messages) and "north wind" in finals_text(messages)


async def test_token_auth(engine: Engine) -> None:
    async with serving(engine, token="s3cret") as server:
        for url, headers in ((server.url, {}), (server.url, {"Authorization": "Bearer wrong"}),
                             (server.url + "?token=s3cre", {})):
            with pytest.raises(InvalidStatus) as info:
                async with connect(url, additional_headers=headers):
                    pass
            assert info.value.response.status_code == 401
            assert b"ready" not in info.value.response.body and b"Bearer" in info.value.response.body
        for url, headers in ((server.url, {"Authorization": "Bearer s3cret"}), (server.url + "?token=s3cret", {})):
            async with connect(url, additional_headers=headers) as ws:
                assert (await receive(ws, "ready"))["protocol"] == 1
        base = f"http://127.0.0.1:{server.port}"
        status, headers, _ = await asyncio.to_thread(http_get, base + "/metrics")
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
        status, _, _ = await asyncio.to_thread(http_get, base + "/metrics", {"Authorization": "Bearer s3cret"})
        assert status == 200
        assert server.metrics.errors["unauthorized"] == 4


async def test_allowed_origins(engine: Engine) -> None:
    async with serving(engine, allow_origins=("https://good.example",)) as server:
        with pytest.raises(InvalidStatus) as info:
            async with connect(server.url, origin="https://evil.example"):
                pass
        assert info.value.response.status_code == 403
        for origin in ("https://good.example", None):
            async with connect(server.url, origin=origin) as ws:
                await receive(ws, "ready")


async def test_internal_errors_close_1011_for_that_stream_only(engine: Engine, clip: bytes,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from streaming.core.session import Session

    original = Session.receive_text

    def broken(self: Session, text: str) -> list:
        if "explode" in text:
            raise RuntimeError("handler bug")
        return original(self, text)

    monkeypatch.setattr(Session, "receive_text", broken)
    async with serving(engine) as server:
        replies, close_code = await run_session(server, '{"type": "explode"}', stop=False)
        assert codes(replies) == ["internal"] and close_code == 1011
        server._scheduler._runner = lambda engine, requests: [RuntimeError("model bug") for _ in requests]
        replies, close_code = await run_session(server, clip[:CHUNK * 30], stop=True)
        assert codes(replies) == ["internal"] and close_code == 1011
        assert "bug" not in json.dumps(replies)
        status, _, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{server.port}/healthz")
        assert status == 200 and json.loads(body)["active_streams"] == 0


# --- HTTP --------------------------------------------------------------------------------------------


async def test_http_endpoints(engine: Engine) -> None:
    async with serving(engine, max_streams=3) as server, connect(server.url) as ws:
        await receive(ws, "ready")
        base = f"http://127.0.0.1:{server.port}"
        status, headers, body = await asyncio.to_thread(http_get, base + "/healthz")
        health = json.loads(body)
        assert status == 200 and headers["Content-Type"] == "application/json"
        assert set(health) == set(doc_examples()["healthz"])
        assert health == {"status": "ok", "model": "tiny.en", "active_streams": 1, "capacity": 3}
        status, headers, body = await asyncio.to_thread(http_get, base + "/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
        for name in ("whisper_stream_streams_active 1.0", "whisper_stream_audio_seconds_total",
                     'whisper_stream_batch_size_bucket{le="+Inf"}', "whisper_stream_queue_delay_seconds_count",
                     "whisper_stream_real_time_factor", "whisper_stream_streams_capacity 3.0",
                     "process_resident_memory_bytes",
                     "# TYPE whisper_stream_shed_decodes_total counter",
                     "# TYPE whisper_stream_errors_total counter"):
            assert name in body, name
        status, headers, body = await asyncio.to_thread(http_get, base + "/")
        assert status == 200 and headers["Content-Type"].startswith("text/html") and "<html" in body.lower()
        status, _, body = await asyncio.to_thread(http_get, base + "/livez")
        assert status == 200 and json.loads(body) == {"status": "alive"}
        status, _, body = await asyncio.to_thread(http_get, base + "/nope")
        assert status == 404 and "/v1/stream" in body


async def test_drain_finishes_open_streams_and_refuses_new_ones(engine: Engine, clip: bytes) -> None:
    async with serving(engine) as server, connect(server.url) as ws:
        await receive(ws, "ready")
        await send_audio(ws, clip[:int(JFK_SECONDS * 32000)], speed=40)
        draining = asyncio.create_task(server.drain(30))
        await asyncio.sleep(0)
        status, _, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{server.port}/healthz")
        assert status == 503 and json.loads(body)["status"] == "draining"
        status, _, _ = await asyncio.to_thread(http_get, f"http://127.0.0.1:{server.port}/livez")
        assert status == 200
        assert (await refused_handshake(server))["code"] == "draining"
        replies = await receive_all(ws)
        assert ws.close_code == 1001 and await draining
    assert "fellow americans" in finals_text(replies)
    assert replies[-1]["type"] == "done" and replies[-1]["reason"] == "shutdown"


@pytest.mark.parametrize("workers", ["--worker-processes", "--no-worker-processes"])
def test_sigterm_drains_a_subprocess_server_and_exits_0(clip: bytes, workers: str, tmp_path: Path) -> None:
    server = ServerProcess(["--threads", "1", "--drain-seconds", "60", "--device", "cpu", "--workers", "2", workers],
                           tmp_path / "serve.log", cwd=REPO)
    try:
        children = re.findall(r"\d+", "".join(re.findall(r"inference processes \(pids ([\d ]+)\)",
                                                         server.log_text())))

        async def client() -> list[dict]:
            async with connect(server.url) as ws:
                await receive(ws, "ready")
                await send_audio(ws, clip[:int(JFK_SECONDS * 32000)], speed=40)
                server.process.send_signal(signal.SIGTERM)
                return await receive_all(ws, timeout=60)

        replies = asyncio.run(client())
        assert server.process.wait(timeout=60) == 0
        log = server.log_text()
    finally:
        server.stop()
    assert "fellow americans" in finals_text(replies), log
    assert replies[-1]["type"] == "done" and replies[-1]["reason"] == "shutdown"
    assert "draining 1 open stream(s)" in log and "stopped" in log
    assert len(children) == (2 if workers == "--worker-processes" else 0), log
    assert not [pid for pid in children if os.path.exists(f"/proc/{pid}")], "an inference process outlived the server"

