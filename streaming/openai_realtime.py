"""OpenAI's Realtime API for transcription (``/v1/realtime?intent=transcription``): an adapter on the shared
runtime (:mod:`streaming.websocket`), so that OpenAI's SDKs and clients stream to this server (docs/apis.md).

``session.update`` (or the beta ``transcription_session.update``) sets the audio format, language, prompt and
turn detection; the first ``input_audio_buffer.append`` starts the session with them. Each utterance is one
conversation item: finals become ``...input_audio_transcription.delta`` events (deltas are append-only, so
partials are not sent), the end of the utterance ``speech_stopped``, ``committed`` and ``...completed``.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from typing import TYPE_CHECKING, Any

from .core.session import Action, EngineInfo, Send, Session, load_json
from .core.vad import VadConfig
from .websocket import Codec, WebSocket, serve_session

if TYPE_CHECKING:
    from .server import Server

PATH = "/v1/realtime"
SAMPLE_RATE = 24000  # the API's only PCM rate
FORMATS = ("pcm16", "audio/pcm")
DEFAULT_TURN_DETECTION = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": VadConfig.pre_speech_pad_ms,
                          "silence_duration_ms": VadConfig.endpoint_ms}


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def _error_event(message: str, code: str, param: str | None = None, event_id: str | None = None,
                kind: str = "invalid_request_error") -> dict[str, Any]:
    """OpenAI's ``error`` server event."""
    return {"type": "error", "event_id": _id("event"),
            "error": {"type": kind, "code": code, "message": message, "param": param, "event_id": event_id}}


def check_query(engine: EngineInfo, query: dict[str, list[str]]) -> tuple[int, dict[str, Any]] | None:
    """The handshake's answer to a session this server cannot run (only transcription), or None."""
    intent = query.get("intent", [""])[-1]
    if intent == "transcription":
        return None
    message = f"intent {intent!r} is not supported: this server runs transcription sessions (?intent=transcription)"
    return 400, {"error": {"type": "invalid_request_error", "code": "unsupported_intent", "message": message,
                           "param": "intent"}}


async def serve_stream(server: Server, ws: WebSocket) -> None:
    """Run one Realtime transcription session on ``ws``."""
    await serve_session(server, ws, RealtimeCodec(server.info))


