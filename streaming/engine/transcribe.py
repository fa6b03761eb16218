"""Offline transcription of a whole recording with Whisper's sequential 30-second procedure."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..core.agreement import Word
from ..core.messages import WordTiming
from ..core.speakers import SpeakerTracker
from ..core.vad import SpeechAudio, SpeechEnd, VadConfig, VoiceActivityDetector
from .alignment import find_alignment
from .decoding import DecodingOptions, DecodingResult, FallbackPolicy, decode_with_fallback, detect_language, prefill
from .engine import Engine
from .inference import embed
from .mel import FRAMES_PER_SECOND, HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE

SECONDS_PER_TOKEN = 0.02
SILENCE_PEAK = 1e-3  # a window whose samples all stay below this (-60 dBFS) is digital silence: not decoded
# A window whose text ends this many frames (1 s) or more before the window does, with at least this much speech
# (VAD) after the text, is decoded again from there. Less is most often the end of the last word: decoded
# alone, it turns into a hallucinated " you".
MIN_REST_FRAMES = 100
MIN_REST_SPEECH = 2.0


@dataclass
class Segment:
    start: float
    end: float
    text: str
    tokens: list[int]
    avg_logprob: float
    no_speech_prob: float
    temperature: float
    words: list[WordTiming] = field(default_factory=list)


@dataclass(frozen=True)
class TranscribeOptions:
    language: str | None = None
    task: str = "transcribe"
    beam_size: int = 5
    best_of: int = 5
    patience: float = 1.0
    word_timestamps: bool = False
    initial_prompt: str | None = None
    condition_on_previous_text: bool = True
    policy: FallbackPolicy = FallbackPolicy()


@dataclass(frozen=True, eq=False)
class TranscribeRequest:
    """A whole recording (16 kHz mono float) for :func:`transcribe` on the server's scheduler. It runs like a final
    decode: alone, ahead of interim decodes and never shed (``final`` and ``context`` say so to the scheduler).
    ``on_segment`` hears each segment as it is decoded and ``cancelled`` stops the work at the next window; both
    stay in this process (inference in a child process sends the whole transcript at the end)."""

    audio: np.ndarray
    options: TranscribeOptions = TranscribeOptions()
    on_segment: Callable[[Segment], None] | None = None
    cancelled: threading.Event | None = None
    final: bool = True
    context: float = 0.0
    diarize: bool = False  # label every word's speaker (Transcript.speakers); needs word timestamps

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("on_segment", "cancelled")}


class Cancelled(Exception):
    """The caller stopped waiting for a :class:`TranscribeRequest`."""


def run_request(engine: Engine, request: TranscribeRequest) -> Transcript:
    """Transcribe a :class:`TranscribeRequest` (on a scheduler worker)."""
    def progress(done: float, total: float) -> None:
        if request.cancelled is not None and request.cancelled.is_set():
            raise Cancelled("the transcription was cancelled: its caller is gone")

    transcript = transcribe(engine, request.audio, request.options, progress, on_segment=request.on_segment)
    if request.diarize:
        spans = [(w.start, w.end) for s in transcript.segments for w in s.words]
        transcript.speakers = speaker_labels(engine, request.audio, spans) if spans else []
    return transcript


@dataclass(frozen=True)
class WindowTrace:
    """One window of :func:`transcribe` (for parity checks): its start and length in mel frames, the prompt it
    was given, its decode (None when digital silence skipped it), why it was skipped if it was ("silence" or
    "no_speech") and how many frames it consumed."""

    seek: int
    frames: int
    prompt: tuple[int, ...]
    result: DecodingResult | None
    consumed: int
    skipped: str | None = None


@dataclass
class Transcript:
    language: str
    segments: list[Segment]
    duration: float
    speakers: list[int] | None = None  # with diarize: the speaker of every word, in order

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments).strip()


def transcribe(engine: Engine, audio: np.ndarray, options: TranscribeOptions = TranscribeOptions(),
               progress: Callable[[float, float], None] | None = None,
               trace: Callable[[WindowTrace], None] | None = None,
               on_segment: Callable[[Segment], None] | None = None) -> Transcript:
    """Transcribe 16 kHz mono float audio. ``progress(done_seconds, total_seconds)`` is called per window,
    ``trace`` with each window's :class:`WindowTrace` and ``on_segment`` with each segment, in order, once its
    window is decoded (with its words, when asked for)."""
    duration = len(audio) / SAMPLE_RATE
    mel = engine.mel(audio, padding=N_SAMPLES)
    content_frames = mel.shape[-1] - N_FRAMES
    language = options.language
    if not engine.multilingual:
        language = "en"
    elif language is None:
        features = engine.encode(mel[:, :N_FRAMES])
        language, _ = detect_language(engine.model, engine.tokenizer(None, options.task), features)
    tokenizer = engine.tokenizer(language, options.task)
    base = DecodingOptions(task=options.task, language=language, beam_size=options.beam_size,
                           best_of=options.best_of, patience=options.patience)
    history: list[int] = tokenizer.encode(" " + options.initial_prompt.strip()) if options.initial_prompt else []
    segments: list[Segment] = []
    decoded = 0  # segments of earlier windows
    seek = 0

    def advance(window: int, prompt: tuple[int, ...], result: DecodingResult | None, consumed: int,
                skipped: str | None = None) -> None:
        nonlocal seek
        if trace:
            trace(WindowTrace(seek, window, prompt, result, consumed, skipped))
        seek += consumed
        if progress:
            progress(min(seek / FRAMES_PER_SECOND, duration), duration)

    while seek < content_frames:
        window = min(N_FRAMES, content_frames - seek)
        offset = seek / FRAMES_PER_SECOND
        chunk = audio[seek * HOP_LENGTH: (seek + window) * HOP_LENGTH]
        if len(chunk) == 0 or float(abs(chunk).max()) < SILENCE_PEAK:  # Whisper hallucinates on silence
            advance(window, (), None, window, "silence")
            continue
        features = engine.encode(mel[:, seek: seek + N_FRAMES])
        opts = replace(base, prompt=tuple(history) if options.condition_on_previous_text else ())
        start = prefill(engine.model, tokenizer, features, opts)
        result = decode_with_fallback(engine.model, tokenizer, features, opts, options.policy, start)
        if options.policy.is_silence(result):
            advance(window, opts.prompt, result, window, "no_speech")
            continue
        new_segments, consumed = _split_segments(
            result.tokens, tokenizer.timestamp_begin, window,
            lambda frame, rest=chunk: _speech_seconds(rest[frame * HOP_LENGTH:]) >= MIN_REST_SPEECH)
        if (new_segments and window == N_FRAMES and consumed == N_FRAMES
                and result.tokens[-1] < tokenizer.timestamp_begin):
            new_segments, consumed = _anchor_open_end(engine, tokenizer, features, new_segments)
        for seg_tokens, seg_start, seg_end in new_segments:
            text = tokenizer.decode(seg_tokens)
            if not text.strip():
                continue
            segments.append(Segment(offset + seg_start, offset + min(seg_end, window / FRAMES_PER_SECOND),
                                    text, seg_tokens, result.avg_logprob, result.no_speech_prob,
                                    result.temperature))
        if options.word_timestamps:
            _add_words(engine, tokenizer, features, segments[decoded:], window, offset)
        if on_segment:
            for segment in segments[decoded:]:
                on_segment(segment)
        decoded = len(segments)
        history += result.tokens  # with its timestamps, as Whisper conditions on (text alone: no timestamps next)
        if result.temperature > 0.5:  # do not condition the next window on a high-temperature guess
            history = []
        advance(window, opts.prompt, result, consumed)
    return Transcript(language, segments, duration)


def _split_segments(tokens: list[int], tb: int, window: int,
                    speech_after: Callable[[int], bool] = lambda frame: True,
                    ) -> tuple[list[tuple[list[int], float, float]], int]:
    """Cut a window's tokens at timestamp pairs; also return how many mel frames the window consumed.

    Text that ends with a single timestamp ends the window's speech as far as the decoder is concerned, but
    it sometimes stops early ("Feels like these days go on forever." then end of text, with 14 s of speech
    after it): when a second or more of the window follows and ``speech_after(frame)`` says the audio from
    that timestamp's frame on holds speech, the window is consumed only up to that timestamp.
    """
    is_ts = [t >= tb for t in tokens]
    single_ending = len(tokens) >= 2 and not is_ts[-2] and is_ts[-1]

    def consumed_at_end() -> int:
        ended = round((tokens[-1] - tb) * SECONDS_PER_TOKEN * FRAMES_PER_SECOND)
        return ended if 0 < ended <= window - MIN_REST_FRAMES and speech_after(ended) else window
    cuts = [i for i in range(1, len(tokens)) if is_ts[i] and is_ts[i - 1]]
    out = []
    if cuts:
        bounds = cuts + ([len(tokens)] if single_ending else [])
        last = 0
        for cut in bounds:
            piece = tokens[last:cut]
            stamps = [t for t in piece if t >= tb]
            if stamps:
                text = [t for t in piece if t < tb]
                out.append((text, (stamps[0] - tb) * SECONDS_PER_TOKEN, (stamps[-1] - tb) * SECONDS_PER_TOKEN))
            last = cut
        if single_ending:
            return out, consumed_at_end()
        last_stamp = tokens[cuts[-1] - 1] - tb
        return out, max(1, round(last_stamp * SECONDS_PER_TOKEN * FRAMES_PER_SECOND))
    # a leading timestamp opens the text and only a timestamp after the text closes it
    end = (tokens[-1] - tb) * SECONDS_PER_TOKEN if single_ending else window / FRAMES_PER_SECOND
    start = min((tokens[0] - tb) * SECONDS_PER_TOKEN, end) if tokens and is_ts[0] else 0.0
    text = [t for t in tokens if t < tb]
    return ([(text, start, end)] if text else []), consumed_at_end() if single_ending and text else window


def _speech_seconds(audio: np.ndarray) -> float:
    """Seconds of ``audio`` (16 kHz mono float) that the voice-activity detector takes for speech."""
    vad = VoiceActivityDetector(VadConfig())
    return sum(len(e.audio) for e in vad.feed(audio) + vad.flush() if isinstance(e, SpeechAudio)) / SAMPLE_RATE


def _anchor_open_end(engine: Engine, tokenizer, features, segments):
    """The text ended without a closing timestamp in a full window: rather than skip the rest of the 30 s
    (losing any speech after the text), end the last segment where its last word ends and seek there."""
    text_tokens, start, _ = segments[-1]
    words = find_alignment(engine.model, tokenizer, text_tokens, features, N_FRAMES)
    if not words:
        return segments, N_FRAMES
    end = max(words[-1].end, start + SECONDS_PER_TOKEN)
    return segments[:-1] + [(text_tokens, start, end)], max(1, round(end * FRAMES_PER_SECOND))


def _add_words(engine: Engine, tokenizer, features, segments: list[Segment], window: int, offset: float) -> None:
    """Word timings for the segments decoded from one window, placed on the recording's timeline."""
    text_tokens = [t for s in segments for t in s.tokens]
    if not text_tokens:
        return
    words = find_alignment(engine.model, tokenizer, text_tokens, features, window)
    i = 0
    for segment in segments:
        count = 0
        taken: list[WordTiming] = []
        while i < len(words) and count < len(segment.tokens):
            w = words[i]
            taken.append(replace(w, start=w.start + offset, end=w.end + offset))
            count += len(w.tokens)
            i += 1
        segment.words = taken
        if taken:
            segment.start, segment.end = taken[0].start, taken[-1].end



def speaker_labels(engine: Engine, audio: np.ndarray, spans: list[tuple[float, float]]) -> list[int]:
    """The speaker of each span (start, end seconds) of a recording (16 kHz mono float), labelled as a live
    stream with ``diarize`` labels them: speech cut at pauses, every piece's voice clustered in time order."""
    config = VadConfig()
    vad, tracker = VoiceActivityDetector(config), SpeakerTracker(config)
    frame = config.frame_ms * SAMPLE_RATE // 1000
    for start in range(0, len(audio) + frame, frame):  # the detector's noise floor as it was at each frame
        events = vad.feed(audio[start: start + frame]) if start < len(audio) else vad.flush()
        for event in events:
            if isinstance(event, SpeechAudio):
                tracker.feed(event.start_sample, event.audio, vad.noise_floor_dbfs)
            elif isinstance(event, SpeechEnd):
                tracker.end_utterance()
    tracker.end_utterance()
    while (request := tracker.next_request()) is not None:
        tracker.complete(request, embed(engine, [request])[0])
    labels = tracker.labels([Word("", start, end, 1.0) for start, end in spans])
    assert labels is not None  # every piece is decided once the audio has ended
    return labels
