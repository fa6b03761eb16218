"""StreamCore as a pure state machine, driven by a scripted fake decoder on synthetic speech.

The stream is a formant-shaped tone (webrtcvad takes it for speech) between silences, over a faint dither
that makes every sample value unique, so the fake decoder can find where a request's window lies on the
stream timeline by matching its audio. A script places words on that timeline; the fake "hears" the words
whose end lies inside the window, checks the forced prefix against them and returns the rest with
window-relative times and token ids that name the word (``tokens == (index,)``). The clock is the sample
count: audio goes in 20 ms chunks and every request is answered before the next chunk unless a test
delays it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from signals import vowel

from streaming.core import stream as recognizer
from streaming.core.events import Event, Final, Partial, UtteranceEnd
from streaming.core.stream import StreamCore, StreamOptions
from streaming.core.vad import SAMPLE_RATE, VadConfig
from streaming.engine.alignment import WordTiming
from streaming.engine.inference import PROMPT_TOKENS, WindowReply, WindowRequest

SR = SAMPLE_RATE
CHUNK = 320  # 20 ms
# The scripted tone keeps one level for seconds, as no speech does: the detector's noise floor would take it
# for noise. These tests are about the window and the commits, so the noise gate is off here (test_vad.py
# tests it on speech-like level changes).
VAD = VadConfig(noise_margin_db=0.0)


def options(**changes) -> StreamOptions:
    return StreamOptions(vad=VAD, **changes)


FRAME = VAD.frame_ms / 1000
PRE_PAD = VAD.pre_speech_pad_ms / 1000
HANGOVER = VAD.hangover_ms / 1000
WORD = 0.3  # each word lasts 300 ms, then 100 ms of (voiced) pause before the next
STEP = 0.4
LEAD = 0.1  # voicing starts this long before the first word of an utterance
GAP = 1.5  # silence between utterances, well over the 400 ms endpoint
EPS = 1e-6


# --- synthetic stream ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spoken:
    """A scripted word on the stream timeline (seconds)."""

    text: str
    start: float
    end: float
    utterance: int


@dataclass
class Stream:
    audio: np.ndarray
    words: list[Spoken]
    spans: list[tuple[float, float]]  # voiced (start, end) of each utterance, noise bursts included

    @property
    def texts(self) -> list[str]:
        return [w.text for w in self.words]


def build(utterances: list[list[str | None] | float], lead: float = 1.0, tail: float = 1.5, gap: float = GAP,
          seed: int = 0) -> Stream:
    """Utterances of words (or a float: that many seconds of voiced noise with no words) between silences.
    A None word is a pause of one word slot (voicing goes on). With ``tail=0`` the stream stops in the middle of
    the last utterance's voicing, right after its last word."""
    parts: list[np.ndarray] = [np.zeros(round(lead * SR), np.float32)]
    words: list[Spoken] = []
    spans: list[tuple[float, float]] = []
    t = lead
    for u, utterance in enumerate(utterances):
        if u:
            parts.append(np.zeros(round(gap * SR), np.float32))
            t += gap
        if isinstance(utterance, float):
            duration = utterance
        else:
            duration = LEAD + len(utterance) * STEP + (LEAD if tail or u < len(utterances) - 1 else 0)
            words += [Spoken(text, t + LEAD + i * STEP, t + LEAD + i * STEP + WORD, u)
                      for i, text in enumerate(utterance) if text is not None]
        duration = round(duration * SR) / SR
        parts.append(vowel(duration))
        spans.append((t, t + duration))
        t += duration
    parts.append(np.zeros(round(tail * SR), np.float32))
    audio = np.concatenate(parts)
    # Dither far below the VAD's -55 dBFS floor: makes every window's audio findable on the timeline.
    audio += np.random.default_rng(seed).uniform(-1e-4, 1e-4, audio.size).astype(np.float32)
    return Stream(audio, words, spans)


def sentence(n: int, first: int = 0, every: int = 0) -> list[str]:
    """n distinct words ``w<first>`` ...; with ``every``, each ``every``-th word ends a sentence."""
    return [f" w{i}" + ("." if every and (i - first + 1) % every == 0 else "") for i in range(first, first + n)]


# --- fake decoder --------------------------------------------------------------------------------------


@dataclass
class Seen:
    """A request as the fake decoder saw it, placed on the stream timeline."""

    request: WindowRequest
    start: float
    end: float
    heard: list[int]


