"""The Deepgram and OpenAI Realtime codecs without a model: parameters to ``start``, native messages to events."""

from __future__ import annotations

import pytest

from streaming.core.session import EngineInfo, Send, Session
from streaming.deepgram import BadQuery, DeepgramCodec, check_query, parse_query
from streaming.openai_realtime import RealtimeCodec

ENGLISH = EngineInfo("tiny.en", multilingual=False)


def test_deepgram_parameters_become_a_native_start() -> None:
    start = parse_query({"encoding": ["linear16"], "sample_rate": ["48000"], "channels": ["2"],
                         "language": ["en-US"], "interim_results": ["True"], "endpointing": ["10"],
                         "smart_format": ["true"], "model": ["nova-3"]})
    assert start == {"type": "start", "encoding": "pcm_s16le", "sample_rate": 48000, "channels": 2,
                     "interim_results": True, "language": "en", "vad": {"endpoint_ms": 300}}
    assert parse_query({})["interim_results"] is False and "vad" not in parse_query({"endpointing": ["false"]})
    for bad in ({"encoding": ["mulaw"]}, {"sample_rate": ["-1"]}, {"punctuate": ["yes"]}, {"endpointing": ["x"]}):
        with pytest.raises(BadQuery):
            parse_query(bad)
    terms = parse_query({"keyterm": ["Kennedy", " "], "keywords": ["Beckett:2", "snoring:-1.5"], "diarize": ["true"]})
    assert terms["prompt"] == "Kennedy, Beckett, snoring" and terms["diarize"] is True
    assert check_query(ENGLISH, {"language": ["es"]})[0] == 400  # the session's own check
    assert check_query(ENGLISH, {"keyterm": ["x" * 2001]})[0] == 400
    assert check_query(ENGLISH, {"sample_rate": ["8000"]}) is None


def test_deepgram_marks_the_last_final_of_an_utterance_speech_final() -> None:
    codec = DeepgramCodec("/v1/listen?vad_events=true&utterance_end_ms=1000", "tiny.en")
    word = {"word": " Hello,", "start": 0.5, "end": 0.9, "probability": 0.8}
    batch = [Send({"type": "final", "segment": 0, "text": " Hello,", "start": 0.5, "end": 0.9, "words": [word]}),
             Send({"type": "partial", "segment": 0, "revision": 2, "text": "", "start": 1.0, "end": 1.0}),
             Send({"type": "utterance_end", "segment": 0, "end": 1.2})]
    events = [e for action in codec.prepare(batch) for e in codec.encode(action.message)]
    assert [e["type"] for e in events] == ["SpeechStarted", "Results", "UtteranceEnd"]
    result, [alternative] = events[1], events[1]["channel"]["alternatives"]
    assert result["is_final"] and result["speech_final"] and alternative["transcript"] == "Hello,"
    assert alternative["words"] == [{"word": "hello", "start": 0.5, "end": 0.9,
                                                               "confidence": 0.8, "punctuated_word": "Hello,"}]
    labelled = codec.encode({**batch[0].message, "words": [{**word, "speaker": 1}], "speaker": 1})
    assert labelled[0]["channel"]["alternatives"][0]["words"][0]["speaker"] == 1


def test_realtime_settings_and_the_events_of_one_utterance() -> None:
    codec, session = RealtimeCodec(ENGLISH), Session(ENGLISH)
    update = ('{"type": "session.update", "session": {"type": "transcription", "audio": {"input": '
              '{"transcription": {"language": "en", "prompt": "Asterisk"}, "turn_detection": '
              '{"type": "server_vad", "silence_duration_ms": 800, "threshold": 0.9}}}}}')
    [updated] = codec.text(session, update)
    assert updated.message["event"]["type"] == "session.updated"
    started = codec.text(session, '{"type": "input_audio_buffer.append", "audio": "AAAAAA=="}')
    assert session.state == "streaming" and not [a for a in started if isinstance(a, Send)]
    messages = [{"type": "partial", "segment": 0, "revision": 1, "text": " Hel", "start": 0.3, "end": 0.5},
                {"type": "final", "segment": 0, "text": " Hello", "start": 0.3, "end": 0.6},
                {"type": "final", "segment": 0, "text": " there.", "start": 0.6, "end": 1.0},
                {"type": "utterance_end", "segment": 0, "end": 1.4}]
    events = [e for m in messages for e in codec.encode(m)]
    assert [e["type"].rsplit(".", 1)[-1] for e in events] == ["speech_started", "delta", "delta", "speech_stopped",
                                                              "committed", "completed"]
    assert [e["delta"] for e in events[1:3]] == ["Hello", " there."] and events[-1]["transcript"] == "Hello there."
    assert len({e["item_id"] for e in events}) == 1 and events[0]["audio_start_ms"] == 300
    [late] = codec.text(session, update)
    assert late.message["error"]["code"] == "session_already_started"


@pytest.mark.parametrize("session", ['"x"', '{"audio": 3}', '{"audio": {"input": {"transcription": "x"}}}',
                                     '{"turn_detection": {"silence_duration_ms": "500"}}',
                                     '{"turn_detection": {"threshold": 2}}',
                                     '{"turn_detection": {"type": "semantic_vad"}}',
                                     '{"input_audio_transcription": {"prompt": 7}}'])
def test_bad_realtime_settings_are_error_events(session: str) -> None:
    codec = RealtimeCodec(ENGLISH)
    [error] = codec.text(Session(ENGLISH), f'{{"type": "transcription_session.update", "session": {session}}}')
    assert error.message["type"] == "error" and error.message["error"]["type"] == "invalid_request_error"
    assert codec.turn_detection is not None and codec.transcription["prompt"] is None
