"""Deepgram's live-streaming API (``/v1/listen`` on a WebSocket): an adapter on the shared
runtime (:mod:`streaming.websocket`), so that Deepgram's SDKs and clients stream to this server (docs/apis.md).

The query parameters become the session's ``start`` options, checked at the handshake (HTTP 400 with a JSON
body when one is bad). Partials become interim ``Results``, finals ``Results`` with ``is_final``, the end of
an utterance ``speech_final`` on its last final and an ``UtteranceEnd`` message; ``Metadata`` ends the stream.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from .core.session import Action, EngineInfo, Send, Session, load_json
from .core.vad import VadConfig
from .websocket import Codec, WebSocket, serve_session

if TYPE_CHECKING:
    from .server import Server

PATH = "/v1/listen"
ENCODINGS = {"linear16": "pcm_s16le", "linear32": "pcm_s32le"}
BOOLEANS = ("interim_results", "punctuate", "smart_format", "diarize", "vad_events", "numerals",
            "profanity_filter", "filler_words", "multichannel", "dictation", "no_delay", "mip_opt_out")
INTEGERS = ("sample_rate", "channels", "utterance_end_ms")
MODEL_INFO = {"name": "whisper-stream", "version": "1", "arch": "whisper"}


class BadQuery(ValueError):
    """A query parameter Deepgram's API would refuse (HTTP 400)."""


def _flag(query: dict[str, list[str]], name: str) -> bool:
    return query.get(name, ["false"])[-1].lower() == "true"


def parse_query(query: dict[str, list[str]]) -> dict[str, Any]:
    """The native ``start`` message for Deepgram's query parameters; raises :class:`BadQuery`."""
    value = {name: values[-1] for name, values in query.items()}
    for name in BOOLEANS:
        if name in value and value[name].lower() not in ("true", "false"):
            raise BadQuery(f"{name} must be true or false, got {value[name]!r}")
    numbers = {}
    for name in INTEGERS:
        if name in value:
            if not re.fullmatch(r"\d{1,6}", value[name]):
                raise BadQuery(f"{name} must be a positive integer, got {value[name]!r}")
            numbers[name] = int(value[name])
    encoding = value.get("encoding", "linear16")
    if encoding not in ENCODINGS:
        raise BadQuery(f"encoding {encoding!r} is not supported by this server; use one of {', '.join(ENCODINGS)}")
    start: dict[str, Any] = {"type": "start", "encoding": ENCODINGS[encoding],
                             "sample_rate": numbers.get("sample_rate", 16000), "channels": numbers.get("channels", 1),
                             "interim_results": _flag(query, "interim_results")}
    language = value.get("language", "en")
    start["language"] = None if language == "multi" else language.split("-")[0].lower()
    if _flag(query, "diarize"):
        start["diarize"] = True  # words then carry ``speaker``; a server without the speaker encoder refuses
    # Key terms (Nova-3's ``keyterm``, older models' ``keywords`` with an optional ":boost") prime spelling and
    # vocabulary as our prompt does.
    terms = [term.rsplit(":", 1)[0] if name == "keywords" else term
             for name in ("keyterm", "keywords") for term in query.get(name, [])]
    if terms := [term.strip() for term in terms if term.strip()]:
        start["prompt"] = ", ".join(terms)
    endpointing = value.get("endpointing")
    if endpointing is not None and endpointing.lower() != "false":
        if not re.fullmatch(r"\d{1,5}", endpointing):
            raise BadQuery(f"endpointing must be a number of milliseconds or false, got {endpointing!r}")
        # Our VAD cannot end an utterance sooner than its hangover; shorter values mean the shortest.
        start["vad"] = {"endpoint_ms": max(int(endpointing), VadConfig.hangover_ms)}
    return start


def check_query(engine: EngineInfo, query: dict[str, list[str]]) -> tuple[int, dict[str, Any]] | None:
    """The handshake's answer to bad parameters: (HTTP status, Deepgram's JSON error body), or None."""
    try:
        start = parse_query(query)
    except BadQuery as exc:
        return 400, http_error("INVALID_QUERY_PARAMETER", str(exc))
    for action in Session(engine).receive(start):  # the session's own checks (language, rate, channels)
        if isinstance(action, Send) and action.message["type"] == "error":
            return 400, http_error("INVALID_QUERY_PARAMETER", action.message["message"])
    return None


async def serve_stream(server: Server, ws: WebSocket) -> None:
    """Run one Deepgram live stream on ``ws`` (its query was checked at the handshake)."""
    await serve_session(server, ws, DeepgramCodec(ws.path, server.info.model))