class FakeDecoder:
    """Answers a request with the script's words whose end lies inside the window, after the prefix."""

    def __init__(self, stream: Stream, hypothesis: Callable[[Seen, list[int]], list[int | WordTiming]] | None = None):
        self.stream = stream
        self.seen: list[Seen] = []
        self.hypothesis = hypothesis  # optional: turns the heard word indices into a (misbehaving) reply
        self.strict = True  # check the forced prefix (off where a test removes a guard on purpose)
        self._cursor = 0

    def locate(self, audio: np.ndarray) -> int:
        """Absolute start sample of ``audio`` in the stream. Windows never move backwards on the timeline."""
        pos = self._cursor
        while pos < self.stream.audio.size:
            block = self.stream.audio[pos: pos + 4 * SR]
            for j in np.flatnonzero(block == audio[0]):
                at = pos + int(j)
                if np.array_equal(self.stream.audio[at: at + audio.size], audio):
                    self._cursor = at
                    return at
            pos += block.size
        raise AssertionError(f"request audio ({audio.size} samples) is not stream audio at or after {self._cursor}")

    def word(self, i: int, start: float, text: str | None = None) -> WordTiming:
        w = self.stream.words[i]
        return WordTiming(w.text if text is None else text, (i,), w.start - start, w.end - start, 0.9)

    def __call__(self, request: WindowRequest) -> WindowReply:
        assert request.audio.dtype == np.float32 and request.audio.size
        start = self.locate(request.audio) / SR
        end = start + request.audio.size / SR
        heard = [i for i, w in enumerate(self.stream.words) if start - EPS <= w.start and w.end <= end + EPS]
        seen = Seen(request, start, end, heard)
        self.seen.append(seen)
        k = len(request.prefix)
        # The forced prefix is exactly the committed words at the start of the window.
        if self.strict:
            assert request.prefix == tuple(heard[:k]), (request.prefix, heard)
        new = [i for i in heard if i not in request.prefix]
        out = self.hypothesis(seen, new) if self.hypothesis else new
        return WindowReply(words=[x if isinstance(x, WordTiming) else self.word(x, start) for x in out],
                           language="en")


def serve(core: StreamCore, decoder: FakeDecoder) -> list[Event]:
    events: list[Event] = []
    while (request := core.next_request()) is not None:
        events += core.complete(request, decoder(request))
    return events


def drive(core: StreamCore, decoder: FakeDecoder, audio: np.ndarray, chunk: int = CHUNK, delay: int = 0,
          flush: bool = True) -> list[Event]:
    """Feed ``audio`` in chunks; a request is answered ``delay`` chunks after it was first seen."""
    events: list[Event] = []
    in_flight: WindowRequest | None = None
    age = 0
    for offset in range(0, audio.size, chunk):
        events += core.feed(audio[offset: offset + chunk])
        while (request := core.next_request()) is not None:
            if in_flight is not None:
                assert request is in_flight, "a second request while one is in flight"
            else:
                in_flight, age = request, 0
            if age < delay:
                age += 1
                break
            events += core.complete(request, decoder(request))
            in_flight = None
    if flush:
        events += core.flush()
        events += serve(core, decoder)
    return events


# --- checks --------------------------------------------------------------------------------------------


def finals(events: list[Event]) -> list[Final]:
    return [e for e in events if isinstance(e, Final)]


def final_words(events: list[Event]) -> list[str]:
    return [w.text for e in finals(events) for w in e.words]


def check_transcript(events: list[Event], stream: Stream, interim: bool = True) -> None:
    """Finals carry every scripted word exactly once, in order, at its time, in its utterance's segment;
    each utterance ends with one UtteranceEnd after its finals; partials are the scripted words that follow
    the committed ones, with increasing revisions, and are cleared at the utterance end."""
    words = [w for e in finals(events) for w in e.words]
    assert [w.text for w in words] == stream.texts
    assert [w.tokens for w in words] == [(i,) for i in range(len(stream.words))]
    for w, spoken in zip(words, stream.words):
        assert w.start == pytest.approx(spoken.start, abs=1e-4) and w.end == pytest.approx(spoken.end, abs=1e-4)
    utterances = sorted({w.utterance for w in stream.words})
    committed, segment, revision, partial = 0, 0, 0, ""
    ended: list[int] = []
    first_of_segment: dict[int, Event] = {}
    for event in events:
        if isinstance(event, Partial | Final | UtteranceEnd):
            assert event.segment == segment, event
            first_of_segment.setdefault(segment, event)
        if isinstance(event, Final):
            assert event.text == "".join(w.text for w in event.words) and event.words
            assert event.start == event.words[0].start and event.end == event.words[-1].end
            assert {stream.words[w.tokens[0]].utterance for w in event.words} == {utterances[segment]}
            committed += len(event.words)
        elif isinstance(event, Partial):
            assert interim, "a partial with interim_results=False"
            assert event.revision > revision
            revision, partial = event.revision, event.text
            n = len(event.text.split())
            assert event.text == "".join(stream.texts[committed: committed + n])
        elif isinstance(event, UtteranceEnd):
            assert partial == "", "utterance ended with its partial still showing"
            ended.append(segment)
            assert committed == sum(w.utterance <= utterances[segment] for w in stream.words)
            segment += 1
    assert ended == list(range(len(utterances)))
    if interim:  # an utterance long enough for two interim decodes shows a partial before its first final
        for s, u in enumerate(utterances):
            if sum(w.utterance == u for w in stream.words) >= 5:
                assert isinstance(first_of_segment[s], Partial), s


