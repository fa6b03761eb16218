"""Audio input: band-limited resampling and decoding live PCM streams to 16 kHz mono."""

from __future__ import annotations

import functools
import math
import numbers

import numpy as np

SAMPLE_RATE = 16000


# Resampling filter: Kaiser-windowed sinc, cut off at _ROLLOFF of the lower Nyquist frequency, spanning
# _ZERO_CROSSINGS sinc zero crossings each side. Gives a passband flat to ~6.8 kHz and >80 dB
# attenuation from ~7.95 kHz when producing 16 kHz audio.
_ZERO_CROSSINGS = 32
_ROLLOFF = 0.92
_KAISER_BETA = 8.6
_MAX_TABLE = 1 << 21  # largest precomputed coefficient table; rarer ratios compute weights on the fly
_BLOCK = 1 << 18  # coefficients gathered per block, bounding temporary memory

# Integer PCM by bytes per sample, as WAV and Wyoming store it: 8-bit unsigned, wider signed little-endian.
INTEGER_ENCODINGS = {1: "pcm_u8", 2: "pcm_s16le", 3: "pcm_s24le", 4: "pcm_s32le"}
_ENCODINGS = {**{name: width for width, name in INTEGER_ENCODINGS.items()}, "pcm_f32le": 4}  # bytes per sample
_MIN_RATE, _MAX_RATE = 8000, 192000
MAX_CHANNELS = 8


class AudioFormatError(ValueError):
    """Audio that cannot be decoded; the message names the cause and how to fix it."""


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def integer_samples(data: memoryview, width: int) -> np.ndarray:
    """Integer PCM of ``width`` bytes per sample (see ``INTEGER_ENCODINGS``) as float64 in [-1, 1)."""
    if width == 3:
        b = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        return (((b[:, 0] | b[:, 1] << 8 | b[:, 2] << 16) ^ 0x800000) - 0x800000) / 2.0**23
    samples = np.frombuffer(data, dtype=f"<{'u' if width == 1 else 'i'}{width}").astype(np.float64)
    if width == 1:
        samples -= 128
    return samples / 2.0 ** (8 * width - 1)


def to_pcm16(audio: np.ndarray) -> bytes:
    """Float audio to little-endian int16 bytes, the inverse of reading ``pcm_s16le``: 16-bit PCM decoded at
    16 kHz comes back bit for bit (webrtcvad hears what the client sent). Out-of-range samples are clipped."""
    return np.clip(np.rint(np.asarray(audio, dtype=np.float64) * 32768.0), -32768, 32767).astype("<i2").tobytes()


def check_rate(name: str, rate: object) -> int:
    if not _is_int(rate) or rate <= 0:
        raise ValueError(f"{name} must be a positive integer number of Hz, got {rate!r}")
    return int(rate)


class _Kernel:
    """Polyphase low-pass filter for resampling by the rational factor up/down."""

    def __init__(self, orig_sr: int, target_sr: int) -> None:
        g = math.gcd(orig_sr, target_sr)
        self.up, self.down = target_sr // g, orig_sr // g
        self.cutoff = _ROLLOFF * min(1.0, target_sr / orig_sr)  # cycles per two input samples
        self.width = _ZERO_CROSSINGS / self.cutoff  # half-length, in input samples
        self.taps = math.ceil(self.width)
        self.offsets = np.arange(1 - self.taps, self.taps + 1)
        self.table = None
        if self.up * self.offsets.size <= _MAX_TABLE:
            self.table = self._evaluate(np.arange(self.up))
            self.table.flags.writeable = False

    def _evaluate(self, phases: np.ndarray) -> np.ndarray:
        t = phases[:, None] / self.up - self.offsets[None, :]  # output time minus input time
        x = np.clip(t / self.width, -1.0, 1.0)
        window = np.i0(_KAISER_BETA * np.sqrt(1.0 - x * x)) / np.i0(_KAISER_BETA)
        return np.where(np.abs(t) < self.width, self.cutoff * np.sinc(self.cutoff * t) * window, 0.0)

    def weights(self, phases: np.ndarray) -> np.ndarray:
        """Filter taps [len(phases), 2 * taps] for outputs at input offsets ``phases / up``."""
        return self.table[phases] if self.table is not None else self._evaluate(phases)


@functools.lru_cache(maxsize=32)
def _kernel(orig_sr: int, target_sr: int) -> _Kernel:
    return _Kernel(orig_sr, target_sr)