class DeepgramCodec(Codec):
    """Deepgram's messages on a session: ``KeepAlive``, ``Finalize`` and ``CloseStream`` in, ``Results``,
    ``SpeechStarted``, ``UtteranceEnd``, ``Metadata`` and ``Error`` out."""

    def __init__(self, path: str, model: str):
        query = parse_qs(urlsplit(path).query)
        self.start = parse_query(query)
        self.vad_events = _flag(query, "vad_events")
        self.utterance_end = "utterance_end_ms" in query
        self.request_id = str(uuid.uuid4())
        self.created = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        self.metadata = {"request_id": self.request_id, "model_info": {**MODEL_INFO, "name": model},
                         "model_uuid": str(uuid.uuid5(uuid.NAMESPACE_URL, model))}
        self.channels = self.start["channels"]
        self._speaking: set[int] = set()  # segments already announced by SpeechStarted
        self._finalizing = False

    def open(self, session: Session) -> list[Action]:
        return session.receive(self.start)  # Deepgram sends nothing at open; "started" is dropped

    def text(self, session: Session, text: str) -> list[Action]:
        try:
            kind = load_json(text).get("type")
        except (ValueError, AttributeError):
            kind = None
        if kind == "KeepAlive":
            return []
        if kind == "Finalize":
            self._finalizing = True
            return session.receive({"type": "finalize"})
        if kind == "CloseStream":
            return session.receive({"type": "stop"})
        return [Send({"type": "error", "code": "bad_json",
                      "message": f"unknown control message {text[:100]!r}; send KeepAlive, Finalize or CloseStream"})]

    def prepare(self, actions: list[Action]) -> list[Action]:
        """Mark each final that ends its utterance (the core emits the utterance end in the same batch)."""
        ends = {a.message["segment"] for a in actions if isinstance(a, Send) and a.message["type"] == "utterance_end"}
        last: dict[int, int] = {}
        for i, action in enumerate(actions):
            if isinstance(action, Send) and action.message["type"] == "final":
                last[action.message["segment"]] = i
        return [Send({**a.message, "speech_final": True})
                if isinstance(a, Send) and last.get(a.message.get("segment", -1)) == i and a.message["segment"] in ends
                else a for i, a in enumerate(actions)]

    def encode(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        kind = message["type"]
        if kind in ("partial", "final"):
            if not message["text"].strip():
                return []
            out = []
            if self.vad_events and message["segment"] not in self._speaking:
                self._speaking.add(message["segment"])
                out.append({"type": "SpeechStarted", "channel": [0], "timestamp": message["start"]})
            return out + [self._results(message)]
        if kind == "utterance_end":
            self._finalizing = False
            return [{"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": message["end"]}] \
                if self.utterance_end else []
        if kind == "done":
            return [{"type": "Metadata", "transaction_key": "deprecated", "request_id": self.request_id,
                     "sha256": "", "created": self.created, "duration": message["audio_seconds"],
                     "channels": self.channels}]
        if kind == "error":
            return [{"type": "Error", "variant": message["code"], "description": message["message"],
                     "message": message["message"]}]
        return []  # ready, started, language and warnings have no Deepgram counterpart

    def _results(self, message: dict[str, Any]) -> dict[str, Any]:
        final = message["type"] == "final"
        words = [word(w) for w in message.get("words", [])]
        results = {"type": "Results", "channel_index": [0, 1], "duration": round(message["end"] - message["start"], 3),
                   "start": message["start"], "is_final": final, "speech_final": message.get("speech_final", False),
                   "channel": {"alternatives": [{"transcript": message["text"].strip(), "confidence": confidence(words),
                                                 "words": words}]},
                   "metadata": self.metadata}
        if final:
            results["from_finalize"] = self._finalizing
        return results


def word(w: dict[str, Any]) -> dict[str, Any]:
    """Deepgram's word object for a native one (:func:`streaming.core.events.word_dict`)."""
    out = {"word": _plain(w["word"]), "start": w["start"], "end": w["end"], "confidence": w["probability"],
           "punctuated_word": w["word"].strip()}
    if "speaker" in w:  # diarize=true
        out["speaker"] = w["speaker"]
    return out


def confidence(words: list[dict[str, Any]]) -> float:
    """A transcript's confidence: its words' mean."""
    return round(sum(w["confidence"] for w in words) / len(words), 4) if words else 0.0


def http_error(code: str, message: str) -> dict[str, Any]:
    """Deepgram's JSON error body."""
    return {"err_code": code, "err_msg": message, "request_id": str(uuid.uuid4())}


def _plain(word: str) -> str:
    """Deepgram's ``word``: lower case without surrounding punctuation."""
    return re.sub(r"^[^\w']+|[^\w']+$", "", word.strip().lower())