def check_windows(decoder: FakeDecoder, stream: Stream) -> None:
    """Every window lies inside one utterance's speech (plus VAD pre-pad and hangover): no silence between
    utterances reaches the decoder."""
    for seen in decoder.seen:
        assert any(a - PRE_PAD - FRAME - EPS <= seen.start and seen.end <= b + HANGOVER + FRAME + EPS
                   for a, b in stream.spans), (seen.start, seen.end)


# --- transcript ----------------------------------------------------------------------------------------


THREE = [sentence(3), sentence(12, 3), sentence(7, 15)]


@pytest.mark.parametrize("delay", [0, 3, 30])
def test_finals_carry_every_word_once_across_decodes_and_utterances(delay: int) -> None:
    stream = build(THREE)
    decoder = FakeDecoder(stream)
    events = drive(StreamCore(options()), decoder, stream.audio, delay=delay)
    check_transcript(events, stream)
    check_windows(decoder, stream)
    finals_ = finals(events)
    assert len(finals_) > len(THREE), "words are committed as they agree, not only at utterance ends"
    if delay == 0:  # decodes every min_chunk of new audio; interim windows grow by min_chunk (+ one VAD frame)
        interim = [s for s in decoder.seen if not s.request.final]
        assert len(interim) >= 8
        for a, b in zip(interim, interim[1:]):
            if a.start == b.start:
                assert 0.8 <= b.end - a.end <= 0.8 + FRAME + EPS
    if delay == 30:  # a slow decoder sees longer windows, and still loses and doubles nothing
        assert max(s.end - s.start for s in decoder.seen if not s.request.final) > 1.5


def test_each_request_is_answered_before_the_next_and_a_foreign_request_is_refused() -> None:
    stream = build([sentence(6)])
    core = StreamCore(options())
    decoder = FakeDecoder(stream)
    events: list[Event] = []
    request = None
    for offset in range(0, stream.audio.size, CHUNK):
        events += core.feed(stream.audio[offset: offset + CHUNK])
        request = core.next_request()
        if request is not None:
            break
    assert request is not None and not request.final and request.prompt == ()
    assert core.next_request() is request  # still the same in-flight object, even with more audio
    events += core.feed(stream.audio[offset + CHUNK: offset + 60 * CHUNK])
    assert core.next_request() is request
    with pytest.raises(ValueError, match="did not issue"):
        core.complete(dataclasses.replace(request), decoder(request))
    reply = WindowReply()
    events += core.complete(request, reply)
    with pytest.raises(ValueError, match="already completed"):
        core.complete(request, reply)
    following = core.next_request()
    assert following is not None and following is not request  # 1.2 s arrived while the first was in flight
    assert following.audio.size > request.audio.size


def test_interim_results_off_sends_no_partials() -> None:
    stream = build(THREE)
    events = drive(StreamCore(options(interim_results=False)), FakeDecoder(stream), stream.audio)
    assert not any(isinstance(e, Partial) for e in events)
    check_transcript(events, stream, interim=False)
    assert len(finals(events)) > len(THREE)  # finals still come as words agree


def test_long_utterance_is_trimmed_to_max_window_without_losing_words() -> None:
    stream = build([sentence(60)])  # 24 s, no sentence ends
    decoder = FakeDecoder(stream)
    events = drive(StreamCore(options()), decoder, stream.audio)
    check_transcript(events, stream)
    o = options()
    lengths = [s.end - s.start for s in decoder.seen]
    assert max(lengths) <= o.max_window + o.min_chunk + FRAME + EPS
    assert max(lengths) > o.max_window  # it did grow to max_window, so trims happened there
    starts = sorted({s.start for s in decoder.seen})
    assert len(starts) == 3  # 24 s of speech: two trims, each back to the last committed word
    word_starts = [w.start for w in stream.words]
    for t in starts[1:]:  # trims cut at the start of a committed word (in the gap before it)
        assert min(abs(t - w) for w in word_starts) < 1 / SR
    assert max(len(s.request.prefix) for s in decoder.seen) <= o.max_window / STEP + 1


def test_sentence_ends_trim_the_window_before_max_window() -> None:
    stream = build([sentence(45, every=5)])  # 18 s of 2 s sentences
    decoder = FakeDecoder(stream)
    events = drive(StreamCore(options()), decoder, stream.audio)
    check_transcript(events, stream)
    o = options()
    assert max(s.end - s.start for s in decoder.seen) < o.max_window - 2  # never reaches the max_window trim
    sentence_starts = [stream.words[i].start for i in range(5, 45, 5)]
    trims = sorted({s.start for s in decoder.seen})[1:]
    assert len(trims) >= 3
    assert all(min(abs(t - w) for w in sentence_starts) < 1 / SR for t in trims)


