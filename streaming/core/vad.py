"""Speech segmentation with webrtcvad on a sample-count timeline (sans-I/O).

The detector turns a 16 kHz mono float32 stream into utterances. Only speech audio
(pre-pad + voiced audio + hangover) is emitted; silence between utterances is skipped, and
every :class:`SpeechAudio` carries its absolute start sample so a recogniser can map offsets
in its own window back to the stream timeline.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import webrtcvad

from .audio import SAMPLE_RATE, to_pcm16

_SAMPLES_PER_MS = SAMPLE_RATE // 1000


@dataclass
class VadConfig:
    """Detector tuning; durations in milliseconds, energy floor in dBFS (RMS re full scale 1.0)."""

    aggressiveness: int = 2
    frame_ms: int = 30
    pre_speech_pad_ms: int = 200
    hangover_ms: int = 300
    endpoint_ms: int = 300
    short_utterance_ms: int = 1000
    min_speech_ms: int = 90
    energy_floor_dbfs: float = -55.0
    noise_margin_db: float = 6.0
    noise_window_ms: int = 3000
    long_utterance_ms: int = 6000
    long_endpoint_ms: int = 150
    pause_ms: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value is outside its allowed range."""
        _check("aggressiveness", self.aggressiveness, 0, 3)
        if self.frame_ms not in (10, 20, 30):
            raise ValueError(f"frame_ms={self.frame_ms!r} is invalid; allowed: 10, 20 or 30")
        _check("pre_speech_pad_ms", self.pre_speech_pad_ms, 0, 5000)
        _check("hangover_ms", self.hangover_ms, 0, 5000)
        _check("endpoint_ms", self.endpoint_ms, self.hangover_ms, 60000, " (must be >= hangover_ms)")
        _check("short_utterance_ms", self.short_utterance_ms, 0, 10000)
        _check("min_speech_ms", self.min_speech_ms, 0, 2000)
        _check("energy_floor_dbfs", self.energy_floor_dbfs, -120.0, 0.0)
        _check("noise_margin_db", self.noise_margin_db, 0.0, 40.0)
        _check("noise_window_ms", self.noise_window_ms, 300, 30000)
        _check("long_utterance_ms", self.long_utterance_ms, 1000, 60000)
        _check("long_endpoint_ms", self.long_endpoint_ms, self.frame_ms, self.endpoint_ms, " (must be <= endpoint_ms)")
        _check("pause_ms", self.pause_ms, 0, self.long_endpoint_ms, " (0: off; must be <= long_endpoint_ms)")


def _check(name: str, value: float, lo: float, hi: float, note: str = "") -> None:
    if not lo <= value <= hi:  # also rejects NaN
        raise ValueError(f"{name}={value!r} is out of range; allowed: {lo}..{hi}{note}")


@dataclass(frozen=True)
class SpeechStart:
    """An utterance begins at ``sample`` (onset minus pre-pad)."""

    sample: int


@dataclass(frozen=True, eq=False)
class SpeechAudio:
    """Speech audio starting at absolute ``start_sample``; contiguous within an utterance."""

    start_sample: int
    audio: np.ndarray = field(repr=False)

    @property
    def end_sample(self) -> int:
        """Absolute sample just past this chunk."""
        return self.start_sample + len(self.audio)


@dataclass(frozen=True)
class SpeechPause:
    """Nothing voiced for ``pause_ms`` since ``voiced_end``, the end of the last voiced frame: the utterance may
    end here. It has ended here if its :class:`SpeechEnd` carries the same ``voiced_end``."""

    voiced_end: int


@dataclass(frozen=True)
class SpeechEnd:
    """The utterance ends at ``sample`` (last voiced sample + hangover); ``voiced_end`` is the end of its last
    voiced frame (None where the end was asked for rather than heard)."""

    sample: int
    voiced_end: int | None = None


VadEvent = SpeechStart | SpeechAudio | SpeechPause | SpeechEnd


