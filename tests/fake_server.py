"""A scripted protocol server for client tests: it plays the server side of docs/protocol.md from a script."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response


@dataclass(frozen=True)
class Close:
    """In a fake server's script: close the connection with ``code``."""

    code: int
    reason: str = ""


READY = {"type": "ready", "session_id": "fake0001", "model": "fake.en", "multilingual": False, "protocol": 1,
         "sample_rate": 16000, "encoding": "pcm_s16le", "channels": 1, "max_message_bytes": 1 << 20}
STARTED = {"type": "started", "sample_rate": 16000, "encoding": "pcm_s16le", "channels": 1, "language": "en"}


def word(text: str, start: float, end: float) -> dict:
    return {"word": text, "start": start, "end": end, "probability": 0.9}


FINALS = [
    {"type": "final", "segment": 0, "text": " And so my fellow Americans,", "start": 0.5, "end": 2.6,
     "words": [word(" And", 0.5, 0.7), word(" so", 0.7, 1.0), word(" my", 1.0, 1.9), word(" fellow", 1.9, 2.3),
               word(" Americans,", 2.3, 2.6)]},
    {"type": "final", "segment": 0, "text": " ask not what your country can do for you.", "start": 3.0,
     "end": 6.0, "words": [word(" ask", 3.0, 3.3), word(" not", 3.3, 3.6), word(" what", 3.6, 4.0),
                           word(" your", 4.0, 4.2), word(" country", 4.2, 4.8), word(" can", 4.8, 5.0),
                           word(" do", 5.0, 5.2), word(" for", 5.2, 5.5), word(" you.", 5.5, 6.0)]},
    {"type": "final", "segment": 1, "text": " Ask what you can do for your country.", "start": 7.0, "end": 10.9,
     "words": [word(" Ask", 7.0, 7.5), word(" what", 7.5, 8.0), word(" you", 8.0, 8.4), word(" can", 8.4, 8.8),
               word(" do", 8.8, 9.2), word(" for", 9.2, 9.6), word(" your", 9.6, 10.0),
               word(" country.", 10.0, 10.9)]},
]
SCRIPT = [
    {"type": "partial", "segment": 0, "revision": 1, "text": " And so my", "start": 0.5, "end": 1.9},
    FINALS[0],
    {"type": "partial", "segment": 0, "revision": 2, "text": " ask not", "start": 3.0, "end": 3.6},
    FINALS[1],
    {"type": "partial", "segment": 0, "revision": 3, "text": "", "start": 6.0, "end": 6.0},
    {"type": "utterance_end", "segment": 0, "end": 6.2},
    FINALS[2],
    {"type": "utterance_end", "segment": 1, "end": 11.2},
]
TEXT = "And so my fellow Americans, ask not what your country can do for you. Ask what you can do for your country."
DONE = {"type": "done", "reason": "stop", "audio_seconds": 1.0, "language": "en", "finals": 3, "partials": 3,
        "utterances": 2, "words": 22, "decodes": 4, "errors": 0, "elapsed": 0.1}


class FakeServer:
    """A protocol-v1 server that replays scripted messages and records what clients send.

    ``replies`` maps a trigger to the messages (or :class:`Close`) sent when it happens: ``connect``,
    ``start`` (the start message), ``audio`` (the first binary message) and ``stop``. With ``page``, plain
    HTTP GET / serves that file (like the real server serves the browser client).
    """

    def __init__(self, replies: dict[str, list] | None = None, token: str | None = None, page: Path | None = None):
        self.replies = {"connect": [READY], "start": [STARTED], "audio": [], "stop": [*SCRIPT, DONE, Close(1000)],
                        **(replies or {})}
        self.token, self.page = token, page
        self.requests: list[Request] = []
        self.texts: list[dict] = []
        self.audio = bytearray()
        self.audio_messages = 0
        self.url = ""

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[FakeServer]:
        async with serve(self._handle, "127.0.0.1", 0, process_request=self._process_request) as server:
            self.url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/stream"
            yield self

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        if url.path == "/" and self.page is not None:
            response = connection.respond(200, self.page.read_text(encoding="utf-8"))
            response.headers["Content-Type"] = "text/html; charset=utf-8"
            return response
        if url.path != "/v1/stream":
            return connection.respond(404, "not found\n")
        self.requests.append(request)
        given = request.headers.get("Authorization", "").removeprefix("Bearer ")
        given = given or parse_qs(url.query).get("token", [""])[0]
        if self.token is not None and given != self.token:
            return connection.respond(401, "unauthorized: send the token\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        closing = await self._reply(ws, "connect")
        async for message in ws:  # read until the connection is closed, as a real server does
            if closing:
                continue
            if isinstance(message, bytes):
                self.audio += message
                self.audio_messages += 1
                if self.audio_messages == 1:
                    closing = await self._reply(ws, "audio")
                continue
            text = json.loads(message)
            self.texts.append(text)
            if text["type"] in ("start", "stop"):
                closing = await self._reply(ws, text["type"])
        if closing:
            await closing

    async def _reply(self, ws: ServerConnection, trigger: str) -> asyncio.Task | None:
        """Send the script for ``trigger``; returns the closing handshake when it closes the connection."""
        for item in self.replies[trigger]:
            if isinstance(item, Close):
                return asyncio.create_task(ws.close(item.code, item.reason))
            await ws.send(json.dumps(item))
        return None






def write_wav(path: Path, audio: np.ndarray, rate: int = 16000) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def words_of(text: str) -> str:
    """Lower case, no punctuation: for comparing recognised text."""
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())