def test_words_that_never_agree_become_final_within_max_pending_without_an_endpoint() -> None:
    """28 s of speech with no pause and interim hypotheses that never agree: forced commits at quiet word gaps
    commit every word, in order, with no gap between finals over ``max_pending`` plus a decode step, and the
    window stays within ``max_window``."""
    stream = build([sentence(70)])  # 28 s
    flip = [0]

    def flicker(seen: Seen, new: list[int]) -> list[int | WordTiming]:
        # Each interim hypothesis disagrees with the previous one on its first word: nothing ever agrees.
        flip[0] += 1
        if not new or seen.request.final:
            return list(new)
        return [decoder.word(new[0], seen.start, f" {'xv'[flip[0] % 2]}{new[0]}"), *new[1:]]

    decoder = FakeDecoder(stream, flicker)
    core = StreamCore(options())
    events = drive(core, decoder, stream.audio)
    tokens = [w.tokens for e in finals(events) for w in e.words]
    assert tokens == [(i,) for i in range(len(stream.words))]  # no word lost or repeated at the cuts
    o = core.options
    bound = o.max_pending + o.min_chunk + FRAME + EPS
    assert max(s.end - s.start for s in decoder.seen) <= o.max_window + o.min_chunk + FRAME + EPS
    forced = [s for s in decoder.seen if s.request.final and s.end < stream.spans[0][1] - 1]
    assert len(forced) >= 28 / bound - 1
    ends = [e.end for e in finals(events)]
    assert max(b - a for a, b in zip(ends, ends[1:])) <= bound


# --- finalize and flush --------------------------------------------------------------------------------


def test_finalize_commits_pending_words_now() -> None:
    stream = build([[*sentence(6), None, *sentence(4, 6)]])
    core = StreamCore(options())
    decoder = FakeDecoder(stream)
    # Stop in the pause after word 5 (voicing goes on): words 0..5 have been heard, few of them agreed.
    stop = round((stream.words[5].end + 0.2) * SR) // CHUNK * CHUNK
    events = drive(core, decoder, stream.audio[:stop], flush=False)
    assert not any(isinstance(e, UtteranceEnd) for e in events)
    assert len(final_words(events)) < 6
    before = len(events)
    events += core.finalize()
    events += serve(core, decoder)
    assert decoder.seen[-1].request.final
    assert final_words(events) == stream.texts[:6]
    assert isinstance(events[-1], UtteranceEnd) and events[-1].segment == 0
    assert any(isinstance(e, Partial) and e.text == "" for e in events[before:])
    # The rest of the utterance goes on in a new segment.
    tail = drive(core, decoder, stream.audio[stop:])
    assert final_words(events + tail) == stream.texts
    assert {e.segment for e in finals(tail)} == {1}
    assert core.idle


def test_finalize_right_after_a_decode_decides_the_pending_words_with_a_final_decode() -> None:
    stream = build([sentence(8)])
    core = StreamCore(options())
    decoder = FakeDecoder(stream)
    events: list[Event] = []
    offset = 0
    while len(decoder.seen) < 2:  # stop right after the second interim decode: w0 agreed, w1 w2 pending
        events += core.feed(stream.audio[offset: offset + CHUNK])
        events += serve(core, decoder)
        offset += CHUNK
    decodes = len(decoder.seen)
    assert final_words(events) == stream.texts[:1] and core.next_request() is None
    heard = decoder.seen[-1].heard
    events += core.finalize()
    request = core.next_request()  # no new audio, but words wait: the final decode (full context, beam) decides
    assert request is not None and request.final and request.audio.size == decoder.seen[-1].request.audio.size
    events += serve(core, decoder)
    assert len(decoder.seen) == decodes + 1 and core.next_request() is None
    assert final_words(events) == [stream.texts[i] for i in heard]
    assert isinstance(events[-1], UtteranceEnd)


def test_an_unusable_interim_reply_keeps_the_partial_and_the_endpoint_still_commits_it() -> None:
    stream = build([sentence(6)])
    calls = 0

    class Looping(FakeDecoder):
        """Every interim decode after the first loops (a silent reply), so nothing agrees before the end."""

        def __call__(self, request: WindowRequest) -> WindowReply:
            nonlocal calls
            calls += 1
            reply = super().__call__(request)
            if calls > 1 and not request.final:
                return WindowReply(language="en", avg_logprob=-0.3, silence=True)
            return reply

    decoder = Looping(stream)
    events = drive(StreamCore(options()), decoder, stream.audio)
    first_final = next(i for i, e in enumerate(events) if isinstance(e, Final))
    partials = [e.text for e in events[:first_final] if isinstance(e, Partial)]
    assert partials == [" w0"]  # the looping decodes neither clear nor replace it
    assert final_words(events) == stream.texts
    assert decoder.seen[-1].request.final


