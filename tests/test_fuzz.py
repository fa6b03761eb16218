"""Hostile input: property-based fuzzing of the protocol session and of the real server on a loopback port.

Part one drives the sans-I/O :class:`Session` with random interleavings of text messages (random JSON, start
messages with random field types and values, malformed and oversize text), binary messages (random bytes, odd,
empty, tiny and oversize sizes, NaN floats, speech) and decode completions (fake replies, failures, stale
requests), and checks every action against the rules of docs/protocol.md. Part two sends random interleavings
of text, binary, fragmented and invalid UTF-8 frames to the real server (a tiny random Whisper, so decodes are
fast but produce words), checks the answers against the same rules and a replay of the frames through a
session, and checks after every example that the server still serves a well-formed stream. A flood test sends
thousands of small messages as fast as possible while a second stream must stay responsive. Part three sends
random frames (speech, random bytes, random and malformed JSON, random settings and events, oversize text) to
the Deepgram (``/v1/listen``) and OpenAI Realtime (``/v1/realtime``) WebSockets and checks that every answer is
in that API's own shape and error format, that no close is a server fault, and that the server stays healthy.

Hostile inputs per run (derandomized, so stable; the module prints the exact counts at its end): 1,000 session
examples with about 42,000 messages and decode completions; 60 server examples (12 for each way of ending)
with about 1,700 frames, each followed by a health stream; a flood of 5,000 binary and 2,000 text messages;
40 examples with about 330 frames on the two compatible APIs (it found JSON nested too deep for the parser
crashing their readers and Wyoming's).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import serve_in_thread
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from signals import vowel
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from streaming.core.session import MESSAGE_TYPES, Action, Close, EngineInfo, Run, Send, Session
from streaming.core.vad import VadConfig
from streaming.engine import Engine
from streaming.engine.alignment import WordTiming
from streaming.engine.inference import WindowReply, WindowRequest
from streaming.server import Server, ServerConfig

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
RATE = 16000
ENGLISH = EngineInfo("tiny.en", multilingual=False)
MULTI = EngineInfo("base", multilingual=True)
COUNTS: Counter[str] = Counter()  # hostile inputs tried, reported at the end of the module


# --- the rules, read from docs/protocol.md -----------------------------------------------------------


def _doc_rules() -> tuple[dict[str, set[str]], set[str], dict[str, int], dict[str, int | None], set[str]]:
    """Message key sets (from the examples), recoverable error codes, the codes that end a stream with
    ``done`` and their close codes, the other endings (``done`` reasons and refusals) with theirs (None: an
    HTTP refusal only), and the warning codes."""
    text = DOC.read_text(encoding="utf-8")
    examples = {name: set(json.loads(body)) for name, body in
                re.findall(r"<!-- example: (\w+) -->\s*```json\n(.*?)```", text, re.S)}
    section = text.split("## Errors and close codes")[1].split("## HTTP endpoints")[0]
    recoverable_part, rest = section.split("Ending the stream")
    ending_part, other_part = rest.split("Other endings")
    recoverable = set(re.findall(r"^\| `(\w+)` \| [^|\d]", recoverable_part, re.M))
    ending = {code: int(close) for code, close in re.findall(r"^\| `(\w+)` \| (\d{4}) \|", ending_part, re.M)}
    other = {code: int(close[0]) if (close := re.findall(r"\b1\d{3}\b", closing)) else None for code, closing in
             re.findall(r"^\| (?:\(none, `done` reason )?`(\w+)`\)? \| ([^|]*) \|", other_part, re.M)}
    warnings = text.split("### `warning`")[1].split("\n### ")[0]
    return examples, recoverable, ending, other, set(re.findall(r"^- `(\w+)`", warnings, re.M))


KEYS, RECOVERABLE, ENDING, OTHER, WARNINGS = _doc_rules()
KNOWN_TYPES = {"ready", "started", "partial", "final", "utterance_end", "language", "warning", "error", "done"}
ERROR_CODES = RECOVERABLE | set(ENDING) | set(OTHER) - {"stop", "shutdown"}
DONE_CLOSE = {**ENDING, "stop": OTHER["stop"], "shutdown": OTHER["shutdown"]}
SESSION_CLOSE_CODES = set(DONE_CLOSE.values()) | {OTHER["internal"]}
TOO_BIG, INVALID_UTF8 = 1009, 1007  # the WebSocket layer's own closes (RFC 6455)


def test_the_rules_were_read_from_the_doc() -> None:
    assert RECOVERABLE == {"bad_json", "unknown_type", "bad_audio", "audio_after_stop", "unexpected_text"}
    assert ENDING == {"bad_start": 1008, "unsupported_format": 1003, "start_too_late": 1008,
                      "frame_too_large": 1008, "idle_timeout": 1001}
    assert {"stop": 1000, "shutdown": 1001, "internal": 1011}.items() <= OTHER.items()
    assert {"capacity", "unauthorized"} <= set(OTHER) and OTHER["unauthorized"] is None
    assert {"audio_backlog", "client_lagging"} <= WARNINGS
    assert KNOWN_TYPES <= set(KEYS) and set(MESSAGE_TYPES) <= set(KEYS)


@pytest.fixture(scope="module", autouse=True)
def report_counts(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print how many hostile inputs the module tried (for the results table)."""
    yield
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if COUNTS and capture is not None:
        with capture.global_and_fixture_disabled():
            print("\nfuzz counts: " + ", ".join(f"{k}={v}" for k, v in sorted(COUNTS.items())))


# --- checking one stream's messages ------------------------------------------------------------------