class _StreamResampler:
    """Stateful resampler: output k sits at input time k * orig_sr / target_sr, with zeros before the start.

    Output k is emitted once input ``floor(k * down / up) + taps`` has arrived, so the result does not
    depend on how the input is split into chunks.
    """

    def __init__(self, orig_sr: int, target_sr: int) -> None:
        self.kernel = _kernel(orig_sr, target_sr)
        self.reset()

    def reset(self) -> None:
        self._buf = np.zeros(self.kernel.taps - 1)
        self._start = 1 - self.kernel.taps  # absolute input index of _buf[0]
        self._received = 0
        self._emitted = 0

    def process(self, x: np.ndarray) -> np.ndarray:
        k = self.kernel
        self._buf = np.concatenate([self._buf, x])
        self._received += x.size
        return self._emit(((self._received - k.taps) * k.up - 1) // k.down + 1)

    def flush(self) -> np.ndarray:
        k = self.kernel
        self._buf = np.concatenate([self._buf, np.zeros(k.taps)])
        out = self._emit(-(-self._received * k.up // k.down))
        self.reset()
        return out

    def _emit(self, stop: int) -> np.ndarray:
        k = self.kernel
        pos = np.arange(self._emitted, max(stop, self._emitted), dtype=np.int64) * k.down
        first, phase = pos // k.up - self._start, pos % k.up
        out = np.empty(pos.size)
        rows = max(1, _BLOCK // k.offsets.size)
        for s in range(0, pos.size, rows):
            frames = self._buf[first[s : s + rows, None] + k.offsets]
            out[s : s + rows] = np.einsum("ij,ij->i", frames, k.weights(phase[s : s + rows]))
        self._emitted += pos.size
        keep = self._emitted * k.down // k.up + 1 - k.taps  # first input the next output needs
        if keep > self._start:
            self._buf = self._buf[keep - self._start :]
            self._start = keep
        return out


def resample(audio: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited (Kaiser-windowed sinc) resampling of 1-D audio; returns float32.

    Output sample k is aligned with input time ``k * orig_sr / target_sr`` (no delay) and the output has
    ``ceil(len(audio) * target_sr / orig_sr)`` samples. The signal is taken as zero outside its extent.
    """
    orig_sr, target_sr = check_rate("orig_sr", orig_sr), check_rate("target_sr", target_sr)
    x = np.asarray(audio)
    if x.ndim != 1:
        raise ValueError(f"resample expects 1-D audio, got shape {x.shape}")
    if orig_sr == target_sr:
        return x.astype(np.float32)
    r = _StreamResampler(orig_sr, target_sr)
    return np.concatenate([r.process(x.astype(np.float64)), r.flush()]).astype(np.float32)


class PcmDecoder:
    """Stateful converter from raw interleaved little-endian PCM chunks to 16 kHz mono float32 in [-1, 1].

    Channels are averaged, or with ``separate`` kept apart: every result is then [channels, samples].
    ``pcm_f32le`` values outside [-1, 1] are clipped. Decoding a stream in chunks of any size yields the same
    samples as decoding it at once. When resampling, each output sample is held back until the input it depends
    on has arrived: a constant latency of ``latency`` seconds (about 2.2 ms, 4.4 ms at 8 kHz, 0 at 16 kHz).
    ``flush`` releases the held samples at end of stream.
    """

    def __init__(self, sample_rate: int, encoding: str = "pcm_s16le", channels: int = 1,
                 separate: bool = False) -> None:
        if not _is_int(sample_rate) or not _MIN_RATE <= sample_rate <= _MAX_RATE:
            raise AudioFormatError(
                f"unsupported sample rate {sample_rate!r}: use an integer rate from {_MIN_RATE} to "
                f"{_MAX_RATE} Hz (e.g. 8000, 16000, 44100, 48000)"
            )
        if encoding not in _ENCODINGS:
            raise AudioFormatError(
                f"unsupported encoding {encoding!r}: use one of {', '.join(sorted(_ENCODINGS))}"
            )
        if not _is_int(channels) or not 1 <= channels <= MAX_CHANNELS:
            raise AudioFormatError(
                f"unsupported channel count {channels!r}: use an integer from 1 to {MAX_CHANNELS}"
            )
        self.sample_rate, self.encoding, self.channels = int(sample_rate), encoding, int(channels)
        self.separate = separate
        self._width = _ENCODINGS[encoding]
        self.frame_size = self._width * self.channels
        self._resamplers = [_StreamResampler(self.sample_rate, SAMPLE_RATE)
                            for _ in range(self.channels if separate else 1)] if self.sample_rate != SAMPLE_RATE else []

    @property
    def latency(self) -> float:
        """Seconds of input the resampler holds back before emitting the matching output."""
        return self._resamplers[0].kernel.taps / self.sample_rate if self._resamplers else 0.0

    def decode(self, data: bytes | bytearray | memoryview) -> np.ndarray:
        """Convert whole frames of PCM to 16 kHz float32 (mono, or [channels, samples] with ``separate``); on
        error nothing is consumed."""
        raw = memoryview(data).cast("B")
        if raw.nbytes % self.frame_size:
            raise AudioFormatError(
                f"got {raw.nbytes} bytes, not a whole number of {self.frame_size}-byte frames "
                f"({self._width}-byte {self.encoding} samples x {self.channels} channel(s)); "
                "send chunks whose length is a multiple of the frame size"
            )
        if self.encoding != "pcm_f32le":
            samples = integer_samples(raw, self._width)
        else:
            with np.errstate(invalid="ignore"):  # signalling NaNs are refused just below
                samples = np.frombuffer(raw, dtype="<f4").astype(np.float64)
            if not np.isfinite(samples).all():
                raise AudioFormatError("pcm_f32le chunk contains NaN or infinite samples; send finite values")
        frames = np.clip(samples, -1.0, 1.0).reshape(-1, self.channels)
        signals = frames.T if self.separate else frames.mean(axis=1)[None]
        if self._resamplers:
            signals = np.stack([np.clip(r.process(x), -1.0, 1.0) for r, x in zip(self._resamplers, signals)])
        return self._shaped(signals)

    def flush(self) -> np.ndarray:
        """Return the samples still held by the resampler and reset it for a new stream."""
        if not self._resamplers:
            return self._shaped(np.zeros((self.channels if self.separate else 1, 0)))
        return self._shaped(np.stack([np.clip(r.flush(), -1.0, 1.0) for r in self._resamplers]))

    def _shaped(self, signals: np.ndarray) -> np.ndarray:
        """[channels, samples] float32 with ``separate``, else the one row."""
        return signals.astype(np.float32) if self.separate else signals[0].astype(np.float32)
