"""Whole-file transcription for the REST adapters (:mod:`streaming.openai_audio`,
:mod:`streaming.deepgram_prerecorded`): the size-capped upload, its admission as one stream, decoding off the
event loop and the transcription on the server's scheduler (:class:`streaming.engine.transcribe.TranscribeRequest`).

Each request counts as one open stream from admission to its answer, so ``--max-streams``, the measured load,
``/healthz`` and draining treat uploads and live streams alike. A file occupies one inference worker while it
is transcribed; live streams' decodes run on the others and queue behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from aiohttp import BodyPartReader, web

from .audiofile import decode_audio
from .core.audio import SAMPLE_RATE, AudioFormatError
from .core.session import EngineInfo, Send, Session
from .engine.transcribe import Segment, TranscribeOptions, TranscribeRequest, Transcript
from .websocket import peer

if TYPE_CHECKING:
    from .server import Server

# The longest audio an upload may decode to: a small compressed file can expand to hours of samples.
MAX_AUDIO_SECONDS = 3 * 3600.0
READ_CHUNK = 1 << 16


class JobError(Exception):
    """A request the server cannot answer with a transcript: HTTP ``status``, a ``code`` for the API's error
    object, the ``message`` naming the cause and the fix, and the request ``param`` at fault if any."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param


def too_large(server: Server) -> JobError:
    mb = server.config.max_upload_mb
    return JobError(413, "file_too_large", f"the upload is larger than this server's limit of {mb:g} MB "
                                           "(--max-upload-mb); send a shorter or more compressed file", "file")


def check_length(server: Server, request: web.Request) -> None:
    """Refuse a body whose declared length is over ``--max-upload-mb`` before any of it is read."""
    if request.content_length is not None and request.content_length > server.config.max_upload_bytes:
        raise too_large(server)


async def read_capped(server: Server, reader: web.Request | BodyPartReader) -> bytes:
    """A request body or multipart part, refused with 413 as soon as it passes ``--max-upload-mb``."""
    limit, data = server.config.max_upload_bytes, bytearray()
    while True:
        chunk = await (reader.content.read(READ_CHUNK) if isinstance(reader, web.Request)
                       else reader.read_chunk(READ_CHUNK))
        if not chunk:
            return bytes(data)
        data += chunk
        if len(data) > limit:
            raise too_large(server)


def check_options(info: EngineInfo, language: str | None, task: str, prompt: str | None) -> str | None:
    """What the session's own checks say against these options (unknown language, English-only model...), or
    None."""
    start = {"type": "start", "language": language, "task": task, "prompt": prompt}
    for action in Session(info).receive(start):
        if isinstance(action, Send) and action.message["type"] == "error":
            return action.message["message"].removeprefix("bad start message: ")
    return None


@dataclass
class Job:
    """One admitted upload, as the server tracks it; it is never cut short by draining (the drain deadline
    cancels it)."""

    server: Server
    cancelled: threading.Event

    def drain(self) -> None:
        """An upload's answer is its whole transcript: it goes on until done or the drain deadline."""

    async def decode(self, data: bytes, name: str) -> np.ndarray:
        """The upload as 16 kHz mono float (decoded on a thread); 400 when it is not audio."""
        try:
            audio = await asyncio.to_thread(decode_audio, data, SAMPLE_RATE, name, MAX_AUDIO_SECONDS)
        except AudioFormatError as exc:
            raise JobError(400, "invalid_audio", str(exc), "file") from None
        self.server.metrics.add_audio(len(audio) / SAMPLE_RATE)
        return audio

    async def transcribe(self, audio: np.ndarray, options: TranscribeOptions,
                         on_segment: Callable[[Segment], None] | None = None, diarize: bool = False) -> Transcript:
        """``audio`` transcribed on the scheduler; ``on_segment`` is called on this event loop; ``diarize``
        labels every word's speaker."""
        loop = asyncio.get_running_loop()
        relay = None if on_segment is None else (lambda s: loop.call_soon_threadsafe(on_segment, s))
        try:
            return await self.server.scheduler.submit(TranscribeRequest(audio, options, relay, self.cancelled,
                                                                        diarize=diarize))
        except Exception as exc:
            raise JobError(500, "server_error", f"the transcription failed: {exc} (logged on the server)") from exc


@contextlib.asynccontextmanager
async def admitted(server: Server, request: web.Request) -> AsyncIterator[Job]:
    """Admit ``request`` as one stream for the body of the ``async with``, or raise :class:`JobError`: 429 at
    the stream limit, 503 when overloaded or draining."""
    reason = server.admit(peer(request))
    if reason is not None:
        code, message = reason
        raise JobError(429 if code == "capacity" else 503, code, message)
    task = asyncio.current_task()
    assert task is not None
    job = Job(server, threading.Event())
    server.open_stream(task, job)
    try:
        yield job
    finally:
        job.cancelled.set()  # a transcription still running (the client left) stops at its next window
        server.close_stream(task)
