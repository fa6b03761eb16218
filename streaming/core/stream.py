"""The streaming recogniser's state for one stream: audio in, partial and final hypotheses out.

:class:`StreamCore` is the pure state machine (VAD, window, agreement, events); it never runs the model.
It asks for work with :meth:`StreamCore.next_request` and takes the answer in :meth:`StreamCore.complete`;
:class:`streaming.engine.recognizer.Recognizer` runs that work inline on an engine.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .agreement import SENTENCE_END, LocalAgreement, Word
from .events import Event, Final, LanguageDetected, Partial, UtteranceEnd
from .guards import cut_loops, drop_redecoded
from .languages import check_task
from .messages import PROMPT_TOKENS, TRAILING_SILENCE, EmbedRequest, Reply, Request, WindowReply, WindowRequest
from .speakers import SpeakerTracker
from .vad import SAMPLE_RATE, SpeechAudio, SpeechEnd, SpeechPause, SpeechStart, VadConfig, VoiceActivityDetector
from .window import AudioWindow

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class StreamOptions:
    """Per-stream settings. ``language`` None means detect (multilingual models); ``diarize`` labels every final
    with its speaker (:mod:`streaming.core.speakers`)."""

    language: str | None = None
    task: str = "transcribe"
    prompt: str | None = None
    interim_results: bool = True
    vad: VadConfig = field(default_factory=VadConfig)
    min_chunk: float = 0.8
    agreement: int = 2
    commit_margin: float = 0.0
    commit_probability: float = 0.3
    max_window: float = 12.0
    sentence_trim: float = 6.0
    beam_size: int = 1
    final_beam_size: int = 5
    context: float = 0.0
    silence: float = TRAILING_SILENCE
    final_context: float = 30.0
    max_pending: float = 3.0
    diarize: bool = False

    def __post_init__(self) -> None:
        check_task(self.task)
        if not 0.1 <= self.min_chunk <= 10:
            raise ValueError(f"min_chunk={self.min_chunk} is out of range; allowed: 0.1 to 10 seconds")
        if not 2 <= self.max_window <= 25:
            raise ValueError(f"max_window={self.max_window} is out of range; allowed: 2 to 25 seconds")
        if not 1 <= self.agreement <= 5:
            raise ValueError(f"agreement={self.agreement} is out of range; allowed: 1 to 5")
        if not 0 <= self.commit_margin <= 2:
            raise ValueError(f"commit_margin={self.commit_margin} is out of range; allowed: 0 to 2 seconds")
        if not 0 <= self.commit_probability <= 1:
            raise ValueError(f"commit_probability={self.commit_probability} is out of range; allowed: 0 to 1")
        for name in ("beam_size", "final_beam_size"):
            if not 1 <= getattr(self, name) <= 10:
                raise ValueError(f"{name}={getattr(self, name)} is out of range; allowed: 1 to 10")
        if not 0 <= self.silence <= 10:
            raise ValueError(f"silence={self.silence} is out of range; allowed: 0 to 10 seconds")
        if not 1 <= self.max_pending <= 20:
            raise ValueError(f"max_pending={self.max_pending} is out of range; allowed: 1 to 20 seconds")
        for name in ("context", "final_context"):
            if not 0 <= getattr(self, name) <= 30:
                raise ValueError(f"{name}={getattr(self, name)} is out of range; allowed: 0 to 30 seconds")
        self.vad.validate()


FINAL_DECODE_MIN_NEW = 0.1
# Language detection on a second of audio is unreliable: detect on every decode until a window holds this
# much speech, an utterance ends or words are committed, then keep that language for the stream.
LANGUAGE_LOCK_SECONDS = 3.0
# Where a forced commit cuts the window: the quietest QUIET_SPAN of the window's end, between QUIET_SEARCH and
# QUIET_MARGIN seconds before it (the decodes so far heard audio after the cut).
QUIET_SPAN = 0.1
QUIET_SEARCH = 1.5
QUIET_MARGIN = 0.3


class StreamCore:
    """Pure streaming state for one audio stream; the timeline is counted in samples."""

    def __init__(self, options: StreamOptions = StreamOptions(), multilingual: bool = False):
        self.options = options
        self.language = options.language if multilingual else "en"
        self._vad = VoiceActivityDetector(options.vad)
        self._queue: deque = deque()
        self._window = AudioWindow()
        self._agreement = LocalAgreement(options.agreement, options.commit_margin, options.commit_probability)
        self._context: list[int] = []  # tokens of committed text before the window (the prompt)
        self._window_words: list[Word] = []  # committed words still inside the window (forced prefix)
        self._utterance_words: list[Word] = []  # committed in this utterance, to drop re-decoded text
        self._draft: tuple[int, ...] = ()  # tokens of the partial: what the next decode probably says first
        self._hypothesis: list[Word] = []  # the newest hypothesis's words after the committed ones
        self._pending: WindowRequest | None = None
        self._decoded_to = 0  # window end sample at the last decode
        self._ending = False  # an endpoint was reached: decode once more and commit everything
        self._cut: int | None = None  # sample: a forced commit is due for the words before it
        self._forced: WindowRequest | None = None  # the forced commit's decode, while in flight
        self._forced_from = 0  # sample: the next forced commit waits for max_pending after this
        self._segment = 0
        self._revision = 0
        self._partial_text = ""
        self._utterance_has_text = False
        self._committed_end = 0.0  # stream seconds: the end of the last final word
        self._speakers = SpeakerTracker(options.vad) if options.diarize else None
        self._held: deque[Event] = deque()  # events behind a final whose speaker is not known yet
        self._pause: int | None = None  # voiced_end of the pause heard last in this utterance
        self._speculated: int | None = None  # the pause whose speculative final decode was asked for
        self._speculation: WindowRequest | None = None  # that decode, while in flight
        self._speculated_from = 0  # _decoded_to before it: it counts as a decode only if it stands
        self._speculative: tuple[WindowRequest, WindowReply] | None = None  # its result, set aside
        self._end_voiced: int | None = None  # voiced_end of the utterance's SpeechEnd

    # --- input ---------------------------------------------------------------------------------------

    def feed(self, audio: np.ndarray) -> list[Event]:
        """Add 16 kHz mono float audio; returns events that need no inference."""
        self._detected(self._vad.feed(audio))
        return self._release(self._advance())

    def finalize(self) -> list[Event]:
        """Commit everything pending now (the client asked for it): treat as an endpoint."""
        if self._window.length:
            self._detected([SpeechEnd(self._window.end_sample, self._vad.paused_since)])
        return self._release(self._advance())

    def flush(self) -> list[Event]:
        """End of audio: the VAD closes any open utterance."""
        self._detected(self._vad.flush())
        return self._release(self._advance())

    def _detected(self, events: list) -> None:
        """Queue the VAD's events for the window; the speaker tracker takes them at once, with the noise floor
        the VAD had then (the window may wait for a final decode, the tracker need not)."""
        self._queue.extend(events)
        if self._speakers is not None:
            for event in events:
                if isinstance(event, SpeechAudio):
                    self._speakers.feed(event.start_sample, event.audio, self._vad.noise_floor_dbfs)
                elif isinstance(event, SpeechEnd):
                    self._speakers.end_utterance()

    @property
    def idle(self) -> bool:
        """Nothing queued, nothing in flight, nothing waiting to be decoded or labelled."""
        return not self._queue and self._pending is None and not self._ending and not self._held and (
            self._pause is None or self._pause == self._speculated) and (
            self._speakers is None or not self._speakers.busy) and (
            self._window.end_sample - self._decoded_to < self.options.min_chunk * SAMPLE_RATE)

    @property
    def samples_seen(self) -> int:
        return self._vad.samples_seen

    # --- work ----------------------------------------------------------------------------------------

    def next_request(self) -> Request | None:
        """The work this stream needs now, or None: speaker embeddings first (cheap, and finals may wait for
        them), else a decode. At most one request of each kind is in flight per stream; the decode in flight
        is returned again until it is completed."""
        if self._speakers is not None and (embed := self._speakers.next_request()) is not None:
            return embed
        if self._pending is not None:
            return self._pending
        if self._ending:
            needed = not self._speculation_stands() and self._final_decode_needed()
            return self._request(final=True) if needed else None
        if self._cut is not None:
            self._forced = self._request(final=True)
            return self._forced
        if self._pause is not None and self._pause != self._speculated and self._window.length:
            self._speculated, self._speculated_from = self._pause, self._decoded_to
            self._speculation = self._request(final=True, speculative=True)
            return self._speculation
        if self._window.end_sample - self._decoded_to < self.options.min_chunk * SAMPLE_RATE:
            return None
        if self._vad.pausing:
            # The decode at the pause, at most pause_ms away, hears this audio; an interim decode started now
            # would hold it back. If speech goes on instead, the interim decode starts with the next voiced frame.
            return None
        return self._request(final=False)

    def _speculation_stands(self) -> bool:
        """The utterance ended at the pause where the decode that ends an utterance was run in advance
        (speculatively), and no other decode came since: its result is the final decode's. It heard all of
        the speech; only pause audio came after."""
        return self._speculative is not None and self._end_voiced is not None and self._end_voiced == self._speculated

    def _final_decode_needed(self) -> bool:
        """At an endpoint, decode again if audio arrived since the last decode or words wait to be committed
        (the final decode, with full context and beam search, decides them)."""
        return (self._window.end_sample - self._decoded_to > FINAL_DECODE_MIN_NEW * SAMPLE_RATE
                or self._agreement.pending)

    def _request(self, final: bool, speculative: bool = False) -> WindowRequest:
        """Interim decodes are cheap: a short audio context, greedy, no previous-text prompt (with a short
        context the prompt makes Whisper copy it). The decode at an endpoint, which commits the rest of the
        utterance, gets Whisper's full context, the prompt and beam search, as does a forced commit."""
        o = self.options
        self._speculative = None  # set aside for a window that this decode changes
        self._pending = WindowRequest(
            audio=self._window.audio.copy(), prompt=tuple(self._context[-PROMPT_TOKENS:]) if final else (),
            prefix=tuple(t for w in self._window_words for t in w.tokens), draft=self._draft,
            initial_prompt=o.prompt, language=self.language, task=o.task, final=final,
            beam_size=o.final_beam_size if final else o.beam_size, context=o.final_context if final else o.context,
            silence=o.silence, speculative=speculative)
        self._decoded_to = self._window.end_sample
        return self._pending

    def complete(self, request: Request, reply: Reply) -> list[Event]:
        """Take the result of ``request``; returns the events it produces."""
        if isinstance(request, EmbedRequest):
            if self._speakers is None:
                raise ValueError("complete() got an embedding request from a stream without speaker labels")
            self._speakers.complete(request, reply)
            return self._release([])
        return self._release(self._decoded(request, reply))

    def _decoded(self, request: WindowRequest, reply: WindowReply) -> list[Event]:
        if request is not self._pending:
            raise ValueError("complete() got a request this stream did not issue or already completed")
        self._pending = None
        if request is self._speculation:
            # Set aside until the utterance ends at this pause (it stands) or speech goes on (it is dropped);
            # meanwhile the interim decodes go on as if it had not run. Its words are the partial on show.
            self._speculation, self._decoded_to = None, self._speculated_from
            self._speculative = None if reply.skipped else (request, reply)
            shown = not (reply.skipped or reply.silence or self._ending)
            return (self._partial(self._heard(request, reply)[0]) if shown else []) + self._advance()
        return self._apply(request, reply)

    def _heard(self, request: WindowRequest, reply: WindowReply) -> tuple[list[Word], float]:
        """A reply's words on the stream timeline, less loops and re-decoded committed text, and the time up
        to which the decode heard audio."""
        offset = self._window.start
        words = [Word(w.word, offset + w.start, offset + w.end, w.probability, tuple(w.tokens))
                 for w in reply.words]
        heard_until = offset + len(request.audio) / SAMPLE_RATE
        return drop_redecoded(cut_loops(self._window_words, words), self._utterance_words,
                              heard_until - self._committed_end), heard_until

    def _apply(self, request: WindowRequest, reply: WindowReply) -> list[Event]:
        """The events of a decode's result: commits, the partial, the utterance's end after a final decode."""
        forced, self._forced = request is self._forced, None
        if reply.silence and not request.final:
            # Nothing usable (noise, or a decode that looped or was improbable): keep the hypotheses so far;
            # more audio, or the final decode at the endpoint, decides.
            log.debug("window %.2f-%.2fs: no usable hypothesis (no-speech %.2f, avg logprob %.2f)",
                      self._window.start, self._window.end, reply.no_speech_prob, reply.avg_logprob)
            self._force_commit_if_stalled()
            return self._advance()
        events: list[Event] = []
        words, heard_until = self._heard(request, reply)
        if forced:
            committed, partial = self._split_at_cut(words, heard_until)
        else:
            committed, partial = self._agreement.update(words, heard_until)
            if request.final:
                committed, partial = committed + self._agreement.commit_all(), []
        self._draft = tuple(t for w in partial for t in w.tokens)
        self._hypothesis = partial
        log.debug("window %.2f-%.2fs final=%s prefix=%d tokens: heard %r, committed %r",
                  self._window.start, self._window.end, request.final, len(request.prefix),
                  "".join(w.word for w in reply.words), "".join(w.text for w in committed))
        heard_enough = request.final or len(request.audio) >= LANGUAGE_LOCK_SECONDS * SAMPLE_RATE
        if reply.language and self.language is None and (heard_enough or committed):
            self.language = reply.language
            events.append(LanguageDetected(reply.language, reply.language_probability))
        events += self._commit(committed)
        if request.final and not forced:
            events += self._end_utterance()
        else:
            events += self._partial(partial)
            self._trim()
            self._force_commit_if_stalled()
        return events + self._advance()

    # --- internals -----------------------------------------------------------------------------------

    def _release(self, events: list[Event]) -> list[Event]:
        """With speaker labels, events leave in order once the finals before them are labelled; a final whose
        words have two speakers leaves as two finals."""
        if self._speakers is None:
            return events
        self._held.extend(events)
        out: list[Event] = []
        while self._held:
            event = self._held[0]
            if isinstance(event, Final):
                labels = self._speakers.labels(event.words)
                if labels is None:
                    break
                out += _by_speaker(event, labels)
                self._speakers.forget(event.end)
            else:
                out.append(event)
            self._held.popleft()
        return out

    def _advance(self) -> list[Event]:
        """Apply queued VAD events until an utterance end waits for its last decode."""
        events: list[Event] = []
        while self._queue and not self._ending:
            ev = self._queue.popleft()
            if isinstance(ev, SpeechStart):
                if not self._window.length:
                    self._window.open(ev.sample)
                    self._decoded_to = ev.sample
            elif isinstance(ev, SpeechAudio):
                if not self._window.length:
                    self._window.open(ev.start_sample)
                    self._decoded_to = ev.start_sample
                self._window.append(ev.start_sample, ev.audio)
            elif isinstance(ev, SpeechPause):
                self._pause = ev.voiced_end
            elif isinstance(ev, SpeechEnd):
                self._ending, self._end_voiced = True, ev.voiced_end
        if self._ending and self._pending is None and self._speculation_stands():
            request, reply = self._speculative
            self._speculative = None
            return events + self._apply(request, reply)
        if self._ending and self._pending is None and not self._final_decode_needed():
            events += self._commit(self._agreement.commit_all())
            events += self._end_utterance()
            events += self._advance()
        return events

    def _commit(self, words: list[Word]) -> list[Event]:
        if not words:
            return []
        words = self._monotone(words)
        self._window_words += words
        self._utterance_words += words
        self._utterance_has_text = True
        text = "".join(w.text for w in words)
        return [Final(self._segment, text, words[0].start, words[-1].end, tuple(words))]

    def _monotone(self, words: list[Word]) -> list[Word]:
        """Final word times never go back: aligned times of separate decodes can overlap by a frame or two."""
        out = []
        for w in words:
            start = max(w.start, self._committed_end)
            self._committed_end = max(w.end, start)
            out.append(Word(w.text, start, self._committed_end, w.probability, w.tokens))
        return out

    def _partial(self, words: list[Word]) -> list[Event]:
        text = "".join(w.text for w in words)
        if not self.options.interim_results or text == self._partial_text:
            return []
        self._partial_text = text
        self._revision += 1
        start = words[0].start if words else self._window.end
        end = words[-1].end if words else self._window.end
        return [Partial(self._segment, self._revision, text, start, end)]

    def _end_utterance(self) -> list[Event]:
        events: list[Event] = []
        if self._partial_text and self.options.interim_results:
            self._revision += 1
            events.append(Partial(self._segment, self._revision, "", self._window.end, self._window.end))
        if self._utterance_has_text:
            events.append(UtteranceEnd(self._segment, self._window.end))
            self._segment += 1
        self._to_context(self._window_words)
        self._window_words, self._utterance_words, self._partial_text, self._utterance_has_text = [], [], "", False
        self._draft, self._hypothesis = (), []
        self._agreement.reset()
        self._window.open(self._window.end_sample)
        self._decoded_to = self._forced_from = self._window.end_sample
        self._ending, self._cut = False, None
        self._pause = self._speculated = self._speculative = self._end_voiced = None
        return events

    def _trim(self) -> None:
        """Cut the window between a committed sentence end and the committed word after it, or before the
        last committed word when the window grows past ``max_window``. Cutting in the gap before a word is
        safer than at a word's end: aligned times are least reliable at the ends of words."""
        words = self._window_words
        cut = None
        for i in range(len(words) - 2, -1, -1):
            if self._window.duration > self.options.sentence_trim and words[i].text.rstrip().endswith(SENTENCE_END):
                cut = i + 1
                break
        if cut is None and self._window.duration > self.options.max_window and len(words) > 1:
            cut = len(words) - 1
        if not cut:
            return
        done, self._window_words = words[:cut], words[cut:]
        self._to_context(done)
        self._window.trim(round(self._window_words[0].start * SAMPLE_RATE))

    def _force_commit_if_stalled(self) -> None:
        """Speech with no pause for the VAD to end it (continuous talk, babble, music) and words that do not
        agree would hold the transcript back without bound: once the newest hypothesis's first uncommitted
        word is ``max_pending`` seconds old, a forced commit decodes the window as an endpoint would (full
        context, prompt, beam search) and commits its words before a quiet word gap near the window's end;
        the utterance and its window go on. A window in which nothing is heard is cut once it is
        ``max_window`` long."""
        if self._ending or self._cut is not None:
            return
        o = self.options
        if self._hypothesis:
            since = max(self._hypothesis[0].start, self._forced_from / SAMPLE_RATE)
            if self._window.end - since < o.max_pending:
                return
        elif self._window.duration < o.max_window:
            return
        self._cut = self._quiet_point()
        log.debug("window %.2f-%.2fs: commit forced before %.2fs", self._window.start, self._window.end,
                  self._cut / SAMPLE_RATE)

    def _split_at_cut(self, words: list[Word], heard_until: float) -> tuple[list[Word], list[Word]]:
        """A forced commit's result: the words before the cut are final, the rest is the new hypothesis.
        Where the decode found nothing before the cut but the interim decodes heard words (noise made it
        give up), nothing is committed and the audio is kept; where nobody heard anything, the audio before
        the cut is dropped from the window."""
        cut_sample, self._cut = self._cut, None
        cut = cut_sample / SAMPLE_RATE
        k = 0
        while k < len(words) and (words[k].start + words[k].end) / 2 < cut:
            k += 1
        if not k and any(w.end <= cut for w in self._hypothesis):
            self._forced_from = self._window.end_sample
            return [], self._hypothesis
        if not k:
            self._to_context(self._window_words)
            self._window_words = []
            self._window.trim(cut_sample)
        self._forced_from = cut_sample
        self._agreement.reset()
        agreed, rest = self._agreement.update(words[k:], heard_until)
        return words[:k] + agreed, rest

    def _to_context(self, words: list[Word]) -> None:
        """Committed words leave the window: their tokens join the prompt of later final decodes."""
        self._context = (self._context + [t for w in words for t in w.tokens])[-PROMPT_TOKENS:]

    def _quiet_point(self) -> int:
        """Where to cut, a sample on the stream timeline: in the quietest gap between two words of the
        newest hypothesis that ends between ``QUIET_SEARCH`` and ``QUIET_MARGIN`` seconds before the window's
        end (the decodes so far heard audio on both sides of it), or, with no such gap, at the quietest
        ``QUIET_SPAN`` there."""
        audio, origin = self._window.audio, self._window.start_sample
        lo = max(0, audio.size - round(QUIET_SEARCH * SAMPLE_RATE))
        hi = max(lo + 1, audio.size - round(QUIET_MARGIN * SAMPLE_RATE))
        words = self._window_words[-1:] + self._hypothesis
        gaps = [(round(a.end * SAMPLE_RATE) - origin, round(b.start * SAMPLE_RATE) - origin)
                for a, b in zip(words, words[1:])]
        gaps = [(max(a, lo), min(b, hi)) for a, b in gaps if a < hi and b > lo and b >= a]
        if gaps:
            return origin + min((_quietest(audio, a, b) for a, b in gaps), key=lambda q: q[1])[0]
        return origin + _quietest(audio, lo, hi)[0]


def _by_speaker(final: Final, labels: list[int]) -> list[Final]:
    """``final`` split where the speaker of its words changes, each part labelled."""
    parts: list[Final] = []
    start = 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            words = final.words[start:i]
            parts.append(Final(final.segment, "".join(w.text for w in words), words[0].start, words[-1].end,
                               words, labels[start]))
            start = i
    return parts


def _quietest(audio: np.ndarray, lo: int, hi: int) -> tuple[int, float]:
    """The middle of the quietest ``QUIET_SPAN`` (or less, in a shorter range) of ``audio[lo:hi]``, and its
    mean energy."""
    span = max(1, min(round(QUIET_SPAN * SAMPLE_RATE), hi - lo))
    energy = np.concatenate(([0.0], np.cumsum(np.square(audio[lo:hi], dtype=np.float64))))
    sums = energy[span:] - energy[:-span]
    if not sums.size:
        return lo, float("inf")
    best = int(np.argmin(sums))
    return lo + best + span // 2, float(sums[best]) / span
