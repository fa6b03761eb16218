"""Deepgram's pre-recorded API: ``POST /v1/listen`` with the audio file as the body (any format PyAV reads), so
that Deepgram's SDKs transcribe files with this server as their base URL (docs/apis.md). The answer is Deepgram's
pre-recorded JSON (``metadata``, ``results.channels[0].alternatives[0]`` and, when asked, ``utterances``);
errors are Deepgram's error body."""

from __future__ import annotations

import hashlib
import time
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web

from . import deepgram
from .core.events import word_dict
from .core.speakers import SPEAKER_ENCODER_INSTALL
from .engine.transcribe import Segment, TranscribeOptions, Transcript
from .jobs import JobError, admitted, check_length, check_options, read_capped

if TYPE_CHECKING:
    from .server import Server

PATH = deepgram.PATH  # the live API's path: a WebSocket there is a live stream, a POST a file
BOOLEANS = (*deepgram.BOOLEANS, "utterances", "detect_language", "paragraphs")
ERROR_CODES = {400: "Bad Request", 401: "INVALID_AUTH", 404: "Not Found", 413: "PAYLOAD_TOO_LARGE",
               429: "TOO_MANY_REQUESTS", 500: "INTERNAL_SERVER_ERROR", 503: "SERVICE_UNAVAILABLE"}


def error(status: int, message: str, code: str | None = None) -> web.Response:
    response = web.json_response(deepgram.http_error(code or ERROR_CODES.get(status, "Bad Request"), message),
                                 status=status)
    if status in (429, 503):
        response.headers["Retry-After"] = "1"
    return response


def _flag(query: dict[str, str], name: str) -> bool:
    return query.get(name, "false").lower() == "true"


def parse_query(server: Server, query: dict[str, str]) -> TranscribeOptions:
    """The transcription options for Deepgram's query parameters; raises :class:`JobError` (400)."""
    for name in BOOLEANS:
        if name in query and query[name].lower() not in ("true", "false"):
            raise JobError(400, "INVALID_QUERY_PARAMETER", f"{name} must be true or false, got {query[name]!r}")
    if "encoding" in query:
        raise JobError(400, "INVALID_QUERY_PARAMETER", "encoding is for raw audio, which this server does not take "
                                                       "for pre-recorded requests; send a file in a container "
                                                       "(WAV, FLAC, MP3, OGG, WebM, M4A...) without encoding")
    language = query.get("language", "en")
    language = None if language == "multi" or _flag(query, "detect_language") else language.split("-")[0].lower()
    problem = check_options(server.info, language, "transcribe", None)
    if problem:
        raise JobError(400, "INVALID_QUERY_PARAMETER", problem)
    if _flag(query, "diarize") and not server.info.speakers:
        raise JobError(400, "INVALID_QUERY_PARAMETER", "diarize needs the speaker encoder, which this server does "
                                                       f"not have; install it on the server with: "
                                                       f"{SPEAKER_ENCODER_INSTALL}")
    return TranscribeOptions(language=language, word_timestamps=True)


async def transcribe(server: Server, request: web.Request) -> web.Response:
    """``POST /v1/listen``: the body's audio, transcribed."""
    if not server.authorized(request):
        server.metrics.count_error("unauthorized")
        return error(401, "Invalid credentials: send the server's --token as 'Authorization: Token <token>'")
    query = dict(request.query)
    try:
        check_length(server, request)
        if request.content_type == "application/json":
            raise JobError(400, "url_not_supported", "this server fetches no URLs: send the audio file itself as the "
                                               "request body (e.g. Content-Type: audio/wav), not {\"url\": ...}")
        options = parse_query(server, query)
        body = await read_capped(server, request)
        async with admitted(server, request) as job:
            audio = await job.decode(body, "the request body")
            transcript = await job.transcribe(audio, options, diarize=_flag(query, "diarize"))
    except JobError as exc:
        server.metrics.count_error(exc.code.lower())
        return error(exc.status, exc.message, exc.code if exc.code == "INVALID_QUERY_PARAMETER" else None)
    return web.json_response(_response(server, query, body, transcript))


def _response(server: Server, query: dict[str, str], body: bytes, transcript: Transcript) -> dict[str, Any]:
    model = server.info.model
    model_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, model))
    words = [w for s in transcript.segments for w in _words(s)]
    for word, speaker in zip(words, transcript.speakers or []):
        word["speaker"] = speaker
    best = {"transcript": transcript.text, "confidence": deepgram.confidence(words), "words": words}
    channel: dict[str, Any] = {"alternatives": [best]}
    if query.get("language", "") == "multi" or _flag(query, "detect_language"):
        channel["detected_language"] = transcript.language
    results: dict[str, Any] = {"channels": [channel]}
    if _flag(query, "utterances"):
        results["utterances"] = _utterances(transcript.segments, words)
    metadata = {"transaction_key": "deprecated", "request_id": str(uuid.uuid4()),
                "sha256": hashlib.sha256(body).hexdigest(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
                "duration": round(transcript.duration, 3), "channels": 1, "models": [model_uuid],
                "model_info": {model_uuid: {**deepgram.MODEL_INFO, "name": model}}}
    return {"metadata": metadata, "results": results}


def _words(segment: Segment) -> list[dict[str, Any]]:
    return [deepgram.word(word_dict(w.word, w.start, w.end, w.probability)) for w in segment.words]


def _utterances(segments: list[Segment], words: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Deepgram's utterances: the segments, each split where the speaker changes (with diarize)."""
    out, at = [], 0
    for segment in segments:
        own, at = words[at: at + len(segment.words)], at + len(segment.words)
        while own:
            speaker = own[0].get("speaker")
            turn = next((i for i, w in enumerate(own) if w.get("speaker") != speaker), len(own))
            part, own = own[:turn], own[turn:]
            text = segment.text.strip() if not own and len(part) == len(segment.words) else \
                " ".join(w["punctuated_word"] for w in part)
            utterance = {"id": str(uuid.uuid4()), "start": part[0]["start"], "end": part[-1]["end"],
                         "confidence": deepgram.confidence(part), "channel": 0, "transcript": text, "words": part}
            if speaker is not None:
                utterance["speaker"] = speaker
            out.append(utterance)
    return out
