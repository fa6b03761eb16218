"""OpenAI's Realtime transcription API (streaming.openai_realtime) with OpenAI's own Python SDK against the real
server."""

from __future__ import annotations

import asyncio
import base64
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import own_protocol_wer, refused_handshake, speech_clip, word_error_rate

from streaming.engine import Engine
from streaming.server import Server, ServerConfig

if os.environ.get("CI") != "true":
    pytest.importorskip("openai", reason="openai is not installed (pip install -e '.[test]')")
from openai import AsyncOpenAI  # noqa: E402

pytestmark = pytest.mark.real_model

RATE = 24000
CHUNK = int(2 * RATE * 0.1)  # 100 ms
SESSION = {"type": "transcription",
           "audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE},
                               "transcription": {"model": "whisper-1", "language": "en"},
                               "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                                                  "silence_duration_ms": 500}}}}


def connect(server: Server) -> Any:
    """The SDK's Realtime connection, pointed at the server (it appends /realtime to the WebSocket base)."""
    client = AsyncOpenAI(api_key="any key", websocket_base_url=f"ws://127.0.0.1:{server.port}/v1")
    return client.realtime.connect(extra_query={"intent": "transcription"})


async def append(connection: Any, pcm: bytes, speed: float) -> None:
    for i in range(0, len(pcm), CHUNK):
        await connection.input_audio_buffer.append(audio=base64.b64encode(pcm[i:i + CHUNK]).decode())
        await asyncio.sleep(0.1 / speed)


def answered(events: list, audio_ms: float) -> bool:
    """Every item that speech started is completed, the last of them ending within a second of the audio's
    end (the commit ended it): on a busy machine decodes lag behind the audio, so silence proves nothing."""
    started = {e.item_id for e in events if e.type == "input_audio_buffer.speech_started"}
    completed = {e.item_id for e in events if e.type == "conversation.item.input_audio_transcription.completed"}
    ends = [e.audio_end_ms for e in events if e.type == "input_audio_buffer.speech_stopped"]
    return bool(ends) and max(ends) >= audio_ms - 1000 and started <= completed


async def test_a_speech_clip_is_transcribed_item_by_item(engine: Engine, shared_eval: Path) -> None:
    pcm, reference = speech_clip(shared_eval, RATE)
    async with Server(engine, ServerConfig(port=0)) as server:
        # The same 24 kHz audio through our own protocol, with the turn detection SESSION sets.
        own = await own_protocol_wer(server.port, pcm, RATE, reference, shared_eval, speed=2,
                                     start_options={"vad": {"endpoint_ms": 500, "pre_speech_pad_ms": 300}})
        async with connect(server) as connection:
            created = await connection.recv()
            await connection.session.update(session=SESSION)
            updated = await connection.recv()
            async def stream() -> None:
                await append(connection, pcm, speed=2)
                await connection.input_audio_buffer.commit()  # the last utterance ends with the audio

            sender = asyncio.create_task(stream())
            events = []
            async with asyncio.timeout(180):
                while not (sender.done() and answered(events, 1000 * len(pcm) / (2 * RATE))):
                    try:
                        events.append(await asyncio.wait_for(connection.recv(), 1))
                    except TimeoutError:
                        continue
            await sender
    assert created.type == "session.created" and created.session.type == "transcription"
    assert updated.type == "session.updated" and updated.session.audio.input.transcription.language == "en"
    items: dict[str, list[str]] = {}
    for event in events:
        if hasattr(event, "item_id"):
            items.setdefault(event.item_id, []).append(event.type.rsplit(".", 1)[-1])
    assert len(items) >= 2
    for kinds in items.values():  # each item: speech started, deltas, stopped, committed, completed
        assert kinds[0] == "speech_started" and kinds[-3:] == ["speech_stopped", "committed", "completed"], kinds
        assert set(kinds[1:-3]) == {"delta"}, kinds
    completed = [e for e in events if e.type == "conversation.item.input_audio_transcription.completed"]
    for event in completed:
        deltas = [e.delta for e in events if e.type.endswith(".delta") and e.item_id == event.item_id]
        assert "".join(deltas) == event.transcript and event.usage.type == "duration"
    committed = [e for e in events if e.type == "input_audio_buffer.committed"]
    assert [c.previous_item_id for c in committed] == [None] + [c.item_id for c in committed[:-1]]
    text = " ".join(e.transcript for e in completed)
    wer = word_error_rate(shared_eval, reference, text)
    print(f"OpenAI Realtime API: WER {wer:.3f} on the en_prompts head (own protocol: {own:.3f}): {text!r}")
    assert wer <= 0.15 and wer <= own + 0.01, text


async def test_bad_settings_get_openai_error_events(engine: Engine) -> None:
    async with Server(engine, ServerConfig(port=0)) as server, connect(server) as connection:
        await connection.recv()
        bad = ({"audio": {"input": {"format": {"type": "audio/pcmu"}}}}, "session.audio.input.format"),
        bad += ({"audio": {"input": {"transcription": {"language": "fr"}}}}, "session"),
        for settings, param in bad:
            await connection.session.update(session={"type": "transcription", **settings}, event_id="evt_1")
            error = await connection.recv()
            assert error.type == "error" and error.error.type == "invalid_request_error", error
            assert error.error.param == param and error.error.event_id == "evt_1" and error.error.message
        await connection.send({"type": "input_audio_buffer.append", "audio": "not base64!"})
        error = await connection.recv()
        assert error.type == "error" and error.error.param == "audio"
        await connection.input_audio_buffer.commit()
        assert (await connection.recv()).error.code == "input_audio_buffer_commit_empty"
        # The session goes on: the beta event names still work.
        await connection.send({"type": "transcription_session.update",
                               "session": {"input_audio_format": "pcm16", "turn_detection": None}})
        assert (await connection.recv()).type == "transcription_session.updated"
        # A session that is not transcription is refused at the handshake with OpenAI's error object.
        status, body = await asyncio.to_thread(refused_handshake,
                                               f"http://127.0.0.1:{server.port}/v1/realtime?model=gpt-realtime")
        assert status == 400 and body["error"]["code"] == "unsupported_intent" and body["error"]["param"] == "intent"


async def test_the_server_stays_healthy_after_a_client_leaves_mid_stream(engine: Engine, shared_eval: Path) -> None:
    pcm, _ = speech_clip(shared_eval, RATE)
    async with Server(engine, ServerConfig(port=0)) as server:
        async with connect(server) as connection:
            await append(connection, pcm[: 3 * 2 * RATE], speed=4)
        async with asyncio.timeout(10):
            while server.active_streams:
                await asyncio.sleep(0.05)
        async with connect(server) as connection:
            await connection.recv()
            await append(connection, pcm[: 8 * 2 * RATE], speed=4)
            await connection.input_audio_buffer.commit()
            async with asyncio.timeout(60):
                async for event in connection:
                    if event.type == "conversation.item.input_audio_transcription.completed":
                        break
        assert "thank you" in event.transcript.lower()