@dataclass
class Checker:
    """Checks the messages of one stream, in order, against docs/protocol.md."""

    multilingual: bool
    started: dict | None = None
    finals: list[dict] = field(default_factory=list)
    partials: int = 0
    revisions: dict[int, int] = field(default_factory=dict)
    utterance_ends: int = 0
    languages: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    done: dict | None = None
    close_code: int | None = None

    def message(self, message: Any, audio_seconds: float) -> None:
        """One message; ``audio_seconds``: the most audio the stream can have received by now."""
        assert self.close_code is None and self.done is None, f"{message} after the end of the stream"
        assert isinstance(message, dict) and message.get("type") in KNOWN_TYPES, message
        json.dumps(message, allow_nan=False)  # valid JSON on the wire: no NaN or infinity
        kind = message["type"]
        keys = set(KEYS[kind])
        if kind == "final" and self.started is not None and not self.started["word_timestamps"]:
            keys.discard("words")
        assert set(message) == keys, message
        if kind in ("partial", "final", "utterance_end", "language"):
            assert self.started is not None, f"{kind} before started"
        for name in ("start", "end"):
            if name in message:
                assert 0 <= message[name] <= audio_seconds + 0.01, (message, audio_seconds)
        getattr(self, "_" + kind)(message)

    def _ready(self, message: dict) -> None:
        raise AssertionError(f"ready is only sent on connect: {message}")

    def _started(self, message: dict) -> None:
        assert self.started is None, "started twice"
        self.started = message
        if message["language"] is not None:
            assert message["language"] == "en" or self.multilingual

    def _partial(self, message: dict) -> None:
        assert self.started["interim_results"], "partial with interim_results false"
        segment = message["segment"]
        assert segment == self.utterance_ends, message
        assert message["revision"] > self.revisions.get(segment, -1), message
        assert message["start"] <= message["end"] and isinstance(message["text"], str)
        self.revisions[segment] = message["revision"]
        self.partials += 1

    def _final(self, message: dict) -> None:
        assert message["segment"] == self.utterance_ends, message
        assert message["text"] and message["start"] <= message["end"], message
        if self.finals:  # append-only: after the committed text
            assert message["start"] >= self.finals[-1]["end"] - 0.001, (self.finals[-1], message)
        words = message.get("words")
        if words is not None:
            assert words and "".join(w["word"] for w in words) == message["text"], message
            assert words[0]["start"] == message["start"] and words[-1]["end"] == message["end"], message
            for a, b in zip(words, words[1:]):
                assert a["start"] <= b["start"], message
            assert all(w["start"] <= w["end"] and 0 <= w["probability"] <= 1 for w in words), message
        self.finals.append(message)

    def _utterance_end(self, message: dict) -> None:
        assert message["segment"] == self.utterance_ends, message
        assert any(f["segment"] == message["segment"] for f in self.finals), "utterance_end without text"
        self.utterance_ends += 1

    def _language(self, message: dict) -> None:
        assert self.multilingual and self.started["language"] is None, message
        assert self.languages == 0, "language twice"
        assert 0 <= message["probability"] <= 1
        self.languages += 1

    def _error(self, message: dict) -> None:
        assert message["code"] in ERROR_CODES, message
        assert isinstance(message["message"], str) and message["message"].strip(), message
        self.errors.append(message["code"])

    def _warning(self, message: dict) -> None:
        assert message["code"] in WARNINGS, message
        assert isinstance(message["message"], str) and message["message"].strip(), message
        assert not (message["code"] == "audio_backlog" and "audio_backlog" in self.warnings), "audio_backlog twice"
        self.warnings.append(message["code"])

    def _done(self, message: dict) -> None:
        assert "internal" not in self.errors
        assert message["reason"] in DONE_CLOSE, message
        assert message["finals"] == len(self.finals), message
        if "client_lagging" in self.warnings:  # queued partials were dropped
            assert message["partials"] >= self.partials, message
        else:
            assert message["partials"] == self.partials, message
        assert message["utterances"] == self.utterance_ends and message["errors"] == len(self.errors), message
        if self.started is not None and self.started["word_timestamps"]:
            assert message["words"] == sum(len(f["words"]) for f in self.finals), message
        assert message["audio_seconds"] >= 0 and message["elapsed"] >= 0 and message["decodes"] >= 0
        if self.languages:
            assert message["language"] is not None
        self.done = message

    def close(self, code: int) -> None:
        assert self.close_code is None, "closed twice"
        if self.done is not None:
            assert code == DONE_CLOSE[self.done["reason"]], (code, self.done)
        else:  # no done: the only other ending is an internal error
            assert self.errors[-1:] == ["internal"] and code == OTHER["internal"], (code, self.errors)
        self.close_code = code


# --- inputs ------------------------------------------------------------------------------------------


