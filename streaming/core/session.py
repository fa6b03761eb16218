"""Wire protocol v1 for one streaming connection, sans-I/O (see docs/protocol.md).

A :class:`Session` turns what the client sends into actions for whoever owns the socket: :class:`Send` a
JSON message, :class:`Run` a window decode or a speaker embedding (and hand its result to
:meth:`Session.complete`), :class:`Close` the connection. It never touches sockets, threads or the model, so it
is tested without either. A ``multichannel`` stream runs one :class:`StreamCore` per channel.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from .audio import MAX_CHANNELS, AudioFormatError, PcmDecoder
from .events import Event, Final, Partial, UtteranceEnd
from .languages import LANGUAGES, check_task
from .messages import EmbedRequest, Reply, Request, WindowRequest
from .speakers import SPEAKER_ENCODER_INSTALL
from .stream import StreamCore, StreamOptions
from .vad import SAMPLE_RATE, VadConfig

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20
MAX_PROMPT_CHARS = 2000
# Audio that may arrive during one decode before the adapter stops reading the client.
MAX_BACKLOG_SECONDS = 10.0

# WebSocket close codes (RFC 6455 section 7.4.1).
NORMAL = 1000
GOING_AWAY = 1001
UNSUPPORTED_DATA = 1003
POLICY_VIOLATION = 1008
INTERNAL_ERROR = 1011
TRY_AGAIN_LATER = 1013

START_FIELDS = ("sample_rate", "encoding", "channels", "multichannel", "language", "task", "prompt",
                "interim_results", "word_timestamps", "diarize", "vad", "min_chunk", "agreement", "final_context")
MESSAGE_TYPES = ("start", "finalize", "stop")


@dataclass(frozen=True)
class Send:
    """Send ``message`` to the client as a JSON text message."""

    message: dict[str, Any]


@dataclass(frozen=True)
class Run:
    """Run ``request`` on the engine, then pass the reply (or the exception) to :meth:`Session.complete`."""

    request: Request


@dataclass(frozen=True)
class Close:
    """Close the connection with WebSocket ``code`` after everything sent before it."""

    code: int
    reason: str = ""


Action = Send | Run | Close


@dataclass(frozen=True)
class EngineInfo:
    """What a session needs to know about the shared model; ``speakers``: the speaker encoder is installed."""

    model: str
    multilingual: bool
    speakers: bool = False


def error_message(code: str, message: str) -> dict[str, Any]:
    """The wire ``error`` message."""
    return {"type": "error", "code": code, "message": message}


def warning_message(code: str, message: str) -> dict:
    """A ``warning``: the stream goes on, but the client should change what it does."""
    return {"type": "warning", "code": code, "message": message}


def lagging_warning(limit: int) -> dict:
    """The ``client_lagging`` warning: the client reads too slowly, so older partials are dropped."""
    return warning_message("client_lagging", f"more than {limit} messages wait for this client: older partials "
                           "are dropped (finals never are); read messages as they arrive")


def refusal(code: str, message: str, close_code: int) -> list[Action]:
    """Actions that refuse or abort a connection outside any session (e.g. ``capacity``, ``internal``)."""
    return [Send(error_message(code, message)), Close(close_code, code)]


class _Fatal(Exception):
    """A client error that ends the stream: ``code`` on the wire, ``close_code`` on the socket."""

    def __init__(self, code: str, message: str, close_code: int):
        super().__init__(message)
        self.code, self.close_code = code, close_code


def _bad_start(message: str) -> _Fatal:
    return _Fatal("bad_start", f"bad start message: {message}", POLICY_VIOLATION)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    """A finite int or float that fits a float (JSON integers are unbounded; bools are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond float range
        return False


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def load_json(text: str | bytes) -> Any:
    """A client's JSON, as every wire protocol reads it: ValueError for anything that is not valid JSON,
    NaN and Infinity included, and for nesting too deep to parse."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


@dataclass(frozen=True)
class _Settings:
    decoder: PcmDecoder
    options: StreamOptions
    word_timestamps: bool


@dataclass(eq=False)
class _Channel:
    """One transcribed audio channel: its core and its requests in flight. ``index`` is None for the single
    channel of a stream that is not multichannel (its messages carry no ``channel``)."""

    core: StreamCore
    index: int | None
    decode: WindowRequest | None = None
    embed: EmbedRequest | None = None
    samples_at_request: int = 0

    @property
    def busy(self) -> bool:
        return self.decode is not None or self.embed is not None


class Session:
    """The protocol state of one connection: ``open()`` once, then feed it messages and decode results.

    States: new (no start, no audio) -> streaming (after ``start`` or the first audio) -> ending (after
    ``stop``, an end-of-stream error, a timeout or a drain: the last decodes run) -> closed.
    """

    def __init__(self, engine: EngineInfo, session_id: str | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, clock: Callable[[], float] = time.monotonic):
        self.engine = engine
        self.id = session_id or uuid.uuid4().hex[:16]
        self.max_message_bytes = max_message_bytes
        self._clock = clock
        self._opened = clock()
        self.state = "new"
        self._settings: _Settings | None = None
        self._channels: list[_Channel] = []
        self._samples = 0
        self._end: tuple[str, int] = ("stop", NORMAL)  # done reason and close code once ending
        self._audio_after_end_reported = False
        self._warned_backlog = False
        self.stats = {"finals": 0, "partials": 0, "utterances": 0, "words": 0, "decodes": 0, "errors": 0}

    # --- adapter API ---------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.state == "closed"

    @property
    def audio_seconds(self) -> float:
        """Seconds of (16 kHz) audio received so far."""
        return self._samples / SAMPLE_RATE

    @property
    def language(self) -> str | None:
        """The stream's language (of its first channel): as started, or once detected; None before."""
        return self._channels[0].core.language if self._channels else None

    @property
    def backlog_seconds(self) -> float:
        """Audio received while the current decode runs (the longest wait of any channel); the adapter may stop
        reading while this is large."""
        waits = [self._samples - c.samples_at_request for c in self._channels if c.decode is not None]
        return max(waits, default=0) / SAMPLE_RATE

    def backlogged(self) -> tuple[bool, list[Action]]:
        """Whether the adapter should stop reading the client's audio (TCP holds the client back) until a
        decode completes, because over ``MAX_BACKLOG_SECONDS`` arrived during the current one; the first
        time, with an ``audio_backlog`` warning to send."""
        if self.backlog_seconds <= MAX_BACKLOG_SECONDS:
            return False, []
        if self._warned_backlog:
            return True, []
        self._warned_backlog = True
        return True, [Send(warning_message(
            "audio_backlog", f"audio arrives faster than it is transcribed: over {MAX_BACKLOG_SECONDS:g} s wait, "
            "so reading pauses until the server catches up (send at most real time for live captions)"))]

    def open(self) -> list[Action]:
        """The greeting sent as soon as the connection is accepted."""
        return [Send({"type": "ready", "session_id": self.id, "model": self.engine.model,
                      "multilingual": self.engine.multilingual, "protocol": PROTOCOL_VERSION,
                      "sample_rate": SAMPLE_RATE, "encoding": "pcm_s16le", "channels": 1,
                      "max_message_bytes": self.max_message_bytes})]

    def receive_text(self, text: str) -> list[Action]:
        """A text (JSON control) message from the client."""
        if self.closed:
            return []
        # A character is at most 4 UTF-8 bytes: only long texts need encoding to measure.
        if len(text) * 4 > self.max_message_bytes and len(text.encode()) > self.max_message_bytes:
            return self._fail(self._too_large(len(text.encode())))
        try:
            message = load_json(text)
        except ValueError as exc:
            return self._error("bad_json", f"text message is not valid JSON ({exc}); send one JSON object")
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            return self._error("bad_json", 'a text message must be a JSON object with a string "type" field, '
                                           'e.g. {"type": "stop"}')
        return self.receive(message)

    def receive(self, message: dict[str, Any]) -> list[Action]:
        """A control message as a dict with a string ``type`` (``start``, ``finalize`` or ``stop``): what
        :meth:`receive_text` parses, or what an adapter of another wire protocol builds."""
        if self.closed:
            return []
        kind = message["type"]
        if kind not in MESSAGE_TYPES:
            return self._error("unknown_type", f"unknown message type {kind!r}; allowed: {', '.join(MESSAGE_TYPES)}")
        if self.state == "ending":
            return self._error("unexpected_text", f"{kind!r} ignored: the stream is already ending "
                                                  f"({self._end[0]}); wait for the 'done' message")
        try:
            if kind == "start":
                return self._start(message)
            if kind == "finalize":
                return self._finalize()
            return self._end_stream("stop", NORMAL)
        except _Fatal as fatal:
            return self._fail(fatal)

    def receive_bytes(self, data: bytes) -> list[Action]:
        """A binary message: raw PCM in the stream's encoding."""
        if self.closed:
            return []
        if self.state == "ending":
            if self._audio_after_end_reported:
                return []
            self._audio_after_end_reported = True
            return self._error("audio_after_stop", f"audio ignored: the stream is ending ({self._end[0]}); "
                                                   "audio sent after this point is not transcribed")
        if len(data) > self.max_message_bytes:
            return self._fail(self._too_large(len(data)))
        actions = self._begin(self._parse_start({})) if self.state == "new" else []
        assert self._settings is not None
        try:
            audio = self._settings.decoder.decode(data)
        except AudioFormatError as exc:
            return actions + self._error("bad_audio", f"audio message dropped: {exc}")
        return actions + self._feed(audio) + self._schedule()

    def complete(self, request: Request, result: Reply | BaseException) -> list[Action]:
        """The result of a :class:`Run` request: a reply, or the exception its run raised."""
        channel = next((c for c in self._channels if request is c.decode or request is c.embed), None)
        if self.closed or channel is None:
            return []
        if request is channel.decode:
            channel.decode = None
        else:
            channel.embed = None
        if isinstance(result, BaseException):
            log.error("session %s: %s failed", self.id,
                      "speaker embedding" if isinstance(request, EmbedRequest) else "window decode", exc_info=result)
            self.state = "closed"
            return refusal("internal", "internal error while decoding this stream's audio (logged on the server); "
                                       "reconnect to start a new stream", INTERNAL_ERROR)
        return self._emit(channel.core.complete(request, result), channel) + self._schedule()

    def timed_out(self, idle_seconds: float) -> list[Action]:
        """The client sent nothing for ``idle_seconds``: end the stream (its audio so far is still decoded)."""
        if self.state not in ("new", "streaming"):
            return []
        message = (f"no message from the client for {idle_seconds:g} s; send audio continuously (silence "
                   "included) and 'stop' at the end")
        return self._error("idle_timeout", message) + self._end_stream("idle_timeout", GOING_AWAY)

    def drain(self) -> list[Action]:
        """The server is shutting down: decode the audio received so far, send the last results, close."""
        if self.state not in ("new", "streaming"):
            return []
        notice = Send(warning_message("draining", "the server is shutting down: audio from now on is not "
                                                  "transcribed; the last finals and 'done' follow; reconnect to "
                                                  "continue (a load balancer sends you to another instance)"))
        return [notice, *self._end_stream("shutdown", GOING_AWAY)]

    # --- messages ------------------------------------------------------------------------------------

    def _start(self, message: dict[str, Any]) -> list[Action]:
        if self.state != "new":
            raise _Fatal("start_too_late", "'start' must be the first message and sent at most once; "
                                           "reconnect and send it before any audio", POLICY_VIOLATION)
        return self._begin(self._parse_start(message))

    def _parse_start(self, message: dict[str, Any]) -> _Settings:
        unknown = sorted(set(message) - {"type", *START_FIELDS})
        if unknown:
            raise _bad_start(f"unknown field {unknown[0]!r}; allowed: {', '.join(START_FIELDS)}")
        get = message.get
        sample_rate, channels = get("sample_rate", SAMPLE_RATE), get("channels", 1)
        encoding = get("encoding", "pcm_s16le")
        if not _is_int(sample_rate):
            raise _bad_start(f"sample_rate must be an integer number of Hz, got {sample_rate!r}")
        if not isinstance(encoding, str):
            raise _bad_start(f"encoding must be a string such as 'pcm_s16le', got {encoding!r}")
        if not _is_int(channels):
            raise _bad_start(f"channels must be an integer, got {channels!r}")
        language = self._language(get("language"))
        task = get("task", "transcribe")
        try:
            check_task(task)
        except ValueError as exc:
            raise _bad_start(str(exc)) from None
        if task == "translate" and not self.engine.multilingual:
            raise _bad_start(f"task 'translate' needs a multilingual model; {self.engine.model} is English-only")
        prompt = get("prompt")
        if prompt is not None and (not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS):
            raise _bad_start(f"prompt must be a string of at most {MAX_PROMPT_CHARS} characters or null")
        flags = {}
        for name, default in (("interim_results", True), ("word_timestamps", True), ("diarize", False),
                              ("multichannel", False)):
            flags[name] = get(name, default)
            if not isinstance(flags[name], bool):
                raise _bad_start(f"{name} must be true or false, got {flags[name]!r}")
        if flags["diarize"] and not self.engine.speakers:
            raise _bad_start("diarize needs the speaker encoder, which this server does not have; install it on "
                             f"the server with: {SPEAKER_ENCODER_INSTALL}, and restart it")
        if flags["multichannel"] and not 2 <= channels <= MAX_CHANNELS:
            raise _bad_start(f"multichannel transcribes each channel on its own: it needs channels from 2 to "
                             f"{MAX_CHANNELS}, got {channels}")
        min_chunk, agreement = get("min_chunk", StreamOptions.min_chunk), get("agreement", StreamOptions.agreement)
        if not _is_number(min_chunk):
            raise _bad_start(f"min_chunk must be a number of seconds, got {min_chunk!r}")
        if not _is_int(agreement):
            raise _bad_start(f"agreement must be an integer, got {agreement!r}")
        final_context = get("final_context", StreamOptions.final_context)
        if not _is_number(final_context):
            raise _bad_start(f"final_context must be a number of seconds, got {final_context!r}")
        try:
            options = StreamOptions(language=language, task=task, prompt=prompt or None,
                                    interim_results=flags["interim_results"], vad=self._vad(get("vad", {})),
                                    min_chunk=float(min_chunk), agreement=agreement, diarize=flags["diarize"],
                                    final_context=float(final_context))
        except ValueError as exc:
            raise _bad_start(str(exc)) from None
        try:
            decoder = PcmDecoder(sample_rate, encoding, channels, separate=flags["multichannel"])
        except AudioFormatError as exc:
            raise _Fatal("unsupported_format", str(exc), UNSUPPORTED_DATA) from None
        return _Settings(decoder, options, flags["word_timestamps"])

    def _language(self, language: object) -> str | None:
        if language is None or language == "auto":
            return None
        if not isinstance(language, str):
            raise _bad_start(f"language must be a language code string or null, got {language!r}")
        if not self.engine.multilingual:
            if language != "en":
                raise _bad_start(f"{self.engine.model} is English-only: language must be 'en' or null, "
                                 f"got {language!r}")
            return language
        if language not in LANGUAGES:
            raise _bad_start(f"unknown language {language!r}; use a code such as 'en', 'es' or 'zh', "
                             "or null/'auto' to detect it")
        return language

    @staticmethod
    def _vad(vad: object) -> VadConfig:
        if not isinstance(vad, dict):
            raise _bad_start(f"vad must be an object, got {vad!r}")
        allowed = {f.name: f for f in fields(VadConfig)}
        for name, value in vad.items():
            if name not in allowed:
                raise _bad_start(f"unknown vad field {name!r}; allowed: {', '.join(allowed)}")
            numeric = _is_number(value) if name == "energy_floor_dbfs" else _is_int(value)
            if not numeric:
                kind = "a number" if name == "energy_floor_dbfs" else "an integer"
                raise _bad_start(f"vad.{name} must be {kind}, got {value!r}")
        return VadConfig(**vad)

    def _begin(self, settings: _Settings) -> list[Action]:
        self._settings = settings
        options, decoder = settings.options, settings.decoder
        indices = range(decoder.channels) if decoder.separate else [None]
        self._channels = [_Channel(StreamCore(options, self.engine.multilingual), i) for i in indices]
        self.state = "streaming"
        return [Send({"type": "started", "sample_rate": decoder.sample_rate, "encoding": decoder.encoding,
                      "channels": decoder.channels, "multichannel": decoder.separate, "language": self.language,
                      "task": options.task, "prompt": options.prompt, "interim_results": options.interim_results,
                      "word_timestamps": settings.word_timestamps, "diarize": options.diarize,
                      "vad": asdict(options.vad), "min_chunk": options.min_chunk, "agreement": options.agreement,
                      "final_context": options.final_context})]

    def _finalize(self) -> list[Action]:
        actions: list[Action] = []
        for channel in self._channels:
            actions += self._emit(channel.core.finalize(), channel)
        return actions + self._schedule()

    def _end_stream(self, reason: str, close_code: int) -> list[Action]:
        self._end = (reason, close_code)
        self.state = "ending"
        actions: list[Action] = []
        if self._settings is not None:
            actions = self._feed(self._settings.decoder.flush())
            for channel in self._channels:
                actions += self._emit(channel.core.flush(), channel)
        return actions + self._schedule()

    # --- internals -----------------------------------------------------------------------------------

    def _feed(self, audio: np.ndarray) -> list[Action]:
        """16 kHz audio: mono, or [channels, samples] for a multichannel stream."""
        self._samples += audio.shape[-1]
        if not audio.shape[-1]:
            return []
        signals = audio if audio.ndim == 2 else [audio]
        actions: list[Action] = []
        for channel, signal in zip(self._channels, signals):
            actions += self._emit(channel.core.feed(signal), channel)
        return actions

    def _schedule(self) -> list[Action]:
        """Start what each channel needs now: a speaker embedding and a decode may run side by side."""
        actions: list[Action] = []
        for channel in self._channels:
            while (request := channel.core.next_request()) is not None and request is not channel.decode:
                if isinstance(request, EmbedRequest):
                    channel.embed = request
                else:
                    channel.decode, channel.samples_at_request = request, self._samples
                    self.stats["decodes"] += 1
                actions.append(Run(request))
        if self.state == "ending" and not any(c.busy for c in self._channels):
            return actions + self._done()
        return actions

    def _emit(self, events: list[Event], channel: _Channel) -> list[Action]:
        actions: list[Action] = []
        for event in events:
            if isinstance(event, Final):
                self.stats["finals"] += 1
                self.stats["words"] += len(event.words)
                message = event.to_dict(words=bool(self._settings and self._settings.word_timestamps))
            else:
                message = event.to_dict()
            if isinstance(event, Partial):
                self.stats["partials"] += 1
            elif isinstance(event, UtteranceEnd):
                self.stats["utterances"] += 1
            if channel.index is not None:
                message["channel"] = channel.index
            actions.append(Send(message))
        return actions

    def _done(self) -> list[Action]:
        reason, close_code = self._end
        self.state = "closed"
        done = {"type": "done", "reason": reason, "audio_seconds": round(self.audio_seconds, 3),
                "language": self.language, **self.stats, "elapsed": round(self._clock() - self._opened, 3)}
        return [Send(done), Close(close_code, reason)]

    def _error(self, code: str, message: str) -> list[Action]:
        self.stats["errors"] += 1
        return [Send(error_message(code, message))]

    def _fail(self, fatal: _Fatal) -> list[Action]:
        """Report an error that ends the stream, then finish it: audio received so far is still decoded."""
        actions = self._error(fatal.code, str(fatal))
        return actions if self.state == "ending" else actions + self._end_stream(fatal.code, fatal.close_code)

    def _too_large(self, size: int) -> _Fatal:
        return _Fatal("frame_too_large", f"message of {size} bytes exceeds the {self.max_message_bytes}-byte limit; "
                                         "send smaller chunks (e.g. 100 ms of audio each)", POLICY_VIOLATION)