def test_requests_carry_the_stream_options() -> None:
    chosen = options(prompt="Glossary: w0.", task="translate", beam_size=2, final_beam_size=4, context=8,
                     final_context=20)
    stream = build([sentence(5), sentence(5, 5)])
    decoder = FakeDecoder(stream)
    check_transcript(drive(StreamCore(chosen), decoder, stream.audio), stream)
    requests = [s.request for s in decoder.seen]
    assert {(r.beam_size, r.context) for r in requests if not r.final} == {(2, 8)}
    assert [(r.beam_size, r.context, r.prompt) for r in requests if r.final] == [(4, 20, ()), (4, 20, tuple(range(5)))]
    assert {(r.initial_prompt, r.task, r.language) for r in requests} == {("Glossary: w0.", "translate", "en")}


def test_each_decode_gets_the_partial_on_show_as_its_draft() -> None:
    """The words not yet committed are what the next decode most likely starts with: the decoder checks them
    in one pass (DecodingOptions.draft). A new utterance starts without a draft."""
    stream = build([sentence(8), sentence(6, 8)])
    core, decoder = StreamCore(options()), FakeDecoder(stream)
    shown, drafts = "", []
    for offset in range(0, stream.audio.size, CHUNK):
        events = core.feed(stream.audio[offset: offset + CHUNK])
        while (request := core.next_request()) is not None:
            drafts.append((request.draft, shown, request.final))
            events += core.complete(request, decoder(request))
        shown = next((e.text for e in reversed(events) if isinstance(e, Partial)), shown)
    assert len(drafts) > 6 and sum(bool(d) for d, _, _ in drafts) >= 4
    for draft, text, final in drafts:
        assert draft == tuple(int(word[1:]) for word in text.split()), (draft, text, final)


def test_finalize_without_speech_does_nothing() -> None:
    core = StreamCore(options())
    assert core.finalize() == [] and core.next_request() is None


def test_flush_at_end_of_stream_commits_everything() -> None:
    stream = build([sentence(4), sentence(9, 4)], tail=0)  # audio stops mid-speech, right after the last word
    core = StreamCore(options())
    decoder = FakeDecoder(stream)
    events = drive(core, decoder, stream.audio, flush=False)
    assert final_words(events)[-1] != stream.texts[-1]
    events += core.flush()
    events += serve(core, decoder)
    check_transcript(events, stream)
    assert core.idle and core.next_request() is None


# --- work skipped without speech -----------------------------------------------------------------------


def test_silence_and_quiet_noise_make_no_requests() -> None:
    rng = np.random.default_rng(1)
    audio = np.concatenate([np.zeros(5 * SR, np.float32),
                            rng.normal(0, 10 ** (-65 / 20), 10 * SR).astype(np.float32)])  # -65 dBFS hiss
    core = StreamCore(options())
    for offset in range(0, audio.size, CHUNK):
        assert core.feed(audio[offset: offset + CHUNK]) == []
        assert core.next_request() is None and core.idle
    assert core.flush() == [] and core.next_request() is None
    assert core.samples_seen == audio.size


def test_silence_between_utterances_never_reaches_the_decoder() -> None:
    stream = build([sentence(5), sentence(5, 5), sentence(5, 10)], gap=8.0)
    decoder = FakeDecoder(stream)
    events = drive(StreamCore(options()), decoder, stream.audio)
    check_transcript(events, stream)
    check_windows(decoder, stream)
    utterance = LEAD * 2 + 5 * STEP
    assert max(s.end - s.start for s in decoder.seen) <= utterance + PRE_PAD + HANGOVER + 2 * FRAME


# --- guards --------------------------------------------------------------------------------------------


LOOP = [" Ever", " tried.", " Ever", " failed.", " No", " matter."]


def looping(decoder: FakeDecoder) -> Callable[[Seen, list[int]], list[int | WordTiming]]:
    """Whisper stuck at the end of a window: after "matter" it goes on "no matter no matter ..."."""

    def hypothesis(seen: Seen, new: list[int]) -> list[int | WordTiming]:
        if not new or new[-1] != len(LOOP) - 1:
            return list(new)
        end = seen.end - seen.start
        loop = [WordTiming(text, (90 + i % 2,), end - 0.05, end - 0.05, 0.5)
                for i, text in enumerate([" no", " matter"] * 3)]
        return [*new, *loop]

    return hypothesis