def encode(audio: np.ndarray, encoding: str, channels: int) -> bytes:
    """Mono float audio as interleaved PCM."""
    audio = np.repeat(audio, channels)
    if encoding == "pcm_f32le":
        return audio.astype("<f4").tobytes()
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def filled(size: int, fill: str) -> bytes:
    """``size`` bytes of a pattern: zeros, ones, loud noise, or float32 NaN / infinity."""
    patterns = {"zero": b"\0", "ff": b"\xff", "nan": b"\x00\x00\xc0\x7f", "inf": b"\x00\x00\x80\x7f",
                "max": b"\xff\x7f"}
    if fill == "noise":
        return np.random.default_rng(size).bytes(size)
    pattern = patterns[fill]
    return (pattern * (size // len(pattern) + 1))[:size]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([10**400, -(10**400), 2**63, 2**64, 1e308, -0.0, 5e-324]) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)

# Allowed values (the first list) and wrong ones (the second) for every start field, boundaries included.
START_VALUES: dict[str, tuple[list, list]] = {
    "sample_rate": ([8000, 11025, 16000, 22050, 48000, 192000], [7999, 192001, 0, -16000, 16000.0, 10**400]),
    "encoding": (["pcm_s16le", "pcm_f32le"], ["opus", "", "PCM_S16LE"]),
    "channels": ([1, 2, 3, 8], [0, 9, 1.0, 10**400]),
    "language": ([None, "auto", "en"], ["es", "zh", "xx", "EN", ""]),
    "task": (["transcribe"], ["translate", "summarize"]),
    "prompt": ([None, "", "Kennedy, Beckett", "x" * 2000], ["x" * 2001]),
    "interim_results": ([True, False], [0, "true"]),
    "word_timestamps": ([True, False], [1, None]),
    "min_chunk": ([0.1, 0.3, 0.8, 10], [10.5, 0.05, 0, -1, 1e308, 10**400, "0.5"]),
    "agreement": ([1, 2, 5], [0, 6, 2.0, True, 10**400]),
    "final_context": ([0, 10, 30.0], [30.5, -1, 1e308, 10**400, "10", True]),
}
VAD_VALUES: dict[str, tuple[list, list]] = {
    "aggressiveness": ([0, 3], [4, -1]), "frame_ms": ([10, 20, 30], [25]),
    "pre_speech_pad_ms": ([0, 5000], [5001]), "hangover_ms": ([0, 300], [5001]),
    "endpoint_ms": ([300, 400, 60000], [0, 60001]),
    "short_utterance_ms": ([0, 1000, 10000], [-1, 10001]), "min_speech_ms": ([0, 2000], [2001]),
    "energy_floor_dbfs": ([-120, -55.5, 0], [1, -121, 10**400, -(10**400)]),
    "noise_margin_db": ([0, 6, 40], [-1, 41]), "noise_window_ms": ([300, 3000, 30000], [299, 30001]),
    "long_utterance_ms": ([1000, 60000], [999, 60001]), "long_endpoint_ms": ([30, 150, 300], [5, 60001]),
    "pause_ms": ([0, 30], [-1, 60001]),
}
assert set(VAD_VALUES) == set(VadConfig.__dataclass_fields__)


def _fields(values: dict[str, tuple[list, list]], allowed: bool) -> st.SearchStrategy[dict]:
    """Some of the fields, each with an allowed value, or with anything at all."""
    def value(good: list, bad: list) -> st.SearchStrategy:
        return st.sampled_from(good) if allowed else st.one_of(st.sampled_from(good + bad), JSON_VALUES)
    return st.fixed_dictionaries({}, optional={k: value(*v) for k, v in values.items()})


def _one_wrong(values: dict[str, tuple[list, list]]) -> st.SearchStrategy[dict]:
    """Allowed fields but one, which has a wrong value."""
    wrong = st.sampled_from(sorted(values)).flatmap(
        lambda k: st.tuples(st.just(k), st.one_of(st.sampled_from(values[k][1]), JSON_VALUES)))
    return st.builds(lambda fields, kv: {**fields, kv[0]: kv[1]}, _fields(values, True), wrong)


VAD = st.one_of(_fields(VAD_VALUES, True), _one_wrong(VAD_VALUES), _fields(VAD_VALUES, False),
                st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=2), JSON_VALUES)
GOOD_START = st.builds(lambda fields, vad: {**fields, "vad": vad}, _fields(START_VALUES, True),
                       _fields(VAD_VALUES, True))
WRONG_VAD = st.builds(lambda fields, vad: {**fields, "vad": vad}, _fields(START_VALUES, True), VAD)
START = st.builds(
    lambda fields, extra: {"type": "start", **fields, **extra},
    st.one_of(GOOD_START, _one_wrong(START_VALUES), WRONG_VAD, _fields(START_VALUES, False)),
    st.one_of(st.just({}), st.just({}), st.just({}), st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=2)))
CONTROL = st.builds(lambda kind, extra: {**extra, "type": kind}, st.sampled_from(["finalize", "stop"]),
                    st.one_of(st.just({}), st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=2)))
ODD_TYPES = st.builds(lambda kind: {"type": kind}, st.one_of(
    st.sampled_from(["", "STOP", "stop ", "Start", "ready", "done", "pause", "finalise"]), JSON_VALUES, st.text()))
ODD_TEXTS = st.sampled_from([
    "", " ", "null", "0", '"stop"', "[]", "{}", '{"type": null}', "[" * 3000, "[" * 5000 + "]" * 5000,
    '{"a": ' * 3000 + "1" + "}" * 3000, '\ufeff{"type": "stop"}', '{"type": "start", "min_chunk": NaN}',
    '{"type": "stop", "x": Infinity}', '{"type": "start", "min_chunk": 1e400}', '{"type": "start", "channels": '
    + "9" * 5000 + "}", '{"type": "stop"}{"type": "stop"}', '{"type": "finalize",}', "\x00", "\u2028",
])


def _dumps(message: Any, ascii_only: bool) -> str:
    return json.dumps(message, ensure_ascii=ascii_only)


MESSAGE = st.one_of(START, START, CONTROL, CONTROL, ODD_TYPES, JSON_VALUES)
TEXT = st.one_of(
    st.builds(_dumps, MESSAGE, st.booleans()),
    st.builds(lambda text, cut: text[:cut], st.builds(_dumps, MESSAGE, st.booleans()), st.integers(0, 40)),
    ODD_TEXTS, st.text(max_size=40))
# Sizes relative to the message limit L, resolved when the limit is known: (multiple of L, bytes added).
SIZES = st.one_of(st.sampled_from([(0, 0), (0, 1), (0, 2), (0, 3), (0, 5), (0, 7), (0, 8), (1, -1), (1, 0), (1, 1),
                                   (2, 0), (2, 1), (3, 0)]), st.tuples(st.just(0), st.integers(0, 5000)))
FILLS = st.sampled_from(["zero", "ff", "noise", "nan", "inf", "max"])

# Session operations: ("text", str), ("bigtext", size, json-wrapped), ("bytes", raw), ("fill", size, fill),
# ("speech", tenths, chunk tenths), ("silence", tenths), ("complete", reply kind), ("stale",), ("timeout",),
# ("drain",).
REPLY_KINDS = ["steady", "steady", "steady", "empty", "silence", "jitter", "punct", "lang", "fail"]
OPERATION = st.one_of(
    st.tuples(st.just("text"), TEXT), st.tuples(st.just("text"), TEXT),
    st.tuples(st.just("bigtext"), SIZES, st.booleans()),
    st.tuples(st.just("bytes"), st.binary(max_size=64)),
    st.tuples(st.just("fill"), SIZES, FILLS),
    st.tuples(st.just("speech"), st.integers(1, 25), st.integers(1, 10)),
    st.tuples(st.just("speech"), st.integers(1, 25), st.integers(1, 10)),
    st.tuples(st.just("speech"), st.integers(1, 25), st.integers(1, 10)),
    st.tuples(st.just("silence"), st.integers(1, 10)), st.tuples(st.just("silence"), st.integers(1, 10)),
    st.tuples(st.just("complete"), st.sampled_from(REPLY_KINDS)),
    st.tuples(st.just("complete"), st.sampled_from(REPLY_KINDS)),
    st.tuples(st.just("complete"), st.sampled_from(REPLY_KINDS)),
    st.tuples(st.sampled_from(["stale", "timeout", "drain"])),
)


def resolve(size: tuple[int, int], limit: int) -> int:
    return max(0, size[0] * limit + size[1])


