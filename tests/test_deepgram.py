"""Deepgram's live-streaming API (streaming.deepgram) with Deepgram's own Python SDK against the real server."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import pytest
from conftest import own_protocol_wer, refused_handshake, speech_clip, word_error_rate

from streaming.engine import Engine
from streaming.server import Server, ServerConfig

if os.environ.get("CI") != "true":
    pytest.importorskip("deepgram", reason="deepgram-sdk is not installed (pip install -e '.[test]')")
from deepgram import AsyncDeepgramClient  # noqa: E402
from deepgram.core.api_error import ApiError  # noqa: E402
from deepgram.environment import DeepgramClientEnvironment  # noqa: E402

pytestmark = pytest.mark.real_model

CHUNK_SECONDS = 0.1


def client(server: Server) -> AsyncDeepgramClient:
    """The SDK pointed at the server by its base URL alone: it appends /v1/listen (and ws:// for live)."""
    base = f"127.0.0.1:{server.port}"
    environment = DeepgramClientEnvironment(base=f"http://{base}", production=f"ws://{base}", agent=f"ws://{base}",
                                            agent_rest=f"http://{base}")
    return AsyncDeepgramClient(api_key="any key", environment=environment)


async def send(socket, pcm: bytes, speed: float, sample_rate: int = 16000) -> None:
    chunk = int(2 * sample_rate * CHUNK_SECONDS)
    for i in range(0, len(pcm), chunk):
        await socket.send_media(pcm[i:i + chunk])
        await asyncio.sleep(CHUNK_SECONDS / speed)


async def test_a_speech_clip_is_transcribed_with_interim_and_final_results(engine: Engine,
                                                                          shared_eval: Path) -> None:
    pcm, reference = speech_clip(shared_eval, 16000)
    async with Server(engine, ServerConfig(port=0)) as server:
        async with client(server).listen.v1.connect(
                model="nova-3", encoding="linear16", sample_rate=16000, channels=1, language="en-US",
                interim_results="true", punctuate="true", smart_format="true", utterance_end_ms="1000",
                vad_events="true", endpointing="300") as socket:
            async def stream() -> None:
                await send(socket, pcm, speed=2)
                await socket.send_close_stream()

            sender = asyncio.create_task(stream())
            async with asyncio.timeout(120):
                messages = [m async for m in socket]
            await sender
        own = await own_protocol_wer(server.port, pcm, 16000, reference, shared_eval, speed=2)
    kinds = [m.type for m in messages]
    results = [m for m in messages if m.type == "Results"]
    finals = [m for m in results if m.is_final]
    assert kinds[-1] == "Metadata" and abs(messages[-1].duration - len(pcm) / 32000) < 0.01
    assert any(not m.is_final for m in results) and "UtteranceEnd" in kinds and "SpeechStarted" in kinds
    assert kinds.index("SpeechStarted") < kinds.index("Results")
    assert any(m.speech_final for m in finals)
    text = " ".join(m.channel.alternatives[0].transcript for m in finals)
    wer = word_error_rate(shared_eval, reference, text)
    print(f"Deepgram API: WER {wer:.3f} on the en_prompts head (own protocol: {own:.3f}): {text!r}")
    assert wer <= 0.15 and wer <= own + 0.01, text
    times = [(m.start, m.start + m.duration) for m in finals]
    assert times == sorted(times) and all(m.metadata.request_id == finals[0].metadata.request_id for m in finals)
    words = [w for m in finals for w in m.channel.alternatives[0].words]
    assert words and all(w.start <= w.end and 0 <= w.confidence <= 1 and w.punctuated_word for w in words)
    assert all(re.fullmatch(r"[\w']+", w.word) for w in words)


async def test_bad_parameters_are_refused_at_the_handshake_with_a_json_error(engine: Engine) -> None:
    async with Server(engine, ServerConfig(port=0)) as server:
        for params in ({"encoding": "opus"}, {"sample_rate": "fast"}, {"language": "fr"}, {"interim_results": "maybe"},
                       {"endpointing": "soon"}, {"channels": "0"}):
            with pytest.raises(ApiError) as refused:
                async with client(server).listen.v1.connect(model="nova-3", **params):
                    pass
            assert refused.value.status_code == 400, params
        # The body, as a client without the SDK reads it.
        status, body = await asyncio.to_thread(refused_handshake,
                                               f"http://127.0.0.1:{server.port}/v1/listen?encoding=opus")
        assert status == 400 and body["err_code"] == "INVALID_QUERY_PARAMETER" and "opus" in body["err_msg"]


async def test_the_server_stays_healthy_after_a_client_leaves_mid_stream(engine: Engine, shared_eval: Path) -> None:
    pcm, _ = speech_clip(shared_eval, 16000)
    async with Server(engine, ServerConfig(port=0)) as server:
        async with client(server).listen.v1.connect(model="nova-3", encoding="linear16", sample_rate=16000,
                                                    interim_results="true") as socket:
            await send(socket, pcm[: 3 * 32000], speed=4)
            await socket.send_keep_alive()
        async with asyncio.timeout(10):
            while server.active_streams:
                await asyncio.sleep(0.05)
        async with client(server).listen.v1.connect(model="nova-3", encoding="linear16",
                                                    sample_rate=16000) as socket:
            await send(socket, pcm[: 8 * 32000], speed=4)
            await socket.send_finalize()
            await socket.send_close_stream()
            messages = [m async for m in socket]
        assert [m.type for m in messages][-1] == "Metadata"
        finals = [m for m in messages if m.type == "Results"]
        assert finals and all(m.is_final for m in finals)  # interim_results defaults to false
        assert "thank you" in " ".join(m.channel.alternatives[0].transcript.lower() for m in finals)
