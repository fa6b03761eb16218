"""Tests for the sans-I/O protocol session (streaming.core.session) with a fake decoder: no model, no sockets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from signals import vowel

from streaming.core.session import (
    GOING_AWAY,
    INTERNAL_ERROR,
    NORMAL,
    POLICY_VIOLATION,
    START_FIELDS,
    UNSUPPORTED_DATA,
    Action,
    Close,
    EngineInfo,
    Run,
    Send,
    Session,
    refusal,
)
from streaming.engine.alignment import WordTiming
from streaming.engine.inference import WindowReply, WindowRequest

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
RATE = 16000
ENGLISH = EngineInfo("tiny.en", multilingual=False)
MULTI = EngineInfo("base", multilingual=True)


def doc_examples() -> dict[str, dict]:
    """The labelled JSON examples of docs/protocol.md (``<!-- example: NAME -->`` then a json block)."""
    found = re.findall(r"<!-- example: (\w+) -->\s*```json\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    return {name: json.loads(body) for name, body in found}


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def utterance(speech: float = 2.0, pause: float = 1.0) -> bytes:
    return pcm16(np.concatenate([np.zeros(RATE // 4, np.float32), vowel(speech), np.zeros(int(pause * RATE),
                                                                                          np.float32)]))


def fake_reply(request: WindowRequest) -> WindowReply:
    """One word per 0.4 s of window audio, ``" wK"`` with token K; words already forced as prefix are left out."""
    n = int(len(request.audio) / RATE / 0.4)
    words = [WordTiming(f" w{k}", (k,), k * 0.4, k * 0.4 + 0.35, 0.9) for k in range(n)]
    return WindowReply(words=words[len(request.prefix):], language="en")


def run_all(session: Session, actions: list[Action]) -> list[Send | Close]:
    """Execute Run actions at once with the fake decoder; return everything else in order."""
    out: list[Send | Close] = []
    todo = list(actions)
    while todo:
        action = todo.pop(0)
        if isinstance(action, Run):
            todo[:0] = session.complete(action.request, fake_reply(action.request))
        else:
            out.append(action)
    return out


def messages(actions: list[Send | Close]) -> list[dict]:
    return [a.message for a in actions if isinstance(a, Send)]


def types(actions: list[Send | Close]) -> list[str]:
    return [m["type"] for m in messages(actions)]


def closes(actions: list[Send | Close]) -> list[int]:
    return [a.code for a in actions if isinstance(a, Close)]


def errors(actions: list[Send | Close]) -> list[str]:
    return [m["code"] for m in messages(actions) if m["type"] == "error"]


def opened(engine: EngineInfo = ENGLISH, **kwargs) -> Session:
    session = Session(engine, session_id="s1", **kwargs)
    session.open()
    return session


def start(session: Session, **fields) -> list[Send | Close]:
    return run_all(session, session.receive_text(json.dumps({"type": "start", **fields})))


def stream(session: Session, data: bytes, chunk: int = 3200) -> list[Send | Close]:
    out: list[Send | Close] = []
    for i in range(0, len(data), chunk):
        out += run_all(session, session.receive_bytes(data[i:i + chunk]))
    return out


def stop(session: Session) -> list[Send | Close]:
    return run_all(session, session.receive_text('{"type": "stop"}'))


# --- the normal flow ---------------------------------------------------------------------------------


def test_ready_is_sent_on_open_with_the_documented_shape() -> None:
    [action] = Session(ENGLISH, session_id="abc").open()
    assert isinstance(action, Send)
    ready = action.message
    assert set(ready) == set(doc_examples()["ready"])
    assert ready["type"] == "ready" and ready["session_id"] == "abc" and ready["protocol"] == 1
    assert (ready["sample_rate"], ready["encoding"], ready["channels"]) == (16000, "pcm_s16le", 1)


def test_the_documented_start_example_is_accepted_and_echoed_as_started() -> None:
    examples = doc_examples()
    session = opened()
    out = run_all(session, session.receive_text(json.dumps(examples["start"])))
    [started] = messages(out)
    assert set(started) == set(examples["started"])
    assert set(examples["start"]) - {"type"} <= set(START_FIELDS)
    assert started["type"] == "started" and started["prompt"] == "Kennedy, Beckett"
    assert started["vad"]["endpoint_ms"] == 600 and started["vad"]["frame_ms"] == 30
    assert not closes(out)


def test_a_stream_without_start_uses_the_defaults_and_says_so_once() -> None:
    session = opened()
    out = stream(session, pcm16(np.zeros(RATE, np.float32)))
    assert types(out) == ["started"]
    assert messages(out)[0]["sample_rate"] == 16000 and messages(out)[0]["language"] == "en"


def test_speech_gives_finals_then_stop_gives_done_and_close_1000() -> None:
    examples = doc_examples()
    session = opened()
    out = start(session) + stream(session, utterance() + utterance()) + stop(session)
    kinds = types(out)
    assert kinds[0] == "started" and kinds[-1] == "done"
    finals = [m for m in messages(out) if m["type"] == "final"]
    assert finals and all(set(m) == set(examples["final"]) for m in finals)
    for kind in ("partial", "utterance_end", "done"):
        assert all(set(m) == set(examples[kind]) for m in messages(out) if m["type"] == kind), kind
    starts = [m["start"] for m in finals]
    assert starts == sorted(starts) and finals[-1]["end"] <= 6.5
    assert kinds.count("utterance_end") == 2
    done = messages(out)[-1]
    assert done["reason"] == "stop" and done["finals"] == len(finals) and done["utterances"] == 2
    assert done["audio_seconds"] == pytest.approx(2 * 3.25)
    assert done["words"] == sum(len(m["words"]) for m in finals) and done["errors"] == 0
    assert isinstance(out[-1], Close) and out[-1].code == NORMAL
    assert session.closed and session.receive_bytes(b"\0\0") == [] and session.receive_text("{}") == []


def test_word_timestamps_false_leaves_words_out_and_interim_results_false_sends_no_partials() -> None:
    session = opened()
    out = start(session, word_timestamps=False, interim_results=False) + stream(session, utterance()) + stop(session)
    finals = [m for m in messages(out) if m["type"] == "final"]
    assert finals and all("words" not in m for m in finals)
    assert "partial" not in types(out)


def test_finalize_commits_pending_words_mid_speech() -> None:
    session = opened()
    start(session, interim_results=False)
    out = stream(session, pcm16(np.concatenate([np.zeros(RATE // 4, np.float32), vowel(3.0)])))
    assert "utterance_end" not in types(out)
    out = run_all(session, session.receive_text('{"type": "finalize"}'))
    assert types(out)[-1] == "utterance_end" and "final" in types(out)


def test_a_multilingual_stream_reports_the_detected_language_once() -> None:
    session = opened(MULTI)
    out = start(session, language="auto") + stream(session, utterance() + utterance()) + stop(session)
    detected = [m for m in messages(out) if m["type"] == "language"]
    assert len(detected) == 1 and set(detected[0]) == set(doc_examples()["language"])
    assert detected[0]["language"] == "en" and messages(out)[-1]["language"] == "en"
    assert types(out).index("language") < types(out).index("final")


def test_finalize_and_stop_before_audio() -> None:
    session = opened()
    assert run_all(session, session.receive_text('{"type": "finalize"}')) == []
    out = stop(session)
    assert types(out) == ["done"] and closes(out) == [NORMAL]
    assert messages(out)[0]["audio_seconds"] == 0 and messages(out)[0]["language"] is None


def test_resampled_stereo_input_keeps_the_stream_timeline() -> None:
    session = opened()
    start(session, sample_rate=48000, channels=2)
    mono = np.concatenate([np.zeros(48000 // 4, np.float32), vowel(2.0, rate=48000), np.zeros(48000, np.float32)])
    out = stream(session, pcm16(np.repeat(mono, 2)), chunk=19200) + stop(session)
    done = messages(out)[-1]
    assert done["audio_seconds"] == pytest.approx(3.25, abs=0.01)
    finals = [m for m in messages(out) if m["type"] == "final"]
    assert finals and 0.0 <= finals[0]["start"] and finals[-1]["end"] <= 3.25


def test_one_decode_in_flight_and_backlog_while_it_runs() -> None:
    session = opened()
    runs = [a for a in session.receive_bytes(utterance(speech=3.0, pause=0)) if isinstance(a, Run)]
    assert len(runs) == 1 and session.backlog_seconds == 0
    more = session.receive_bytes(pcm16(vowel(2.0)))
    assert not any(isinstance(a, Run) for a in more)
    assert session.backlog_seconds == pytest.approx(2.0)
    after = session.complete(runs[0].request, fake_reply(runs[0].request))
    assert any(isinstance(a, Run) for a in after) and session.backlog_seconds == 0


def test_stop_waits_for_the_decode_in_flight() -> None:
    session = opened()
    [run] = [a for a in session.receive_bytes(utterance(speech=3.0, pause=0)) if isinstance(a, Run)]
    assert not closes(session.receive_text('{"type": "stop"}'))
    out = run_all(session, session.complete(run.request, fake_reply(run.request)))
    assert types(out)[-1] == "done" and closes(out) == [NORMAL]


# --- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, code", [
    ("{not json", "bad_json"),
    ("[1, 2]", "bad_json"),
    ('{"kind": "stop"}', "bad_json"),
    ('{"type": 3}', "bad_json"),
    ('{"type": "start", "min_chunk": NaN}', "bad_json"),
    ('{"type": "pause"}', "unknown_type"),
])
def test_recoverable_text_errors_keep_the_stream(text: str, code: str) -> None:
    session = opened()
    out = run_all(session, session.receive_text(text))
    assert errors(out) == [code] and not closes(out)
    assert types(start(session)) == ["started"]  # the stream is still new and usable


def test_bad_audio_is_dropped_and_the_stream_goes_on() -> None:
    session = opened()
    out = stream(session, b"\x01\x02\x03")
    assert types(out) == ["started", "error"] and errors(out) == ["bad_audio"]
    assert "multiple of the frame size" in messages(out)[1]["message"]
    assert not closes(stream(session, utterance()))
    assert messages(stop(session))[-1]["errors"] == 1


def test_nan_float_audio_is_bad_audio() -> None:
    session = opened()
    start(session, encoding="pcm_f32le")
    out = run_all(session, session.receive_bytes(np.array([0.1, np.nan], "<f4").tobytes()))
    assert errors(out) == ["bad_audio"] and "NaN" in messages(out)[0]["message"]


@pytest.mark.parametrize("fields, needle", [
    ({"sample_rate": "16000"}, "sample_rate must be an integer"),
    ({"sample_rate": 16000.0}, "sample_rate must be an integer"),
    ({"encoding": 16}, "encoding must be a string"),
    ({"channels": True}, "channels must be an integer"),
    ({"language": 5}, "language must be"),
    ({"language": "es"}, "English-only"),
    ({"task": "summarize"}, "task must be 'transcribe' or 'translate'"),
    ({"task": "translate"}, "needs a multilingual model"),
    ({"prompt": ["a"]}, "prompt must be a string"),
    ({"prompt": "x" * 2001}, "at most 2000"),
    ({"interim_results": "yes"}, "interim_results must be true or false"),
    ({"word_timestamps": 1}, "word_timestamps must be true or false"),
    ({"vad": [2]}, "vad must be an object"),
    ({"vad": {"aggressiveness": 7}}, "aggressiveness=7 is out of range; allowed: 0..3"),
    ({"vad": {"aggressiveness": 2.5}}, "vad.aggressiveness must be an integer"),
    ({"vad": {"endpoint": 600}}, "unknown vad field 'endpoint'"),
    ({"vad": {"frame_ms": 25}}, "allowed: 10, 20 or 30"),
    ({"min_chunk": "0.5"}, "min_chunk must be a number"),
    ({"min_chunk": 0.01}, "min_chunk=0.01 is out of range"),
    ({"agreement": 9}, "agreement=9 is out of range"),
    ({"agreement": 1.5}, "agreement must be an integer"),
    ({"final_context": "10"}, "final_context must be a number of seconds"),
    ({"final_context": 31}, "final_context=31.0 is out of range; allowed: 0 to 30 seconds"),
    ({"samplerate": 16000}, "unknown field 'samplerate'; allowed: sample_rate"),
])
def test_bad_start_names_the_field_and_ends_the_stream(fields: dict, needle: str) -> None:
    session = opened()
    out = start(session, **fields)
    assert errors(out) == ["bad_start"] and needle in messages(out)[0]["message"]
    assert types(out) == ["error", "done"] and messages(out)[1]["reason"] == "bad_start"
    assert closes(out) == [POLICY_VIOLATION] and session.closed


@pytest.mark.parametrize("fields, needle", [
    ({"sample_rate": 4000}, "unsupported sample rate 4000"),
    ({"sample_rate": 384000}, "unsupported sample rate"),
    ({"encoding": "opus"}, "unsupported encoding 'opus'"),
    ({"channels": 9}, "unsupported channel count 9"),
    ({"channels": 0}, "unsupported channel count 0"),
])
def test_unsupported_format_closes_1003(fields: dict, needle: str) -> None:
    out = start(opened(), **fields)
    assert errors(out) == ["unsupported_format"] and needle in messages(out)[0]["message"]
    assert closes(out) == [UNSUPPORTED_DATA]


def test_language_choices_on_a_multilingual_model() -> None:
    assert messages(start(opened(MULTI), language="auto"))[0]["language"] is None
    assert messages(start(opened(MULTI), language="es", task="translate"))[0]["language"] == "es"
    out = start(opened(MULTI), language="xx")
    assert errors(out) == ["bad_start"] and "unknown language 'xx'" in messages(out)[0]["message"]
    assert messages(start(opened(ENGLISH), language="en"))[0]["language"] == "en"


def test_start_after_audio_is_too_late_but_the_audio_is_still_transcribed() -> None:
    session = opened()
    stream(session, utterance(pause=0.2))
    out = start(session)
    assert errors(out) == ["start_too_late"] and types(out)[0] == "error"
    assert "final" in types(out) and types(out)[-1] == "done" and closes(out) == [POLICY_VIOLATION]
    assert messages(out)[-1]["reason"] == "start_too_late"


def test_a_second_start_is_too_late() -> None:
    session = opened()
    start(session)
    assert errors(start(session)) == ["start_too_late"]


def test_frame_too_large_ends_the_stream_with_1008() -> None:
    session = opened(max_message_bytes=4096)
    assert not errors(stream(session, bytes(4096), chunk=4096))
    out = run_all(session, session.receive_bytes(bytes(4098)))
    assert errors(out) == ["frame_too_large"]
    assert "4098 bytes exceeds the 4096-byte limit" in messages(out)[0]["message"]
    assert closes(out) == [POLICY_VIOLATION]
    session = opened(max_message_bytes=4096)
    out = run_all(session, session.receive_text(json.dumps({"type": "start", "prompt": "é" * 2100})))
    assert errors(out) == ["frame_too_large"] and closes(out) == [POLICY_VIOLATION]


def test_audio_and_text_after_stop() -> None:
    session = opened()
    [run] = [a for a in session.receive_bytes(utterance(speech=3.0, pause=0)) if isinstance(a, Run)]
    session.receive_text('{"type": "stop"}')
    out = run_all(session, session.receive_bytes(bytes(320)))
    assert errors(out) == ["audio_after_stop"]
    assert run_all(session, session.receive_bytes(bytes(320))) == []  # reported once
    assert errors(run_all(session, session.receive_text('{"type": "finalize"}'))) == ["unexpected_text"]
    assert errors(run_all(session, session.receive_text('{"type": "nope"}'))) == ["unknown_type"]
    out = run_all(session, session.complete(run.request, fake_reply(run.request)))
    assert messages(out)[-1]["errors"] == 3 and closes(out) == [NORMAL]


def test_idle_timeout_flushes_and_closes_1001() -> None:
    session = opened()
    stream(session, utterance(pause=0.2))
    out = run_all(session, session.timed_out(30))
    assert errors(out) == ["idle_timeout"] and "30 s" in messages(out)[0]["message"]
    assert "final" in types(out) and messages(out)[-1]["reason"] == "idle_timeout"
    assert closes(out) == [GOING_AWAY]
    assert session.timed_out(30) == []


def test_drain_finishes_the_stream_with_shutdown() -> None:
    session = opened()
    stream(session, utterance(pause=0.2))
    out = run_all(session, session.drain())
    assert "final" in types(out) and messages(out)[-1]["reason"] == "shutdown" and closes(out) == [GOING_AWAY]
    warning = messages(out)[0]
    assert warning["type"] == "warning" and warning["code"] == "draining" and "reconnect" in warning["message"]
    assert set(warning) == set(doc_examples()["warning"])
    idle = opened()
    assert types(run_all(idle, idle.drain())) == ["warning", "done"]
    assert session.drain() == []


def test_a_failed_decode_is_an_internal_error_without_done() -> None:
    session = opened()
    [run] = [a for a in session.receive_bytes(utterance(speech=3.0, pause=0)) if isinstance(a, Run)]
    out = session.complete(run.request, RuntimeError("boom"))
    assert errors(out) == ["internal"] and "boom" not in messages(out)[0]["message"]
    assert closes(out) == [INTERNAL_ERROR] and "done" not in types(out)
    assert session.complete(run.request, fake_reply(run.request)) == []


def test_refusal_outside_a_session() -> None:
    out = refusal("capacity", "full", 1013)
    assert messages(out) == [{"type": "error", "code": "capacity", "message": "full"}] and closes(out) == [1013]
    assert set(messages(out)[0]) == set(doc_examples()["error"])


def test_the_clock_gives_elapsed() -> None:
    now = iter([10.0, 12.5])
    session = Session(ENGLISH, clock=lambda: next(now))
    assert messages(stop(session))[0]["elapsed"] == 2.5


message_strategy = st.one_of(
    st.binary(max_size=700),
    st.builds(lambda n: pcm16(vowel(n / 10)), st.integers(1, 12)),
    st.sampled_from(['{"type": "start"}', '{"type": "finalize"}', '{"type": "stop"}', '{"type": "start", '
                     '"sample_rate": 8000}', '{"type": "start", "vad": {"frame_ms": 7}}', "[]", "nope", "{}"]),
    st.text(max_size=30),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(message_strategy, max_size=12))
def test_any_message_sequence_ends_cleanly(sequence: list[bytes | str]) -> None:
    session = opened(max_message_bytes=600)
    out: list[Send | Close] = []
    for item in sequence:
        out += run_all(session, session.receive_text(item) if isinstance(item, str) else session.receive_bytes(item))
    out += stop(session)
    assert session.closed and len(closes(out)) == 1 and isinstance(out[-1], Close)
    finals = [m for m in messages(out) if m["type"] == "final"]
    assert [m["start"] for m in finals] == sorted(m["start"] for m in finals)
    done = [m for m in messages(out) if m["type"] == "done"]
    assert len(done) == 1 and done[0]["finals"] == len(finals)
    assert done[0]["errors"] == len(errors(out))