def big_text(size: int, wrapped: bool) -> str:
    """A text message of exactly ``size`` UTF-8 bytes (two-byte characters where possible)."""
    if not wrapped:
        return "é" * (size // 2) + "x" * (size % 2)
    head, tail = '{"type": "start", "prompt": "', '"}'
    body = max(0, size - len(head) - len(tail))
    return head + "é" * (body // 2) + "x" * (body % 2) + tail


def fake_reply(request: WindowRequest, kind: str, serial: int) -> WindowReply:
    """What a decode might return for ``request``: words inside the window, after its forced prefix."""
    seconds = len(request.audio) / RATE
    n = int(seconds / 0.4)
    language = ("es" if serial % 2 else "en") if kind == "lang" else "en"
    if kind in ("empty", "silence"):
        return WindowReply(language=language, silence=kind == "silence", no_speech_prob=0.9 if kind == "silence" else 0)
    words = []
    for k in range(n):
        text = f" w{k}" + ("." if kind == "punct" and k % 3 == 2 else "")
        token = k + 1000 * (serial % 7) if kind == "jitter" else k
        words.append(WordTiming(f" v{serial % 5}k{k}" if kind == "jitter" else text, (token,), k * 0.4,
                                min(seconds, k * 0.4 + 0.35), 0.5 + 0.05 * (k % 10)))
    return WindowReply(words=words[len(request.prefix):], language=language, language_probability=0.8)


# --- part one: the sans-I/O session ------------------------------------------------------------------


def expected_text(text: str, state: str, limit: int) -> set[str]:
    """What the protocol owes a text message in ``state``: error codes, ``started``, or ``ok`` (nothing)."""
    if len(text.encode()) > limit:
        return {"frame_too_large"}
    try:
        message = json.loads(text, parse_constant=_not_json)
    except (ValueError, RecursionError):
        return {"bad_json"}
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        return {"bad_json"}
    if message["type"] not in MESSAGE_TYPES:
        return {"unknown_type"}
    if state == "ending":
        return {"unexpected_text"}
    if message["type"] == "start":
        return {"started", "bad_start", "unsupported_format"} if state == "new" else {"start_too_late"}
    return {"ok"}


def _not_json(literal: str) -> Any:
    raise ValueError(f"{literal} is not JSON")  # NaN, Infinity, -Infinity: Python's json accepts them


@dataclass
class Harness:
    """Drives one session, keeps its decodes pending until an operation completes them, checks everything."""

    session: Session
    checker: Checker
    limit: int
    pending: list[WindowRequest] = field(default_factory=list)
    finished: list[WindowRequest] = field(default_factory=list)
    runs: int = 0
    frames: int = 0  # input frames accepted: the audio_seconds oracle
    fmt: tuple[int, str, int] = (RATE, "pcm_s16le", 1)
    end_reason: str | None = None
    audio_after_stop_reported: bool = False
    serial: int = 0

    def apply(self, actions: list[Action]) -> list[dict]:
        sent = []
        for i, action in enumerate(actions):
            assert self.checker.close_code is None, f"{action} after Close"
            if isinstance(action, Run):
                assert not self.pending, "two decodes in flight"
                self.pending.append(action.request)
                self.runs += 1
            elif isinstance(action, Send):
                self.checker.message(action.message, self.session.audio_seconds)
                if action.message["type"] in ("final", "error", "done"):
                    COUNTS[f"session {action.message['type']}s"] += 1
                sent.append(action.message)
                if action.message["type"] == "started":
                    m = action.message
                    self.fmt = (m["sample_rate"], m["encoding"], m["channels"])
            else:
                assert isinstance(action, Close) and i == len(actions) - 1, "Close is the last action"
                assert action.code in SESSION_CLOSE_CODES
                self.checker.close(action.code)
                assert self.session.closed
        return sent

    def _check_done(self, done: dict) -> None:
        assert done["reason"] == self.end_reason and done["decodes"] == self.runs, (done, self.end_reason)
        rate = self.fmt[0]
        assert done["audio_seconds"] == pytest.approx(self.frames / rate, abs=0.0006 if rate == RATE else 0.005)

    def call(self, method: Callable[..., list[Action]], *args: Any) -> list[dict]:
        COUNTS["session inputs"] += 1
        before, audio = self.session.state, self.session.audio_seconds
        sent = self.apply(method(*args))
        codes = [m["code"] for m in sent if m["type"] == "error"]
        if before in ("new", "streaming") and self.session.state in ("ending", "closed") and self.end_reason is None:
            ending = [c for c in codes if c in ENDING]
            self.end_reason = ending[0] if ending else {"drain": "shutdown", "timed_out": "idle_timeout"}.get(
                method.__name__, "stop")
        if self.checker.done is not None and before != "closed":
            self._check_done(self.checker.done)
        if before in ("ending", "closed"):
            assert self.session.audio_seconds == audio, "audio accepted after the stream ended"
        if before == "closed":
            assert sent == [] and self.session.closed
        return sent

    def text(self, text: str) -> None:
        before = self.session.state
        sent = self.call(self.session.receive_text, text)
        if before == "closed":
            return
        codes = [m["code"] for m in sent if m["type"] == "error"]
        expected = expected_text(text, before, self.limit)
        got = codes[0] if codes else sent[0]["type"] if sent and sent[0]["type"] == "started" else "ok"
        assert got in expected, (text[:200], before, sent)
        assert len(codes) <= 1

    def binary(self, data: bytes) -> None:
        before = self.session.state
        sent = self.call(self.session.receive_bytes, data)
        codes = [m["code"] for m in sent if m["type"] == "error"]
        if before == "closed":
            return
        if before == "ending":
            assert codes == ([] if self.audio_after_stop_reported else ["audio_after_stop"]), codes
            self.audio_after_stop_reported = True
            return
        if len(data) > self.limit:
            assert codes == ["frame_too_large"] and "started" not in [m["type"] for m in sent], sent
            return
        if before == "new":
            assert sent and sent[0]["type"] == "started", sent
        _, encoding, channels = self.fmt  # as started says
        frame = (4 if encoding == "pcm_f32le" else 2) * channels
        bad = len(data) % frame != 0 or (
            encoding == "pcm_f32le" and not np.isfinite(np.frombuffer(data, "<f4")).all())
        assert codes == (["bad_audio"] if bad else []), (len(data), self.fmt, codes)
        if not bad:
            self.frames += len(data) // frame

    def complete(self, kind: str) -> None:
        if not self.pending:
            return self.stale()
        request = self.pending.pop()
        self.finished.append(request)
        self.serial += 1
        result = RuntimeError("decode failed") if kind == "fail" else fake_reply(request, kind, self.serial)
        sent = self.call(self.session.complete, request, result)
        if kind == "fail":
            assert [m["type"] for m in sent] == ["error"] and self.checker.close_code == OTHER["internal"], sent
        else:
            assert "internal" not in self.checker.errors

    def stale(self) -> None:
        """A reply for a request that is not in flight (already completed, or never issued) changes nothing."""
        request = self.finished[-1] if self.finished else WindowRequest(np.zeros(RATE, np.float32))
        assert self.call(self.session.complete, request, fake_reply(request, "steady", 0)) == []

    def finish(self) -> None:
        """Stop (if still open), then complete decodes until the session closes."""
        if self.session.state in ("new", "streaming"):
            self.text('{"type": "stop"}')
        for _ in range(200):
            if self.session.closed:
                break
            assert self.pending, "the session neither closed nor asked for a decode"
            self.complete("steady")
        assert self.session.closed and self.checker.close_code in SESSION_CLOSE_CODES
        assert self.checker.done is not None or self.checker.errors[-1] == "internal"


def run_operation(h: Harness, op: tuple) -> None:
    kind = op[0]
    if kind == "text":
        h.text(op[1])
    elif kind == "bigtext":
        h.text(big_text(resolve(op[1], h.limit), op[2]))
    elif kind == "bytes":
        h.binary(op[1])
    elif kind == "fill":
        h.binary(filled(resolve(op[1], h.limit), op[2]))
    elif kind in ("speech", "silence"):
        rate, encoding, channels = h.fmt
        audio = vowel(op[1] / 10, rate=rate) if kind == "speech" else np.zeros(round(op[1] * rate / 10), np.float32)
        step = max(1, round((op[2] if kind == "speech" else 2) * rate / 10))
        step = min(step, h.limit // ((4 if encoding == "pcm_f32le" else 2) * channels))
        for at in range(0, min(len(audio), 60 * step), step):  # at most 60 messages (192 kHz x 8 channels)
            h.binary(encode(audio[at:at + step], encoding, channels))
    elif kind == "complete":
        h.complete(op[1])
    elif kind == "stale":
        h.stale()
    elif kind == "timeout":
        before = h.session.state
        sent = h.call(h.session.timed_out, 30.0)
        assert [m["code"] for m in sent if m["type"] == "error"] == (
            ["idle_timeout"] if before in ("new", "streaming") else [])
    else:
        h.call(h.session.drain)


# 1,000 examples of up to 30 operations: about 42,000 session inputs (COUNTS["session inputs"]).
@settings(max_examples=1000, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.one_of(st.none(), st.builds(_dumps, GOOD_START.map(lambda m: {"type": "start", **m}), st.booleans()),
                 st.builds(_dumps, START, st.booleans())),
       st.lists(OPERATION, min_size=1, max_size=30), st.booleans(), st.sampled_from([ENGLISH, MULTI]),
       st.sampled_from([1024, 4096]))
def test_any_interleaving_keeps_the_session_within_the_protocol(opening: str | None, ops: list[tuple], eager: bool,
                                                                engine: EngineInfo, limit: int) -> None:
    """``eager``: every decode is completed (with a steady reply) right after the operation that asked for it,
    so that long streams commit text; otherwise decodes wait for "complete" operations."""
    COUNTS["session examples"] += 1
    session = Session(engine, session_id="fuzz", max_message_bytes=limit)
    [ready] = session.open()
    assert isinstance(ready, Send) and set(ready.message) == KEYS["ready"]
    assert ready.message["max_message_bytes"] == limit
    harness = Harness(session, Checker(engine.multilingual), limit)
    if opening is not None:  # most start messages only count before any audio
        harness.text(opening)
    for op in ops:
        run_operation(harness, op)
        while eager and harness.pending and not session.closed:
            harness.complete("steady")
    harness.finish()
    assert session.receive_text('{"type": "stop"}') == [] and session.receive_bytes(b"\0\0") == []
    assert session.timed_out(1) == [] and session.drain() == []


def test_huge_integers_in_start_are_bad_start_not_a_crash() -> None:
    """Regression: ``math.isfinite`` overflowed on integers beyond float range (1e400 written out)."""
    for fields in ({"min_chunk": 10**400}, {"vad": {"energy_floor_dbfs": -10**400}}):
        session = Session(ENGLISH)
        session.open()
        sent = [a.message for a in session.receive_text(json.dumps({"type": "start", **fields}))
                if isinstance(a, Send)]
        assert [m["type"] for m in sent] == ["error", "done"] and sent[0]["code"] == "bad_start", sent


def test_a_short_utterance_on_a_multilingual_model_reports_its_language_before_its_final() -> None:
    """Found by the fuzzer: 0.6 s of speech, one interim decode (language "en", nothing committed yet), a
    pause: the endpoint commits the words without another decode, so the ``final`` goes out before any
    ``language`` (which only a later decode sends)."""
    session = Session(MULTI)
    session.open()
    sent: list[dict] = []
    options = {"type": "start", "vad": {"hangover_ms": 300, "endpoint_ms": 300}, "min_chunk": 0.8, "agreement": 2}
    actions = session.receive_text(json.dumps(options))
    pcm = encode(np.concatenate([vowel(0.6), np.zeros(RATE * 3 // 10, np.float32), vowel(0.2)]), "pcm_s16le", 1)
    actions += [a for at in range(0, len(pcm), 1600) for a in session.receive_bytes(pcm[at:at + 1600])]
    actions += session.receive_text('{"type": "stop"}')
    while actions:
        action = actions.pop(0)
        if isinstance(action, Run):
            actions[:0] = session.complete(action.request, fake_reply(action.request, "steady", 0))
        elif isinstance(action, Send):
            sent.append(action.message)
    kinds = [m["type"] for m in sent]
    assert "final" in kinds and sent[-1]["type"] == "done"
    assert "language" in kinds and kinds.index("language") < kinds.index("final") and sent[-1]["language"] == "en"


# --- part two: the real server -----------------------------------------------------------------------

LIMIT = 4096  # the fuzzed server's max_message_bytes: oversize frames stay cheap


def running(engine: Engine) -> contextlib.AbstractContextManager[Server]:
    """The real server on a free loopback port, its event loop in a thread of its own."""
    return serve_in_thread(lambda: Server(engine, ServerConfig(port=0, max_message_bytes=LIMIT, max_streams=4)))


class Complaints(logging.Handler):
    """Warnings and errors logged anywhere (the server logs faults it survives, e.g. a failed handler)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.name}: {record.getMessage()}")


@pytest.fixture(scope="module")
def complaints() -> Iterator[Complaints]:
    handler = Complaints()
    logging.getLogger().addHandler(handler)
    yield handler
    logging.getLogger().removeHandler(handler)


@pytest.fixture(scope="module")
def server(tiny_engine: Engine) -> Iterator[Server]:
    with running(tiny_engine) as server:
        yield server


def healthz(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:  # 503: draining or full
        return exc.code, json.loads(exc.read())


async def receive_until_closed(ws: ClientConnection, into: list[dict]) -> None:
    with contextlib.suppress(ConnectionClosed):
        while True:
            into.append(json.loads(await ws.recv()))


async def healthy_stream(url: str) -> dict:
    """A well-formed stream (speech, a pause, stop): ``ready`` promptly, ``done`` and 1000 at the end."""
    async with asyncio.timeout(30), connect(url) as ws:
        async with asyncio.timeout(5):
            assert json.loads(await ws.recv())["type"] == "ready"
        pcm = encode(np.concatenate([vowel(1.0), np.zeros(RATE // 2, np.float32)]), "pcm_s16le", 1)
        for at in range(0, len(pcm), 3200):
            await ws.send(pcm[at:at + 3200])
        await ws.send('{"type": "stop"}')
        messages: list[dict] = []
        await receive_until_closed(ws, messages)
    assert messages[0]["type"] == "started" and messages[-1]["type"] == "done", messages
    assert messages[-1]["reason"] == "stop" and ws.close_code == 1000
    assert messages[-1]["audio_seconds"] == pytest.approx(1.5)
    return messages[-1]


async def wait_idle(port: int) -> None:
    """/healthz answers and every stream is gone (a client that left frees its stream at once)."""
    for _ in range(100):
        status, body = await asyncio.to_thread(healthz, port)
        assert status in (200, 503)
        if body["active_streams"] == 0:
            assert status == 200 and body["status"] == "ok"
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"streams still open: {body}")


@dataclass
class Replay:
    """The frames replayed through a session whose decodes never finish: the most the server may answer."""

    codes: list[str]
    codes_at_end: int | None  # errors owed before the stream began ending (None: it never did)
    reason: str | None
    audio_seconds: float

    @classmethod
    def of(cls, frames: list[str | bytes], multilingual: bool) -> Replay:
        session = Session(EngineInfo("tiny-random", multilingual), max_message_bytes=LIMIT)
        session.open()
        codes: list[str] = []
        codes_at_end = reason = None
        for frame in frames:
            before = session.state
            actions = session.receive_text(frame) if isinstance(frame, str) else session.receive_bytes(frame)
            batch = [a.message["code"] for a in actions if isinstance(a, Send) and a.message["type"] == "error"]
            codes += batch
            if reason is None and before in ("new", "streaming") and session.state in ("ending", "closed"):
                ending = [c for c in batch if c in ENDING]
                reason, codes_at_end = (ending[0] if ending else "stop"), len(codes)
        return cls(codes, codes_at_end, reason, session.audio_seconds)


# Server frames: ("text", str), ("bigtext", size), ("bytes", raw), ("fill", size, fill), ("speech", tenths),
# ("fragments", pieces), ("sleep", ms). The stream then ends with stop, a close, an abort (the TCP connection
# dropped), a text frame of invalid UTF-8 or a message over twice the limit (both refused by the WebSocket layer).
FRAME = st.one_of(
    st.tuples(st.just("text"), TEXT), st.tuples(st.just("text"), TEXT), st.tuples(st.just("text"), TEXT),
    st.tuples(st.just("bigtext"), SIZES, st.booleans()),
    st.tuples(st.just("bytes"), st.binary(max_size=64)), st.tuples(st.just("bytes"), st.binary(max_size=64)),
    st.tuples(st.just("fill"), SIZES, FILLS),
    st.tuples(st.just("speech"), st.integers(1, 30)), st.tuples(st.just("speech"), st.integers(1, 30)),
    st.tuples(st.just("speech"), st.integers(1, 30)), st.tuples(st.just("fill"), st.just((0, 16000)), st.just("zero")),
    st.tuples(st.just("fragments"), st.lists(st.binary(max_size=40), min_size=2, max_size=4)),
    st.tuples(st.just("sleep"), st.integers(0, 30)),
)
ENDINGS = ["stop", "close", "abort", "utf8", "oversize"]
INVALID_UTF8_TEXTS = [b"\xff", b'{"type": "stop"\xc0}', b"\xed\xa0\x80", b"ok\xe2\x82"]


def wire(frame: tuple) -> list[str | bytes | list[bytes]]:
    """What one frame operation sends: zero or more WebSocket messages."""
    kind = frame[0]
    if kind == "text":
        return [frame[1]]
    if kind == "bigtext":
        return [big_text(resolve(frame[1], LIMIT), frame[2])]
    if kind == "bytes":
        return [frame[1]]
    if kind == "fill":
        return [filled(resolve(frame[1], LIMIT), frame[2])]
    if kind == "speech":
        pcm = encode(vowel(frame[1] / 10), "pcm_s16le", 1)
        return [pcm[at:at + LIMIT] for at in range(0, len(pcm), LIMIT)]
    if kind == "fragments":
        return [list(frame[1])]
    return []


def cut_off_by_websockets(message: str | bytes | list[bytes]) -> int | None:
    """The close code with which the WebSocket layer refuses ``message`` before the session sees it."""
    data = b"".join(message) if isinstance(message, list) else message
    size = len(data.encode()) if isinstance(data, str) else len(data)
    return TOO_BIG if size > 2 * LIMIT else None


async def hostile_stream(url: str, frames: list[tuple], ending: str) -> tuple[list[dict], int | None, list, int | None]:
    """Send the frames, end as told; returns the replies, the close code, what the session saw, and the close
    code of the WebSocket layer's refusal if a frame was refused."""
    replies: list[dict] = []
    seen: list[str | bytes] = []
    refused = None
    async with asyncio.timeout(60):
        ws = await connect(url)
        ready = json.loads(await ws.recv())
        assert ready["type"] == "ready" and ready["max_message_bytes"] == LIMIT
        receiver = asyncio.create_task(receive_until_closed(ws, replies))
        try:
            for frame in frames:
                if frame[0] == "sleep":
                    await asyncio.sleep(frame[1] / 1000)
                    continue
                for message in wire(frame):
                    COUNTS["server frames"] += 1
                    if (code := cut_off_by_websockets(message)) is not None:
                        refused = refused or code
                    elif refused is None:
                        seen.append(b"".join(message) if isinstance(message, list) else message)
                    await ws.send(message)
            if ending == "stop":
                await ws.send('{"type": "stop"}')
                if refused is None:
                    seen.append('{"type": "stop"}')
            elif ending == "close":
                await ws.close()
            elif ending == "utf8":
                refused = refused or INVALID_UTF8
                COUNTS["server frames"] += 1
                await ws.send(INVALID_UTF8_TEXTS[len(frames) % len(INVALID_UTF8_TEXTS)], text=True)
            elif ending == "oversize":
                refused = refused or TOO_BIG
                COUNTS["server frames"] += 1
                await ws.send(filled(2 * LIMIT + 1 + len(frames), "noise"))
        except ConnectionClosed:
            pass
        if ending == "abort":
            ws.transport.abort()
            receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await receiver
        await ws.wait_closed()
    return replies, ws.close_code, seen, refused


def check_server_replies(replies: list[dict], close_code: int | None, seen: list[str | bytes], refused: int | None,
                         ending: str) -> None:
    replay = Replay.of(seen, multilingual=False)
    checker = Checker(multilingual=False)
    for message in replies:
        checker.message(message, replay.audio_seconds)
    assert "internal" not in checker.errors and close_code != OTHER["internal"], replies
    assert checker.errors == replay.codes[:len(checker.errors)], (checker.errors, replay.codes)
    if checker.done is not None:
        assert replay.reason is not None and checker.done["reason"] == replay.reason, (checker.done, replay)
        assert len(checker.errors) >= replay.codes_at_end
        assert checker.done["audio_seconds"] == pytest.approx(replay.audio_seconds, abs=0.0006)
        if ending != "abort":
            assert close_code in (DONE_CLOSE[replay.reason], refused), (close_code, checker.done)
    elif ending == "stop" and refused is None:
        raise AssertionError(f"stop without done: {replies[-3:]}, close {close_code}")
    elif ending != "abort":
        assert close_code in {refused, 1000}, (close_code, refused, replies[-3:])


# 5 endings x 12 examples of 4 to 30 frame operations: about 1,700 hostile frames (COUNTS["server frames"]),
# each example followed by a health stream and a /healthz check.
@pytest.mark.parametrize("ending", ENDINGS)
@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(frames=st.builds(lambda opening, rest: opening + rest, st.one_of(st.just([]), GOOD_START.map(
    lambda m: [("text", json.dumps({"type": "start", **m}))])), st.lists(FRAME, min_size=4, max_size=30)))
def test_random_frames_get_protocol_answers_and_the_server_stays_up(server: Server, complaints: Complaints,
                                                                    frames: list[tuple], ending: str) -> None:
    COUNTS["server examples"] += 1
    COUNTS[f"server ending {ending}"] += 1

    async def example() -> None:
        replies, close_code, seen, refused = await hostile_stream(server.url, frames, ending)
        COUNTS[f"server closes {close_code}"] += 1
        COUNTS["server finals"] += sum(m["type"] == "final" for m in replies)
        COUNTS["server errors"] += sum(m["type"] == "error" for m in replies)
        check_server_replies(replies, close_code, seen, refused, ending)
        await wait_idle(server.port)
        await healthy_stream(server.url)
        await wait_idle(server.port)

    asyncio.run(example())
    assert not complaints.records, complaints.records


FLOOD_BINARY, FLOOD_TEXT = 5000, 2000
FLOOD_TEXTS = ['{"type": "finalize"}', "x", '{"type": "pause"}', '{"type": "finalize", "n": 1}', "[]"]


def test_a_flood_of_small_messages_leaves_another_stream_responsive(tiny_engine: Engine,
                                                                     complaints: Complaints) -> None:
    """5,000 tiny binary and 2,000 text messages as fast as the socket takes them; meanwhile /healthz answers
    and a second stream, opened just before, streams and gets its ``done`` promptly. (A fresh server: one that
    has measured its load may refuse the second stream as ``overloaded``, which is not what is tested here.)"""
    COUNTS["flood messages"] += FLOOD_BINARY + FLOOD_TEXT
    noise = filled(FLOOD_BINARY * 32, "noise")
    bad_texts = sum(FLOOD_TEXTS[i % len(FLOOD_TEXTS)] in ("x", '{"type": "pause"}', "[]") for i in range(FLOOD_TEXT))

    async def flood(url: str, go: asyncio.Event) -> tuple[list[dict], float]:
        async with connect(url) as ws:
            assert json.loads(await ws.recv())["type"] == "ready"
            replies: list[dict] = []
            receiver = asyncio.create_task(receive_until_closed(ws, replies))
            await go.wait()
            for i in range(FLOOD_BINARY):
                await ws.send(noise[32 * i:32 * (i + 1)])
                if i % 5 == 4:
                    for k in (i // 5 * 2, i // 5 * 2 + 1):
                        await ws.send(FLOOD_TEXTS[k % len(FLOOD_TEXTS)])
            await ws.send('{"type": "stop"}')
            async with asyncio.timeout(120):
                await receiver
        return replies, time.monotonic()

    async def probe(url: str, port: int, go: asyncio.Event) -> tuple[float, float, float]:
        """The other stream, from the start of the flood: seconds to /healthz, to ``started``, to ``done``."""
        async with asyncio.timeout(30), connect(url) as ws:
            assert json.loads(await ws.recv())["type"] == "ready"
            go.set()
            began = time.monotonic()
            status, _ = await asyncio.to_thread(healthz, port)
            health = time.monotonic() - began
            assert status == 200
            pcm = encode(np.concatenate([vowel(1.0), np.zeros(RATE // 2, np.float32)]), "pcm_s16le", 1)
            await ws.send(pcm[:3200])
            assert json.loads(await ws.recv())["type"] == "started"
            started = time.monotonic() - began
            for at in range(3200, len(pcm), 3200):
                await ws.send(pcm[at:at + 3200])
            await ws.send('{"type": "stop"}')
            messages: list[dict] = []
            await receive_until_closed(ws, messages)
        assert messages[-1]["type"] == "done" and ws.close_code == 1000, messages[-2:]
        return health, started, time.monotonic() - began

    async def both(server: Server) -> None:
        go = asyncio.Event()
        began = time.monotonic()
        (replies, flood_done), (health, started, done_after) = await asyncio.gather(
            flood(server.url, go), probe(server.url, server.port, go))
        checker = Checker(multilingual=False)
        for message in replies:
            checker.message(message, FLOOD_BINARY * 16 / RATE)
        done = checker.done
        assert done is not None and done["reason"] == "stop", replies[-3:]
        assert len(checker.errors) == bad_texts and set(checker.errors) == {"bad_json", "unknown_type"}
        assert done["audio_seconds"] == pytest.approx(FLOOD_BINARY * 16 / RATE)
        assert health < 2 and started < 2 and done_after < 20, (health, started, done_after)
        COUNTS["flood ms"] = round(1000 * (flood_done - began))
        COUNTS["flood probe done ms"] = round(1000 * done_after)
        await wait_idle(server.port)

    with running(tiny_engine) as server:
        asyncio.run(both(server))
    assert not complaints.records, complaints.records


# --- part three: the Deepgram and OpenAI Realtime WebSockets ------------------------------------------

DEEPGRAM_QUERY = "/v1/listen?encoding=linear16&sample_rate=16000&channels=1&interim_results=true&utterance_end_ms=1000"
DEEPGRAM_TYPES = {"Results", "SpeechStarted", "UtteranceEnd", "Metadata", "Error"}
REALTIME_TYPES = {"session.created", "session.updated", "transcription_session.updated", "input_audio_buffer.cleared",
                  "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                  "input_audio_buffer.committed", "conversation.item.input_audio_transcription.delta",
                  "conversation.item.input_audio_transcription.completed", "error"}
API_CLOSES = {1000, TOO_BIG, INVALID_UTF8, 1008}  # never 1011: a fault of the server's own
SPEECH_PCM = encode(vowel(0.9), "pcm_s16le", 1)
SETTINGS = st.dictionaries(st.sampled_from(["type", "audio", "input_audio_format", "input_audio_transcription",
                                            "turn_detection", "include", "model"]), JSON_VALUES, max_size=4)
REALTIME_EVENT = st.one_of(
    st.builds(lambda s, flavor: {"type": f"{flavor}.update", "session": s}, SETTINGS | JSON_VALUES,
              st.sampled_from(["session", "transcription_session"])),
    st.builds(lambda audio: {"type": "input_audio_buffer.append", "audio": audio},
              st.one_of(st.integers(0, 2000).map(lambda n: base64.b64encode(SPEECH_PCM[:n]).decode()),
                        st.text(max_size=20), JSON_VALUES)),
    st.sampled_from([{"type": "input_audio_buffer.commit"}, {"type": "input_audio_buffer.clear"},
                     {"type": "response.create"}, {"type": 7}, {}, []]),
    st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=3),
)
API_FRAME = {
    "deepgram": st.one_of(
        st.integers(0, 4000).map(lambda n: SPEECH_PCM[:n]), st.binary(max_size=64),
        st.sampled_from(['{"type": "KeepAlive"}', '{"type": "Finalize"}', '{"type": "Nope"}', "x", "[]", "null"]),
        TEXT),
    "openai": st.one_of(REALTIME_EVENT.map(json.dumps), REALTIME_EVENT.map(json.dumps), TEXT, st.binary(max_size=64),
                        st.just("y" * (LIMIT + 1))),
}


def check_api_message(api: str, message: Any) -> None:
    """One server message in the API's own shape; errors in its error format."""
    assert isinstance(message, dict), message
    if api == "deepgram":
        assert message.get("type") in DEEPGRAM_TYPES, message
        if message["type"] == "Error":
            assert isinstance(message["description"], str) and isinstance(message["variant"], str), message
    else:
        assert message.get("type") in REALTIME_TYPES, message
        if message["type"] == "error":
            error = message["error"]
            assert {"type", "code", "message"} <= set(error) and all(isinstance(error[k], str) for k in
                                                                     ("type", "code", "message")), message


async def hostile_api_stream(port: int, api: str, frames: list[str | bytes], ending: str) -> tuple[list, int | None]:
    """Send the frames to the API's WebSocket, then end (the API's close message, or a plain close)."""
    path = DEEPGRAM_QUERY if api == "deepgram" else "/v1/realtime?intent=transcription"
    replies: list = []
    async with asyncio.timeout(60), connect(f"ws://127.0.0.1:{port}{path}", max_size=None) as ws:
        receiver = asyncio.create_task(receive_until_closed(ws, replies))
        with contextlib.suppress(ConnectionClosed):
            for frame in frames:
                await ws.send(frame)
            if ending == "api":
                await ws.send(json.dumps({"type": "CloseStream" if api == "deepgram" else "input_audio_buffer.commit"}))
                if api == "openai":
                    await asyncio.sleep(0.5)  # a Realtime session has no end message: let its last events come
                    await ws.close()
            else:
                await ws.close()
        await receiver
    return replies, ws.close_code


# 2 APIs x 2 endings x 10 examples of 3 to 20 frames, each followed by a health stream of our own protocol.
@pytest.mark.parametrize("api", ["deepgram", "openai"])
@pytest.mark.parametrize("ending", ["api", "close"])
@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_frames_on_the_compatible_apis_get_answers_in_their_format(server: Server, complaints: Complaints,
                                                                          api: str, ending: str, data) -> None:
    frames = data.draw(st.lists(API_FRAME[api], min_size=3, max_size=20))
    COUNTS[f"{api} frames"] += len(frames)

    async def example() -> None:
        replies, close_code = await hostile_api_stream(server.port, api, frames, ending)
        for message in replies:
            check_api_message(api, message)
        assert close_code in API_CLOSES, (close_code, replies[-3:])
        if api == "deepgram" and ending == "api" and close_code == 1000:
            assert replies and replies[-1]["type"] == "Metadata", replies[-3:]
        await wait_idle(server.port)
        await healthy_stream(server.url)
        await wait_idle(server.port)

    asyncio.run(example())
    assert not complaints.records, complaints.records
