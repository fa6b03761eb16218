"""OpenAI's audio REST API: ``POST /v1/audio/transcriptions`` and ``/v1/audio/translations`` (multipart uploads,
every ``response_format``, ``stream=true`` as server-sent events) and ``GET /v1/models``, so that OpenAI's SDKs
transcribe files with this server as their ``base_url`` (docs/apis.md). Errors are OpenAI's error object."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from aiohttp import MultipartReader, web

from .core.events import word_dict
from .core.languages import LANGUAGES
from .engine.decoding import FallbackPolicy, compression_ratio
from .engine.mel import FRAMES_PER_SECOND
from .engine.transcribe import Segment, TranscribeOptions, Transcript
from .formats import Cue, render
from .jobs import Job, JobError, admitted, check_length, check_options, read_capped

if TYPE_CHECKING:
    from .server import Server

TRANSCRIPTIONS = "/v1/audio/transcriptions"
TRANSLATIONS = "/v1/audio/translations"
MODELS = "/v1/models"
ALIASES = ("whisper-1",)  # model names OpenAI's clients send that mean the served model
RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES = ("word", "segment")
MAX_FIELD_BYTES = 64 * 1024  # a form field other than the file (a prompt is at most a few hundred tokens)
CREATED = int(time.time())


def error(status: int, message: str, code: str | None, param: str | None = None,
          kind: str = "invalid_request_error") -> web.Response:
    """OpenAI's error response."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    response = web.json_response(body, status=status)
    if status in (429, 503):
        response.headers["Retry-After"] = "1"
    return response


def _job_error(exc: JobError) -> web.Response:
    kind = "server_error" if exc.status >= 500 else "rate_limit_error" if exc.status == 429 else \
        "invalid_request_error"
    return error(exc.status, exc.message, exc.code, exc.param, kind)


def _unauthorized() -> web.Response:
    return error(401, "incorrect or missing API key: send the server's --token as 'Authorization: Bearer <token>'",
                 "invalid_api_key")


@dataclass
class Form:
    """A transcription request's fields, as OpenAI names them."""

    file: bytes | None = None
    filename: str = "file"
    fields: dict[str, list[str]] = field(default_factory=dict)

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self.fields.get(name)
        return values[-1] if values else default


async def _read_form(server: Server, request: web.Request) -> Form:
    if request.content_type != "multipart/form-data":
        raise JobError(400, "invalid_request", f"the body must be multipart/form-data with a 'file' part, not "
                                               f"{request.content_type!r}")
    form = Form()
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if isinstance(part, MultipartReader) or part.name is None:
                raise JobError(400, "invalid_request", "every part of the form must be a named field")
            if part.name == "file":
                form.file, form.filename = await read_capped(server, part), part.filename or "file"
            else:
                value = await part.read(decode=True)
                if len(value) > MAX_FIELD_BYTES:
                    raise JobError(400, "invalid_value", f"field {part.name!r} is longer than {MAX_FIELD_BYTES} "
                                                         "bytes", part.name)
                form.fields.setdefault(part.name, []).append(value.decode("utf-8", "replace"))
    except JobError:
        raise
    except Exception as exc:  # noqa: BLE001 - aiohttp's parser raises several kinds for a malformed body
        raise JobError(400, "invalid_request", f"the multipart/form-data body could not be parsed ({exc}); send "
                                               "it as an HTTP client's multipart form does") from None
    if form.file is None:
        raise JobError(400, "invalid_request", "the form has no 'file' part: upload the audio as 'file'", "file")
    return form


def _served(server: Server, model: str | None) -> str:
    """The served model's name for ``model``; 404 ``model_not_found`` for another."""
    if model is None or model in ALIASES or model == server.info.model:
        return server.info.model
    raise JobError(404, "model_not_found", f"the model {model!r} does not exist on this server; use "
                                           f"{server.info.model!r} (or 'whisper-1')", "model")


@dataclass(frozen=True)
class Options:
    response_format: str
    words: bool
    segments: bool
    stream: bool
    transcribe: TranscribeOptions


def _options(server: Server, form: Form, task: str) -> Options:
    _served(server, form.get("model"))
    fmt = form.get("response_format", "json")
    if fmt not in RESPONSE_FORMATS:
        raise JobError(400, "invalid_value", f"response_format {fmt!r} is not supported; use one of "
                                             f"{', '.join(RESPONSE_FORMATS)}", "response_format")
    granularities = form.fields.get("timestamp_granularities[]", []) + form.fields.get("timestamp_granularities", [])
    unknown = [g for g in granularities if g not in GRANULARITIES]
    if unknown:
        raise JobError(400, "invalid_value", f"timestamp_granularities {unknown[0]!r} is not one of word, segment",
                       "timestamp_granularities")
    if granularities and fmt != "verbose_json":
        raise JobError(400, "invalid_value", "timestamp_granularities needs response_format verbose_json",
                       "timestamp_granularities")
    try:
        temperature = float(form.get("temperature", "0"))
    except ValueError:
        temperature = -1.0
    if not 0 <= temperature <= 1:
        raise JobError(400, "invalid_value", f"temperature must be a number from 0 to 1, got "
                                             f"{form.get('temperature')!r}", "temperature")
    stream = (form.get("stream") or "false").lower()
    if stream not in ("true", "false"):
        raise JobError(400, "invalid_value", f"stream must be true or false, got {stream!r}", "stream")
    language, prompt = form.get("language") or None, form.get("prompt") or None
    problem = check_options(server.info, language, task, prompt)
    if problem:
        raise JobError(400, "invalid_value", problem, "language" if "language" in problem else None)
    # Temperature 0 is Whisper's fallback ladder from 0; a higher one starts the ladder there.
    ladder = tuple(t for t in FallbackPolicy.temperatures if t >= temperature) or (temperature,)
    words = "word" in granularities
    transcribe = TranscribeOptions(language=language, task=task, word_timestamps=words, initial_prompt=prompt,
                                   policy=FallbackPolicy(temperatures=ladder))
    return Options(fmt, words, "segment" in granularities or not granularities, stream == "true", transcribe)


