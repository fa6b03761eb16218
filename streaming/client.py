"""A small asyncio client for the streaming protocol: send audio, collect the transcript.

>>> transcript = asyncio.run(stream_audio("ws://127.0.0.1:8765/v1/stream", read_audio("talk.wav"), speed=0))
>>> print(transcript.render("srt"))
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from .core.agreement import SENTENCE_END
from .core.audio import SAMPLE_RATE, to_pcm16
from .formats import Cue, render

PROTOCOL_VERSION = 1
DEFAULT_URL = "ws://127.0.0.1:8765/v1/stream"
MAX_CUE_SECONDS = 7.0  # a caption cue ends at a sentence end, an utterance end, or after this long
_SAMPLE_BYTES = {"pcm_s16le": 2, "pcm_f32le": 4}

Audio = np.ndarray | Iterable[bytes] | AsyncIterable[bytes]
EventHandler = Callable[[dict[str, Any]], None]


class ClientError(Exception):
    """The stream failed; the message names the cause and the fix. ``code`` is the server's error code
    (or None), ``transcript`` what arrived before the failure."""

    def __init__(self, message: str, code: str | None = None, transcript: Transcript | None = None):
        super().__init__(message)
        self.code = code
        self.transcript = transcript


@dataclass
class Transcript:
    """What a stream produced: its ``final`` messages in order, non-fatal ``error`` messages and ``done``."""

    session_id: str | None = None
    model: str | None = None
    language: str | None = None
    finals: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    done: dict[str, Any] | None = None

    @property
    def text(self) -> str:
        """The finals concatenated: the whole transcript as one string."""
        return "".join(f["text"] for f in self.finals).strip()

    def cues(self) -> list[Cue]:
        """Finals grouped into caption cues: a cue ends with its utterance, a sentence or ``MAX_CUE_SECONDS``."""
        cues: list[Cue] = []
        segment: int | None = None
        for final in self.finals:
            last = cues[-1] if cues else None
            if (last is None or final.get("segment") != segment or last.text.rstrip().endswith(SENTENCE_END)
                    or last.end - last.start >= MAX_CUE_SECONDS):
                cues.append(Cue(final["start"], final["end"], final["text"], list(final.get("words", []))))
            else:
                last.end, last.text = final["end"], last.text + final["text"]
                last.words = [*last.words, *final.get("words", [])]
            segment = final.get("segment")
        return cues

    def render(self, fmt: str) -> str:
        """The transcript as ``txt``, ``srt``, ``vtt`` or ``json`` (see :mod:`streaming.formats`)."""
        return render(self.cues(), fmt, self.language)


def pcm_chunks(audio: np.ndarray, chunk_ms: float = 20) -> Iterator[bytes]:
    """16 kHz float audio in [-1, 1] as little-endian int16 chunks of ``chunk_ms`` milliseconds."""
    pcm = to_pcm16(audio)
    step = 2 * max(1, round(SAMPLE_RATE * chunk_ms / 1000))
    for i in range(0, len(pcm), step):
        yield pcm[i : i + step]


async def stream_audio(url: str, audio: Audio, *, speed: float = 1.0, chunk_ms: float = 20, token: str | None = None,
                       start_options: dict[str, Any] | None = None, on_event: EventHandler | None = None,
                       open_timeout: float = 10.0) -> Transcript:
    """Stream ``audio`` to the server at ``url`` and return the transcript once the server is ``done``.

    ``audio`` is 16 kHz mono float32 (sent as ``pcm_s16le`` in ``chunk_ms`` chunks), or raw PCM chunks
    (sync or async iterable of bytes) in the format ``start_options`` declares (default: 16 kHz s16le mono).
    ``speed`` paces the sending: 1 is real time, 2 twice as fast, 0 as fast as possible (use 0 for a live
    source, which paces itself). ``on_event`` sees every server message. Raises :class:`ClientError`.
    """
    if speed < 0:
        raise ValueError(f"speed={speed} is invalid: use 1 for real time, N for N times faster, 0 for no pacing")
    options = {"sample_rate": SAMPLE_RATE, "encoding": "pcm_s16le", "channels": 1, **(start_options or {})}
    if isinstance(audio, np.ndarray):
        if (options["sample_rate"], options["encoding"], options["channels"]) != (SAMPLE_RATE, "pcm_s16le", 1):
            raise ValueError("an audio array is sent as 16 kHz pcm_s16le mono: drop sample_rate, encoding and "
                             "channels from start_options, or pass PCM chunks in that format instead")
        audio = pcm_chunks(audio, chunk_ms)
    if options["encoding"] not in _SAMPLE_BYTES:
        raise ValueError(f"encoding {options['encoding']!r} is not supported: use one of {', '.join(_SAMPLE_BYTES)}")
    bytes_per_second = options["sample_rate"] * options["channels"] * _SAMPLE_BYTES[options["encoding"]]

    transcript = Transcript()
    ws = await _connect(url, token, open_timeout)
    async with ws:
        ready = asyncio.Event()
        sender = asyncio.create_task(_send(ws, audio, options, bytes_per_second * speed, ready, open_timeout))
        receiver = asyncio.create_task(_receive(ws, transcript, ready, on_event))
        try:
            done, _ = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
            if sender in done and sender.exception() is None:
                await receiver  # all audio sent: wait for the last results
        finally:
            for task in (sender, receiver):
                task.cancel()
            await asyncio.gather(sender, receiver, return_exceptions=True)
        for task in (receiver, sender):  # the server's verdict first, then a failing audio source
            error = None if task.cancelled() else task.exception()
            if error is not None:
                raise error
    _check_outcome(ws, transcript)
    return transcript


async def _connect(url: str, token: str | None, open_timeout: float) -> ClientConnection:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return await connect(url, additional_headers=headers, open_timeout=open_timeout, compression=None)
    except InvalidURI as exc:
        raise ClientError(f"invalid server URL {url!r} ({exc}); use e.g. {DEFAULT_URL}") from None
    except InvalidStatus as exc:
        status, body = exc.response.status_code, exc.response.body or b""
        refusal = _json_error(body)
        if refusal is not None:  # 503: draining, capacity or overloaded
            raise ClientError(f"{url} refused the stream (HTTP {status} {refusal['code']}): {refusal['message']}",
                              code=refusal["code"]) from None
        raise ClientError(_refusal_message(url, status, body, token), code=str(status)) from None
    except InvalidHandshake as exc:
        raise ClientError(f"{url} did not accept a WebSocket connection ({exc}); check the URL") from None
    except (TimeoutError, asyncio.TimeoutError):
        raise ClientError(f"cannot connect to {url}: no answer within {open_timeout:g} s; check the host and port "
                          "and that the server is running") from None
    except socket.gaierror as exc:
        raise ClientError(f"cannot connect to {url}: unknown host ({exc.strerror}); check the host name") from None
    except OSError as exc:
        cause = "connection refused" if isinstance(exc, ConnectionRefusedError) else str(exc)
        raise ClientError(f"cannot connect to {url}: {cause}; is the server running? start it with "
                          "`whisper-stream serve` (and check the host and port)") from None


def _json_error(body: bytes) -> dict[str, str] | None:
    """The server's ``error`` message in a refused handshake's body, if that is what the body holds."""
    try:
        message = json.loads(body)
    except ValueError:
        return None
    if isinstance(message, dict) and isinstance(message.get("code"), str) and isinstance(message.get("message"), str):
        return message
    return None


def _refusal_message(url: str, status: int, body: bytes | None, token: str | None) -> str:
    detail = (body or b"").decode(errors="replace").strip()
    if status == 401:
        fix = ("the server's token is wrong: pass the one it was started with" if token else
               "the server requires a token: pass it with --token (or token=...)")
        return f"{url} refused the connection (HTTP 401 unauthorized): {fix}"
    if status == 404:
        return f"{url} was not found (HTTP 404): the stream endpoint is /v1/stream, e.g. {DEFAULT_URL}"
    return f"{url} refused the connection (HTTP {status}): {detail or 'no reason given'}"


async def _send(ws: ClientConnection, audio: Iterable[bytes] | AsyncIterable[bytes], options: dict[str, Any],
                rate: float, ready: asyncio.Event, ready_timeout: float) -> None:
    """Send start, the audio paced at ``rate`` bytes per second (0: unpaced), then stop."""
    try:
        await asyncio.wait_for(ready.wait(), ready_timeout)
    except asyncio.TimeoutError:
        raise ClientError(f"the server sent no 'ready' message within {ready_timeout:g} s; check that the URL points "
                          "at a whisper-stream server (path /v1/stream)") from None
    loop = asyncio.get_running_loop()
    try:
        await ws.send(json.dumps({"type": "start", **options}))
        started, sent = loop.time(), 0
        async for chunk in _aiter(audio):
            sent += len(chunk)
            if rate:  # a live source delivers a chunk once all of it has been heard
                await asyncio.sleep(max(0.0, started + sent / rate - loop.time()))
            await ws.send(chunk)
        await ws.send(json.dumps({"type": "stop"}))
    except ConnectionClosed:
        return  # the receiver reports why


async def _aiter(audio: Iterable[bytes] | AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    if isinstance(audio, AsyncIterable):
        async for chunk in audio:
            yield bytes(chunk)
    else:
        for chunk in audio:
            yield bytes(chunk)


async def _receive(ws: ClientConnection, transcript: Transcript, ready: asyncio.Event,
                   on_event: EventHandler | None) -> None:
    """Collect server messages until the connection closes."""
    with contextlib.suppress(ConnectionClosed):
        async for raw in ws:
            if isinstance(raw, bytes):
                continue  # the protocol has no binary server messages
            try:
                message = json.loads(raw)
                kind = message.get("type")
            except (ValueError, AttributeError):
                raise ClientError(f"the server sent a message that is not a protocol v1 JSON object: {raw[:200]!r}; "
                                  "check that the URL points at a whisper-stream server") from None
            if kind == "ready":
                if message.get("protocol") != PROTOCOL_VERSION:
                    raise ClientError(f"the server speaks protocol {message.get('protocol')!r}, this client "
                                      f"protocol {PROTOCOL_VERSION}; use matching versions of server and client")
                transcript.session_id, transcript.model = message.get("session_id"), message.get("model")
                ready.set()
            elif kind in ("started", "language"):
                transcript.language = message.get("language") or transcript.language
            elif kind == "final":
                transcript.finals.append(message)
            elif kind == "error":
                transcript.errors.append(message)
            elif kind == "done":
                transcript.done = message
                transcript.language = message.get("language") or transcript.language
            if on_event is not None:
                on_event(message)


def _check_outcome(ws: ClientConnection, transcript: Transcript) -> None:
    """Raise unless the server finished the stream normally (``done`` after ``stop``, close code 1000)."""
    code, reason, done = ws.close_code, ws.close_reason, transcript.done
    if done is not None and done.get("reason") == "stop" and code == 1000:
        return
    # The error that ended the stream: the one ``done`` names, else (no ``done``: a refusal) the last one.
    errors = [e for e in transcript.errors if done is None or e.get("code") == done.get("reason")]
    if errors:
        error = errors[-1]
        raise ClientError(f"server error {error.get('code')}: {error.get('message')}", code=error.get("code"),
                          transcript=transcript)
    if done is not None:
        message = f"the server ended the stream early ({done.get('reason')}); the transcript is incomplete: retry"
        raise ClientError(message, code=done.get("reason"), transcript=transcript)
    if code is None or code == 1006:
        message = "the connection to the server was lost before the stream finished; check the server and retry"
    else:
        detail = f"{code}: {reason}" if reason else str(code)
        message = f"the server closed the stream before it finished (close code {detail}); retry"
    raise ClientError(message, code=str(code) if code else None, transcript=transcript)
