"""Pipecat's stock DeepgramSTTService, pointed at the server by its ``base_url``, transcribes real speech (issue 18)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest

from streaming.audiofile import read_audio
from streaming.engine import Engine
from streaming.server import Server, ServerConfig

if os.environ.get("CI") != "true":
    pytest.importorskip("pipecat", reason="pipecat-ai is not installed (pip install -e '.[test]')")
from pipecat.frames.frames import (  # noqa: E402
    EndFrame,
    Frame,
    InputAudioRawFrame,
    TranscriptionFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineParams, PipelineWorker  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor  # noqa: E402
from pipecat.services.deepgram.stt import DeepgramSTTService  # noqa: E402
from pipecat.workers.runner import WorkerRunner  # noqa: E402

pytestmark = pytest.mark.real_model

SAMPLE_RATE = 16000
CLIP_SECONDS = 12.0  # the JFK clip at the head of en_mixed.wav (0.5 s to 11.5 s)
CHUNK_SECONDS = 0.02  # what a pipecat input transport hands on: 20 ms frames


class Transcripts(FrameProcessor):
    """The end of the pipeline: keeps the final transcripts the STT service pushed downstream."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []
        self.changed = asyncio.Event()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TranscriptionFrame):
            self.texts.append(frame.text)
            self.changed.set()
        await self.push_frame(frame, direction)

    def joined(self) -> str:
        return re.sub(r"[^\w' ]", "", " ".join(self.texts).lower())


def jfk_clip(shared_eval: Path) -> bytes:
    audio = read_audio(shared_eval / "streams" / "en_mixed.wav", SAMPLE_RATE)[: int(CLIP_SECONDS * SAMPLE_RATE)]
    return (np.clip(audio, -1, 1 - 2 ** -15) * 32768).astype("<i2").tobytes()


async def test_pipecat_deepgram_stt_service_transcribes_the_jfk_clip(engine: Engine, shared_eval: Path) -> None:
    pcm = jfk_clip(shared_eval)
    async with Server(engine, ServerConfig(port=0)) as server:
        stt = DeepgramSTTService(api_key="any key", base_url=f"http://127.0.0.1:{server.port}",
                                 sample_rate=SAMPLE_RATE)
        transcripts = Transcripts()
        worker = PipelineWorker(Pipeline([stt, transcripts]), params=PipelineParams(audio_in_sample_rate=SAMPLE_RATE),
                                enable_rtvi=False, check_dangling_tasks=False)
        runner = WorkerRunner(handle_sigint=False, check_dangling_tasks=False)
        await runner.add_workers(worker)
        running = asyncio.create_task(runner.run())
        started = time.monotonic()
        chunk = int(2 * SAMPLE_RATE * CHUNK_SECONDS)
        for n, i in enumerate(range(0, len(pcm), chunk)):  # real-time pace, as a microphone delivers it
            await worker.queue_frame(InputAudioRawFrame(audio=pcm[i:i + chunk], sample_rate=SAMPLE_RATE,
                                                        num_channels=1))
            await asyncio.sleep(max(0.0, started + (n + 1) * CHUNK_SECONDS - time.monotonic()))
        await worker.queue_frame(VADUserStoppedSpeakingFrame())  # pipecat then sends Deepgram's Finalize
        with contextlib.suppress(TimeoutError):  # a late or misheard last phrase fails on the assertion below
            async with asyncio.timeout(60):
                while "ask what you can do for your country" not in transcripts.joined():
                    transcripts.changed.clear()
                    await transcripts.changed.wait()
        await worker.queue_frame(EndFrame())
        async with asyncio.timeout(30):
            await running
    text = transcripts.joined()
    print(f"pipecat DeepgramSTTService: {transcripts.texts!r} ({time.monotonic() - started:.1f} s)")
    assert "fellow americans" in text and "ask not" in text, text