async def transcriptions(server: Server, request: web.Request) -> web.StreamResponse:
    """``POST /v1/audio/transcriptions``."""
    return await _handle(server, request, "transcribe")


async def translations(server: Server, request: web.Request) -> web.StreamResponse:
    """``POST /v1/audio/translations``: the speech translated to English."""
    return await _handle(server, request, "translate")


async def _handle(server: Server, request: web.Request, task: str) -> web.StreamResponse:
    if not server.authorized(request):
        server.metrics.count_error("unauthorized")
        return _unauthorized()
    try:
        check_length(server, request)
        form = await _read_form(server, request)
        options = _options(server, form, task)
        async with admitted(server, request) as job:
            audio = await job.decode(form.file or b"", repr(form.filename))
            if options.stream:
                return await _stream(job, request, audio, options)
            transcript = await job.transcribe(audio, options.transcribe)
    except JobError as exc:
        server.metrics.count_error(exc.code)
        return _job_error(exc)
    return _response(transcript, options, task)


async def _stream(job: Job, request: web.Request, audio: np.ndarray, options: Options) -> web.StreamResponse:
    """The transcript as server-sent events: a ``transcript.text.delta`` per segment as it is decoded, then
    ``transcript.text.done`` (or an ``error`` event, the status being sent already)."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    started = False

    def delta(segment: Segment) -> None:
        nonlocal started
        text = segment.text if started else segment.text.lstrip()
        events.put_nowait({"type": "transcript.text.delta", "delta": text})
        started = True

    work = asyncio.create_task(job.transcribe(audio, options.transcribe, delta))
    work.add_done_callback(lambda _: events.put_nowait(None))  # after every delta: both come through the loop
    try:
        while (event := await events.get()) is not None:
            await response.write(_event(event))
        try:
            done = {"type": "transcript.text.done", "text": (await work).text}
        except JobError as exc:
            done = {"type": "error", "error": {"message": exc.message, "type": "server_error", "param": None,
                                               "code": exc.code}}
        await response.write(_event(done))
        await response.write_eof()
    except ConnectionError:  # the client left; the transcription stops at its next window
        pass
    finally:
        work.cancel()
    return response


def _event(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def _response(transcript: Transcript, options: Options, task: str) -> web.Response:
    fmt = options.response_format
    if fmt in ("text", "srt", "vtt"):
        cues = [Cue(s.start, s.end, s.text) for s in transcript.segments]
        body = transcript.text + "\n" if fmt == "text" else render(cues, fmt)
        return web.Response(text=body, content_type="text/vtt" if fmt == "vtt" else "text/plain")
    usage = {"type": "duration", "seconds": round(transcript.duration, 3)}
    if fmt == "json":
        return web.json_response({"text": transcript.text, **({"usage": usage} if task == "transcribe" else {})})
    body: dict[str, Any] = {"task": task, "language": LANGUAGES.get(transcript.language, transcript.language),
                            "duration": round(transcript.duration, 3), "text": transcript.text}
    if options.segments:
        body["segments"] = [_segment(i, s) for i, s in enumerate(transcript.segments)]
    if options.words:
        body["words"] = [word_dict(w.word.strip(), w.start, w.end, w.probability)
                         for s in transcript.segments for w in s.words]
    if task == "transcribe":
        body["usage"] = usage
    return web.json_response(body)


def _segment(index: int, segment: Segment) -> dict[str, Any]:
    return {"id": index, "seek": int(segment.start * FRAMES_PER_SECOND), "start": round(segment.start, 3),
            "end": round(segment.end, 3), "text": segment.text, "tokens": segment.tokens,
            "temperature": segment.temperature, "avg_logprob": segment.avg_logprob,
            "compression_ratio": compression_ratio(segment.text), "no_speech_prob": segment.no_speech_prob}


def _model(server: Server) -> dict[str, Any]:
    return {"id": server.info.model, "object": "model", "created": CREATED, "owned_by": "whisper-stream"}


async def models(server: Server, request: web.Request) -> web.Response:
    """``GET /v1/models``: the served model."""
    if not server.authorized(request):
        return _unauthorized()
    return web.json_response({"object": "list", "data": [_model(server)]})


async def model(server: Server, request: web.Request) -> web.Response:
    """``GET /v1/models/{model}``: the served model under its name or an alias, else 404."""
    if not server.authorized(request):
        return _unauthorized()
    try:
        _served(server, request.match_info["model"])
    except JobError as exc:
        return _job_error(exc)
    return web.json_response({**_model(server), "id": request.match_info["model"]})