@pytest.mark.parametrize("guarded", [True, False])
def test_a_decoding_loop_is_committed_once(guarded: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not guarded:
        monkeypatch.setattr(recognizer, "cut_loops", lambda prefix, words: words)
    stream = build([LOOP])
    decoder = FakeDecoder(stream)
    decoder.hypothesis = looping(decoder)
    events = drive(StreamCore(options()), decoder, stream.audio)
    text = "".join(final_words(events)).lower()
    if guarded:
        assert final_words(events) == LOOP
        check_transcript(events, stream)
    else:  # the loop reaches the finals
        assert text.count("matter") == 4


def copies_its_prompt(decoder: FakeDecoder) -> Callable[[Seen, list[int]], list[int | WordTiming]]:
    """Whisper with a short audio context and a prompt: it re-transcribes the prompt's words first."""

    def hypothesis(seen: Seen, new: list[int]) -> list[int | WordTiming]:
        if seen.request.context >= 30 or not seen.request.prompt:
            return list(new)
        return [*[decoder.word(t, seen.start) for t in seen.request.prompt[-3:]], *new]

    return hypothesis


def leak_prompt_into_interim_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    original = StreamCore._request

    def leaky(self: StreamCore, final: bool, speculative: bool = False) -> WindowRequest:
        request = original(self, final, speculative)
        self._pending = dataclasses.replace(request, prompt=tuple(self._context[-PROMPT_TOKENS:]))
        return self._pending

    monkeypatch.setattr(StreamCore, "_request", leaky)


@pytest.mark.parametrize("guarded", [True, False])
def test_interim_requests_carry_no_prompt_so_none_is_copied(guarded: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    stream = build([sentence(6), sentence(8, 6)])
    decoder = FakeDecoder(stream)
    if not guarded:
        leak_prompt_into_interim_requests(monkeypatch)
        decoder.strict = False
    decoder.hypothesis = copies_its_prompt(decoder)
    events = drive(StreamCore(options()), decoder, stream.audio)
    finals_in_second = [s for s in decoder.seen if s.request.final and s.start > stream.spans[1][0] - 1]
    assert finals_in_second[0].request.prompt == tuple(range(6))  # the final decode gets context
    if guarded:
        assert len(finals_in_second) == 1
        assert all(s.request.prompt == () for s in decoder.seen if not s.request.final)
        check_transcript(events, stream)
    else:  # copied prompt words agree across interim decodes and are committed a second time
        assert final_words(events)[6:9] == stream.texts[3:6]


FOREVER = [" Feels", " like", " these", " days", " go", " on", " forever."]


@pytest.mark.parametrize("guarded", [True, False])
def test_a_final_decode_that_restarts_the_utterance_commits_nothing_twice(
        guarded: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not guarded:
        monkeypatch.setattr(recognizer, "drop_redecoded", lambda words, committed, room: words)
    stream = build([FOREVER])

    def restart(seen: Seen, new: list[int]) -> list[int | WordTiming]:
        if not seen.request.final:
            return list(new)
        assert seen.request.prefix  # some words were committed before the endpoint
        # Re-transcribes the whole utterance, forced prefix included, first word slightly differently.
        return [decoder.word(i, seen.start, " Feel" if i == 0 else None) for i in seen.heard]

    decoder = FakeDecoder(stream, restart)
    decoder.strict = guarded  # unguarded, the repeated words become a wrong forced prefix too
    events = drive(StreamCore(options()), decoder, stream.audio)
    if guarded:
        assert final_words(events) == FOREVER
        check_transcript(events, stream)
    else:
        assert "".join(final_words(events)).count("like these days") == 2


def test_final_word_times_never_go_back_when_decodes_disagree_on_a_boundary() -> None:
    stream = build([sentence(10)])

    def overlapping(seen: Seen, new: list[int]) -> list[int | WordTiming]:
        # the first new word of each decode is aligned 0.25 s early and ends where it starts: it starts and
        # ends before the last committed word ended
        early = [WordTiming(stream.words[i].text, (i,), stream.words[i].start - seen.start - 0.25,
                            stream.words[i].start - seen.start - 0.25, 0.9) for i in new[:1]]
        return early + new[1:]

    events = drive(StreamCore(options()), FakeDecoder(stream, overlapping), stream.audio)
    assert final_words(events) == stream.texts
    words = [w for f in finals(events) for w in f.words]
    assert len(finals(events)) > 1
    assert all(w.start <= w.end for w in words)
    assert all(a.end <= b.start for a, b in zip(words, words[1:]))
    assert all(a.end <= b.start for a, b in zip(finals(events), finals(events)[1:]))


def test_a_silent_reply_on_noise_commits_nothing_and_uses_no_segment() -> None:
    stream = build([2.5, sentence(5), 1.2])  # voiced noise, speech, voiced noise
    noise = [stream.spans[0], stream.spans[2]]

    class Hallucinating(FakeDecoder):
        def __call__(self, request: WindowRequest) -> WindowReply:
            reply = super().__call__(request)
            if any(a - 1 <= self.seen[-1].start <= b for a, b in noise):
                return WindowReply(language="en", no_speech_prob=0.9, silence=True)
            return reply

    decoder = Hallucinating(stream)
    events = drive(StreamCore(options()), decoder, stream.audio)
    assert sum(any(a - 1 <= s.start <= b for a, b in noise) for s in decoder.seen) >= 3  # the noise was decoded
    check_transcript(events, stream)
    assert [e.segment for e in events if isinstance(e, UtteranceEnd)] == [0]


def test_ten_minutes_of_speech_keep_windows_prompts_and_prefixes_bounded() -> None:
    rng = np.random.default_rng(7)
    utterances: list[list[str]] = []
    n = 0
    while sum(LEAD * 2 + len(u) * STEP + GAP for u in utterances) < 600:
        size = int(rng.choice([2, 5, 9, 14, 20, 35, 70]))
        utterances.append(sentence(size, n, every=int(rng.choice([0, 4, 7]))))
        n += size
    stream = build(utterances, gap=GAP)
    assert stream.audio.size >= 600 * SR
    decoder = FakeDecoder(stream)
    core = StreamCore(options())
    events = drive(core, decoder, stream.audio)
    check_transcript(events, stream)
    check_windows(decoder, stream)
    o = options()
    final_ends = [(w.end, w.tokens[0]) for e in finals(events) for w in e.words]
    first_utterance_request: dict[int, Seen] = {}
    for seen in decoder.seen:
        request = seen.request
        assert seen.end - seen.start <= o.max_window + o.min_chunk + FRAME + EPS
        assert len(request.prompt) <= PROMPT_TOKENS
        assert len(request.prefix) <= o.max_window / STEP + 1
        utterance = next(i for i, (a, b) in enumerate(stream.spans) if a - 1 <= seen.start <= b)
        first_utterance_request.setdefault(utterance, seen)
        if request.final:  # the prompt is the committed text before the window, newest last
            committed = [i for end, i in final_ends if end <= seen.start + EPS]
            assert request.prompt == tuple(committed[-PROMPT_TOKENS:])
    # Per-utterance state is reset: every utterance starts with an empty forced prefix.
    assert len(first_utterance_request) == len(utterances)
    assert all(s.request.prefix == () for s in first_utterance_request.values())
    assert not core._window_words and not core._utterance_words and len(core._context) == PROMPT_TOKENS


# --- options -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("task", "summarize", "task must be 'transcribe' or 'translate', got 'summarize'"),
        ("min_chunk", 0.05, "min_chunk=0.05 is out of range; allowed: 0.1 to 10 seconds"),
        ("min_chunk", 11, "min_chunk=11 is out of range"),
        ("max_window", 30, "max_window=30 is out of range; allowed: 2 to 25 seconds"),
        ("agreement", 0, "agreement=0 is out of range; allowed: 1 to 5"),
        ("beam_size", 0, "beam_size=0 is out of range; allowed: 1 to 10"),
        ("final_beam_size", 11, "final_beam_size=11 is out of range; allowed: 1 to 10"),
        ("context", -1, "context=-1 is out of range; allowed: 0 to 30 seconds"),
        ("final_context", 31, "final_context=31 is out of range; allowed: 0 to 30 seconds"),
        ("vad", VadConfig(endpoint_ms=100), "endpoint_ms=100 is out of range"),
    ],
)
def test_invalid_options_are_refused_with_a_clear_message(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError) as err:
        StreamOptions(**{field: value})
    assert message in str(err.value)


def test_default_and_boundary_options_are_accepted() -> None:
    StreamOptions()
    StreamOptions(task="translate", min_chunk=0.1, agreement=5, beam_size=10, context=30, max_window=2)


def test_a_forced_commit_whose_decode_hears_nothing_loses_no_word() -> None:
    """Under noise the decode of a forced commit can give up (a silent reply) where the interim decodes
    heard words: nothing is dropped, and the words come with a later decode."""
    stream = build([sentence(30)])  # 12 s with no pause; nothing agrees, so endpoints are forced
    flip, gave_up = [0], []

    def noisy(seen: Seen, new: list[int]) -> list[int | WordTiming]:
        flip[0] += 1
        if seen.request.final and seen.end < stream.spans[0][1] - 1 and not gave_up:
            gave_up.append(seen.end)
            return []  # the first forced endpoint hears nothing
        if not new or seen.request.final:
            return list(new)
        return [decoder.word(new[0], seen.start, f" {'xv'[flip[0] % 2]}{new[0]}"), *new[1:]]

    decoder = FakeDecoder(stream, noisy)
    events = drive(StreamCore(options()), decoder, stream.audio)
    assert gave_up
    assert [w.tokens for e in finals(events) for w in e.words] == [(i,) for i in range(len(stream.words))]


def drive_logged(core: StreamCore, decoder: FakeDecoder, audio: np.ndarray) -> tuple[list[Event], list[tuple]]:
    """``drive`` with replies at once; also returns (samples fed, request, events) for every decode."""
    events: list[Event] = []
    log: list[tuple] = []
    for offset in range(0, audio.size, CHUNK):
        events += core.feed(audio[offset: offset + CHUNK])
        while (request := core.next_request()) is not None:
            new = core.complete(request, decoder(request))
            log.append((offset + CHUNK, request, new))
            events += new
    events += core.flush()
    events += serve(core, decoder)
    return events, log


SPECULATE = dataclasses.replace(VAD, pause_ms=90)  # the final decode starts at a pause of 90 ms


def test_the_final_decode_starts_at_the_pause_and_the_endpoint_needs_no_other() -> None:
    stream = build([sentence(5), sentence(4, 5)])
    events, log = drive_logged(StreamCore(StreamOptions(vad=SPECULATE)), decoder := FakeDecoder(stream), stream.audio)
    check_transcript(events, stream)
    assert len(decoder.seen) == len(log)
    for _, end in stream.spans:
        voiced_end = end * SR
        last = [entry for entry in log if entry[0] <= voiced_end + (VAD.endpoint_ms + 100) * SR / 1000][-1]
        fed, request, new = last
        # The utterance's last decode is the full one (context, prompt, beam), asked for once the pause was
        # pause_ms long, well before the endpoint; nothing else is decoded until the next utterance.
        assert request.final and request.beam_size == StreamOptions.final_beam_size
        assert SPECULATE.pause_ms <= (fed - voiced_end) * 1000 / SR < VAD.endpoint_ms
        later = [entry for entry in log if entry[0] > fed]
        assert not later or later[0][0] > voiced_end + GAP * SR / 2
        assert not any(isinstance(e, UtteranceEnd) for e in new)  # the end is still uncertain there


def test_no_interim_decode_starts_while_a_pause_forms() -> None:
    """Between the last voiced frame and the pause's announcement an interim decode would only hold back
    the decode at the pause; with decodes asked every 0.1 s, none starts in that stretch, and the words
    are all there."""
    stream = build([sentence(4), sentence(4, 4), sentence(3, 8)], gap=0.2)
    core = StreamCore(StreamOptions(vad=SPECULATE, min_chunk=0.1))
    events, log = drive_logged(core, FakeDecoder(stream), stream.audio)
    assert final_words(events) == stream.texts
    for _, end in stream.spans:  # the VAD hears the last voiced frame up to a frame after the speech's end
        forming = ((end + SPECULATE.frame_ms / 1000) * SR, (end + SPECULATE.pause_ms / 1000) * SR)
        assert not any(not request.final and forming[0] < fed < forming[1] for fed, request, _ in log)
        assert any(request.speculative and forming[1] <= fed for fed, request, _ in log)


def test_without_pause_ms_no_decode_is_speculative() -> None:
    stream = build([sentence(5), sentence(4, 5)])
    events, log = drive_logged(StreamCore(options()), FakeDecoder(stream), stream.audio)
    check_transcript(events, stream)
    assert not any(request.speculative for _, request, _ in log)


def test_speech_that_goes_on_after_a_pause_gets_its_own_final_decode() -> None:
    # 0.2 s of silence inside the utterance: announced as a pause, not an end.
    stream = build([sentence(4), sentence(4, 4)], gap=0.2)
    events, log = drive_logged(StreamCore(StreamOptions(vad=SPECULATE)), FakeDecoder(stream), stream.audio)
    assert final_words(events) == stream.texts
    assert sum(isinstance(e, UtteranceEnd) for e in events) == 1
    finals_asked = [fed / SR for fed, request, _ in log if request.final]
    first_end, second_end = (end for _, end in stream.spans)
    assert any(first_end < t < first_end + 0.2 for t in finals_asked)  # speculated at the inner pause
    assert any(second_end < t < second_end + 0.3 for t in finals_asked)  # and again at the real end


def test_a_skipped_speculative_decode_leaves_the_endpoint_its_own_final_decode() -> None:
    stream = build([sentence(5), sentence(4, 5)])
    decoder = FakeDecoder(stream)

    def busy(request: WindowRequest) -> WindowReply:  # no worker free for any speculative decode
        return WindowReply(skipped=True) if request.speculative else decoder(request)

    events, log = drive_logged(StreamCore(StreamOptions(vad=SPECULATE)), busy, stream.audio)
    check_transcript(events, stream)
    ends = [end * SR for _, end in stream.spans]
    speculative = [fed for fed, request, _ in log if request.speculative]
    finals = [fed for fed, request, _ in log if request.final and not request.speculative]
    assert len(speculative) == len(finals) == 2
    for end, asked, final in zip(ends, speculative, finals):  # asked at the pause, decoded at the endpoint
        assert end < asked < end + VAD.endpoint_ms * SR / 1000 <= final