class VoiceActivityDetector:
    """Incremental speech segmenter: feed any chunk size, get :data:`VadEvent` lists back.

    A frame is voiced when webrtcvad says so and its level is at least ``energy_floor_dbfs`` and
    ``noise_margin_db`` above the noise floor, the quietest frame of the last ``noise_window_ms``: under a
    steady noise floor (room tone, fans, distant voices) webrtcvad alone hears speech everywhere and no
    utterance ever ends.
    Onset needs ``min_speech_ms`` of voiced frames within a look-back of twice that length.
    Inside an utterance any voiced frame extends it; a pause of ``endpoint_ms`` ends it, or twice that
    while it holds less than ``short_utterance_ms`` of audio since the onset: a word or two cut off alone
    decodes badly ("rear | right" became "We're"), and the wait costs latency only on short utterances.
    Once an utterance has gone on for ``long_utterance_ms``, a pause of ``long_endpoint_ms`` (the breath
    between phrases of continuous talk) ends it, so that utterances, and the windows decoded, stay bounded.
    A pause of ``pause_ms`` inside an utterance is announced (:class:`SpeechPause`), so that the decode
    that ends the utterance can start before the endpoint is certain.
    """

    def __init__(self, config: VadConfig | None = None) -> None:
        config = config or VadConfig()
        config.validate()
        self._vad = webrtcvad.Vad(config.aggressiveness)
        self._frame = config.frame_ms * _SAMPLES_PER_MS
        self._pre_pad = config.pre_speech_pad_ms * _SAMPLES_PER_MS
        self._hangover = config.hangover_ms * _SAMPLES_PER_MS
        self._endpoint = config.endpoint_ms * _SAMPLES_PER_MS
        self._short = config.short_utterance_ms * _SAMPLES_PER_MS
        self._min_frames = max(1, math.ceil(config.min_speech_ms / config.frame_ms))
        self._floor_db = config.energy_floor_dbfs
        self._margin_db = config.noise_margin_db
        self._noise_frames = max(1, config.noise_window_ms // config.frame_ms)
        self._levels: deque[tuple[int, float]] = deque()  # (frame number, dB): increasing levels, a sliding min
        self._frames = 0
        self._long = config.long_utterance_ms * _SAMPLES_PER_MS
        self._long_endpoint = config.long_endpoint_ms * _SAMPLES_PER_MS
        self._pause = config.pause_ms * _SAMPLES_PER_MS
        self._paused = False  # the current pause was announced
        self._recent: deque[tuple[int, bool]] = deque(maxlen=2 * self._min_frames)
        self._history_len = self._pre_pad + self._recent.maxlen * self._frame
        self._history = np.zeros(0, np.float32)  # idle audio ending at self._pos
        self._buf = np.zeros(0, np.float32)  # partial frame not yet classified
        self._pending: list[np.ndarray] = []  # pause audio past the hangover, kept if speech resumes
        self._pos = 0  # samples classified so far
        self._seen = 0
        self._in_speech = False
        self._last_voiced_end = 0
        self._emitted_end = 0
        self._onset = 0

    @property
    def in_speech(self) -> bool:
        """True between a SpeechStart and its SpeechEnd."""
        return self._in_speech

    @property
    def paused_since(self) -> int | None:
        """The ``voiced_end`` of the pause announced last, while it goes on; else None."""
        return self._last_voiced_end if self._in_speech and self._paused else None

    @property
    def pausing(self) -> bool:
        """Inside an utterance the newest frames are unvoiced and the pause of ``pause_ms`` is not announced
        yet: it may come within ``pause_ms``. Always False with ``pause_ms`` off."""
        return bool(self._pause) and self._in_speech and not self._paused and self._pos > self._last_voiced_end

    @property
    def samples_seen(self) -> int:
        """Total samples fed so far (the stream timeline)."""
        return self._seen

    def feed(self, audio: np.ndarray) -> list[VadEvent]:
        """Consume a 1-D float32 chunk of any length and return the events it completes."""
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1:
            raise ValueError(f"audio must be 1-D mono, got shape {audio.shape}")
        self._seen += audio.size
        data = np.concatenate((self._buf, audio))
        full = data.size - data.size % self._frame
        events: list[VadEvent] = []
        for off in range(0, full, self._frame):
            frame = data[off : off + self._frame]
            self._process(frame, self._is_voiced(frame), events)
        self._buf = data[full:].copy()
        return events

    def flush(self) -> list[VadEvent]:
        """End of stream: emit the remaining speech audio and a SpeechEnd if inside an utterance."""
        events: list[VadEvent] = []
        if self._buf.size:  # too short for webrtcvad; counts as a pause
            self._process(self._buf, False, events)
            self._buf = np.zeros(0, np.float32)
        if self._in_speech:
            self._end(min(self._last_voiced_end + self._hangover, self._pos), events)
        return events

    @property
    def noise_floor_dbfs(self) -> float:
        """The level of the quietest frame in the last ``noise_window_ms`` (-120 before any audio)."""
        return self._levels[0][1] if self._levels else -120.0

    def _is_voiced(self, frame: np.ndarray) -> bool:
        level = 10.0 * math.log10(float(np.mean(np.square(frame, dtype=np.float64))) + 1e-12)
        self._frames += 1
        while self._levels and self._levels[-1][1] >= level:
            self._levels.pop()
        self._levels.append((self._frames, level))
        if self._levels[0][0] <= self._frames - self._noise_frames:
            self._levels.popleft()
        gate = max(self._floor_db, self.noise_floor_dbfs + self._margin_db)
        return level >= gate and self._vad.is_speech(to_pcm16(frame), SAMPLE_RATE)

    def _process(self, frame: np.ndarray, voiced: bool, events: list[VadEvent]) -> None:
        start, self._pos = self._pos, self._pos + frame.size
        if self._in_speech:
            self._speech_frame(start, frame, voiced, events)
        else:
            self._idle_frame(start, frame, voiced, events)

    def _idle_frame(self, start: int, frame: np.ndarray, voiced: bool, events: list[VadEvent]) -> None:
        self._history = np.concatenate((self._history, frame))[-self._history_len :]
        self._recent.append((start, voiced))
        if sum(v for _, v in self._recent) < self._min_frames:
            return
        onset = next(s for s, v in self._recent if v)
        # History never reaches back past the previous utterance's end (or 0).
        history_start = self._pos - self._history.size
        begin = max(onset - self._pre_pad, history_start)
        events.append(SpeechStart(begin))
        self._onset = onset
        events.append(SpeechAudio(begin, self._history[begin - history_start :]))
        self._in_speech = True
        self._last_voiced_end = self._emitted_end = self._pos
        self._history = np.zeros(0, np.float32)
        self._recent.clear()

    def _speech_frame(self, start: int, frame: np.ndarray, voiced: bool, events: list[VadEvent]) -> None:
        if voiced:
            events.append(SpeechAudio(self._emitted_end, np.concatenate((*self._pending, frame))))
            self._pending = []
            self._last_voiced_end = self._emitted_end = self._pos
            self._paused = False
            return
        hang_end = self._last_voiced_end + self._hangover
        cut = min(max(hang_end - start, 0), frame.size)
        if cut:  # still within the hangover, so nothing is pending before this frame
            events.append(SpeechAudio(start, frame[:cut]))
            self._emitted_end = start + cut
        if cut < frame.size:
            self._pending.append(frame[cut:])
        if self._pause and not self._paused and self._pos - self._last_voiced_end >= self._pause:
            events.append(SpeechPause(self._last_voiced_end))
            self._paused = True
        spoken = self._last_voiced_end - self._onset
        endpoint = 2 * self._endpoint if spoken < self._short else self._endpoint
        if spoken >= self._long:
            endpoint = self._long_endpoint
        if self._pos - self._last_voiced_end >= endpoint:
            self._end(min(hang_end, self._pos), events)

    def _end(self, end: int, events: list[VadEvent]) -> None:
        events.append(SpeechEnd(end, self._last_voiced_end))
        self._in_speech = self._paused = False
        pause = np.concatenate((np.zeros(0, np.float32), *self._pending))
        self._history = pause[-self._history_len :]  # audio from `end` onwards, for the next pre-pad
        self._pending = []