class RealtimeCodec(Codec):
    """OpenAI Realtime transcription events on a session (see the module docstring)."""

    def __init__(self, engine: EngineInfo):
        self.engine = engine
        self.id = _id("sess")
        self.transcription: dict[str, Any] = {"model": engine.model, "language": None, "prompt": None}
        self.turn_detection: dict[str, Any] | None = dict(DEFAULT_TURN_DETECTION)
        self._items: dict[int, str] = {}  # segment -> item id
        self._text: dict[int, str] = {}
        self._start: dict[int, float] = {}
        self._previous: str | None = None

    # --- client events -------------------------------------------------------------------------------

    def open(self, session: Session) -> list[Action]:
        return [_wire({"type": "session.created", "event_id": _id("event"), "session": self._session_object(True)})]

    def text(self, session: Session, text: str) -> list[Action]:
        try:
            event = load_json(text)
        except ValueError as exc:
            return [_error(f"the event is not valid JSON: {exc}", "invalid_json")]
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            return [_error("an event must be a JSON object with a string 'type'", "invalid_event")]
        kind, event_id = event["type"], event.get("event_id")
        if kind in ("session.update", "transcription_session.update"):
            return self._update(session, event, kind.removesuffix(".update"))
        if kind == "input_audio_buffer.append":
            try:
                audio = base64.b64decode(event.get("audio", ""), validate=True)
            except (binascii.Error, TypeError, ValueError):
                return [_error("audio must be base64-encoded PCM", "invalid_value", "audio", event_id)]
            return (self._begin(session) if session.state == "new" else []) + session.receive_bytes(audio)
        if kind == "input_audio_buffer.commit":
            return session.receive({"type": "finalize"}) if session.state != "new" else \
                [_error("buffer too small: no audio was appended", "input_audio_buffer_commit_empty", None, event_id)]
        if kind == "input_audio_buffer.clear":  # audio received is already being transcribed; nothing to drop
            return [_wire({"type": "input_audio_buffer.cleared", "event_id": _id("event")})]
        return [_error(f"event type {kind!r} is not supported by this transcription server", "invalid_value",
                       "type", event_id)]

    def _update(self, session: Session, event: dict[str, Any], flavor: str) -> list[Action]:
        event_id = event.get("event_id")
        config = event.get("session")
        if not isinstance(config, dict):
            return [_error("session must be an object", "invalid_value", "session", event_id)]
        if session.state != "new":
            return [_error("the session's settings are fixed once audio was appended", "session_already_started",
                           "session", event_id)]
        audio = config.get("audio") or {}
        audio_input = (audio.get("input") if isinstance(audio, dict) else audio) or {}
        if not isinstance(audio_input, dict):
            return [_error("audio.input must be an object", "invalid_value", "session.audio.input", event_id)]
        fmt = audio_input.get("format", config.get("input_audio_format", "pcm16"))
        fmt_type = fmt.get("type", "audio/pcm") if isinstance(fmt, dict) else fmt
        rate = fmt.get("rate", SAMPLE_RATE) if isinstance(fmt, dict) else SAMPLE_RATE
        if fmt_type not in FORMATS or rate != SAMPLE_RATE:
            return [_error(f"audio format {fmt!r} is not supported; use audio/pcm at {SAMPLE_RATE} Hz (pcm16)",
                           "invalid_value", "session.audio.input.format", event_id)]
        transcription = audio_input.get("transcription", config.get("input_audio_transcription")) or {}
        if not isinstance(transcription, dict):
            return [_error("transcription must be an object", "invalid_value", "session.audio.input.transcription",
                           event_id)]
        turn = audio_input["turn_detection"] if "turn_detection" in audio_input else \
            config.get("turn_detection", self.turn_detection)
        problem = _turn_detection_problem(turn)
        if problem:
            return [_error(problem, "invalid_value", "session.audio.input.turn_detection", event_id)]
        merged = {**self.transcription, **{k: transcription.get(k) for k in ("model", "language", "prompt")
                                           if k in transcription}}
        turn = None if turn is None else {**DEFAULT_TURN_DETECTION, **turn}
        for action in Session(self.engine).receive(_start(merged, turn)):  # the session's own checks
            if isinstance(action, Send) and action.message["type"] == "error":
                message = action.message["message"].removeprefix("bad start message: ")
                return [_error(message, "invalid_value", "session", event_id)]
        self.transcription, self.turn_detection = merged, turn
        ga = flavor == "session"
        return [_wire({"type": f"{flavor}.updated", "event_id": _id("event"), "session": self._session_object(ga)})]

    def _begin(self, session: Session) -> list[Action]:
        return [a for a in session.receive(_start(self.transcription, self.turn_detection))
                if not (isinstance(a, Send) and a.message["type"] == "started")]

    def _session_object(self, ga: bool) -> dict[str, Any]:
        if not ga:
            return {"id": self.id, "object": "realtime.transcription_session", "input_audio_format": "pcm16",
                    "input_audio_transcription": self.transcription, "turn_detection": self.turn_detection,
                    "modalities": ["text"]}
        return {"type": "transcription", "id": self.id, "object": "realtime.transcription_session",
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": SAMPLE_RATE},
                                    "transcription": self.transcription, "turn_detection": self.turn_detection,
                                    "noise_reduction": None}}}

    # --- server events -------------------------------------------------------------------------------

    def encode(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        kind = message["type"]
        if kind == "wire":
            return [message["event"]]
        if kind == "error":
            error = message.get("error") or {"type": "server_error" if message["code"] == "internal" else
                                             "invalid_request_error", "code": message["code"],
                                             "message": message["message"], "param": None, "event_id": None}
            return [{"type": "error", "event_id": _id("event"), "error": error}]
        if kind in ("partial", "final") and message["text"].strip():
            return self._speech(message)
        if kind == "utterance_end" and message["segment"] in self._items:
            return self._complete(message)
        return []  # ready, started, language and warnings have no Realtime counterpart

    def _speech(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        segment, out = message["segment"], []
        if segment not in self._items:
            self._items[segment], self._text[segment], self._start[segment] = _id("item"), "", message["start"]
            if self.turn_detection is not None:
                out.append({"type": "input_audio_buffer.speech_started", "event_id": _id("event"),
                            "audio_start_ms": round(message["start"] * 1000), "item_id": self._items[segment]})
        if message["type"] == "final":
            delta = message["text"] if self._text[segment] else message["text"].lstrip()
            self._text[segment] += delta
            out.append({"type": "conversation.item.input_audio_transcription.delta", "event_id": _id("event"),
                        "item_id": self._items[segment], "content_index": 0, "delta": delta})
        return out

    def _complete(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        segment = message["segment"]
        item = self._items.pop(segment)
        out = []
        if self.turn_detection is not None:
            out.append({"type": "input_audio_buffer.speech_stopped", "event_id": _id("event"),
                        "audio_end_ms": round(message["end"] * 1000), "item_id": item})
        out.append({"type": "input_audio_buffer.committed", "event_id": _id("event"), "item_id": item,
                    "previous_item_id": self._previous})
        seconds = round(max(0.0, message["end"] - self._start.pop(segment)), 3)
        out.append({"type": "conversation.item.input_audio_transcription.completed", "event_id": _id("event"),
                    "item_id": item, "content_index": 0, "transcript": self._text.pop(segment),
                    "usage": {"type": "duration", "seconds": seconds}})
        self._previous = item
        return out


def _start(transcription: dict[str, Any], turn: dict[str, Any] | None) -> dict[str, Any]:
    """The native ``start`` message for the session's settings."""
    start: dict[str, Any] = {"type": "start", "sample_rate": SAMPLE_RATE, "encoding": "pcm_s16le", "channels": 1,
                             "language": transcription.get("language") or None,
                             "prompt": transcription.get("prompt") or None, "word_timestamps": False}
    if turn is not None:
        threshold = turn.get("threshold")
        start["vad"] = {"pre_speech_pad_ms": turn.get("prefix_padding_ms"),
                        "endpoint_ms": max(turn.get("silence_duration_ms") or 0, VadConfig.hangover_ms),
                        "aggressiveness": min(3, max(0, round(threshold * 3)))
                        if isinstance(threshold, (int, float)) else None}
        start["vad"] = {k: v for k, v in start["vad"].items() if v is not None}
    return start


def _turn_detection_problem(turn: object) -> str | None:
    """What is wrong with a ``turn_detection`` setting, or None."""
    if turn is None:
        return None
    if not isinstance(turn, dict) or turn.get("type", "server_vad") != "server_vad":
        return "turn_detection must be server_vad or null"
    for name in ("prefix_padding_ms", "silence_duration_ms"):
        value = turn.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            return f"turn_detection.{name} must be a number of milliseconds, got {value!r}"
    threshold = turn.get("threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0 <= threshold <= 1):
        return f"turn_detection.threshold must be a number from 0 to 1, got {threshold!r}"
    return None


def _wire(event: dict[str, Any]) -> Send:
    """An event this codec made itself, sent as it is."""
    return Send({"type": "wire", "event": event})


def _error(message: str, code: str, param: str | None = None, event_id: str | None = None) -> Send:
    return Send({"type": "error", "code": code, "message": message,
                 "error": _error_event(message, code, param, event_id)["error"]})
