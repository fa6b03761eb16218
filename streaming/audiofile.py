"""Reading audio files: WAV natively, anything else (FLAC, MP3, MP4/M4A, OGG, WebM...) with PyAV's FFmpeg
libraries in-process; 16 kHz mono float out."""

from __future__ import annotations

import errno
import io
import os
import struct

import av
import numpy as np

from .core.audio import INTEGER_ENCODINGS, SAMPLE_RATE, AudioFormatError, check_rate, integer_samples, resample

_WAVE_FORMAT_PCM = 0x0001
_WAVE_FORMAT_IEEE_FLOAT = 0x0003
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE
# What the upload APIs promise (OpenAI's list); PyAV reads many more.
FORMATS = ("flac", "mp3", "mp4", "mpeg", "mpga", "m4a", "ogg", "wav", "webm")


def read_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read an audio file as float32 mono in [-1, 1] at ``sample_rate``, averaging channels (see
    :func:`decode_audio`)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            buf = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "audio file not found", path) from None
    return decode_audio(buf, sample_rate, repr(path))


def decode_audio(buf: bytes, sample_rate: int = SAMPLE_RATE, name: str = "the audio",
                 max_seconds: float | None = None) -> np.ndarray:
    """Decode a whole audio file's bytes as float32 mono in [-1, 1] at ``sample_rate``, averaging channels.

    WAV (integer PCM 8/16/24/32-bit, IEEE float 32/64-bit, plain or WAVE_FORMAT_EXTENSIBLE) is decoded
    natively, anything else with PyAV (the first audio stream of any container FFmpeg reads). ``name`` names
    the file in errors (:class:`AudioFormatError`); audio longer than ``max_seconds`` is refused as it is decoded.
    """
    sample_rate = check_rate("sample_rate", sample_rate)
    if not buf:
        raise AudioFormatError(f"{name} is empty: provide an audio file ({', '.join(FORMATS)})")
    if buf[:4] != b"RIFF" or buf[8:12] != b"WAVE":
        if buf[:4] == b"RIFF" and len(buf) < 12:
            raise AudioFormatError(f"{name} is a truncated WAV file (header incomplete); re-export it")
        return _decode_av(buf, sample_rate, name, "is not a WAV file", max_seconds)
    decoded = _parse_wav(memoryview(buf), name)
    if isinstance(decoded, str):
        return _decode_av(buf, sample_rate, name, decoded, max_seconds)
    audio, rate = decoded
    _check_length(len(audio) / rate, name, max_seconds)
    if rate != sample_rate:
        audio = resample(audio, rate, sample_rate)
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


class AudioTooLong(AudioFormatError):
    """The audio runs longer than the caller allows."""


def _check_length(seconds: float, name: str, max_seconds: float | None) -> None:
    if max_seconds is not None and seconds > max_seconds:
        raise AudioTooLong(f"{name} is longer than {max_seconds:g} s; split it into shorter files")


def _corrupt(path: str, cause: str) -> AudioFormatError:
    return AudioFormatError(f"{path} is not a valid WAV file ({cause}); re-export or re-download it")


def _parse_wav(buf: memoryview, path: str) -> tuple[np.ndarray, int] | str:
    """Decode RIFF/WAVE bytes to (mono float64, rate), or return why PyAV has to decode them instead."""
    pos, fmt = 12, None
    while pos + 8 <= len(buf):
        chunk, size = struct.unpack_from("<4sI", buf, pos)
        pos += 8
        if chunk == b"fmt ":
            if size < 16 or pos + size > len(buf):
                raise _corrupt(path, "truncated fmt chunk")
            tag, channels, rate, _, block_align, bits = struct.unpack_from("<HHIIHH", buf, pos)
            if tag == _WAVE_FORMAT_EXTENSIBLE and size >= 40:
                tag = struct.unpack_from("<H", buf, pos + 24)[0]  # SubFormat GUID starts with the tag
            fmt = tag, channels, rate, block_align, bits
        elif chunk == b"data":
            if fmt is None:
                raise _corrupt(path, "data chunk before fmt chunk")
            end = len(buf) if size == 0xFFFFFFFF else pos + size  # 0xFFFFFFFF: length unknown
            if end > len(buf):
                raise _corrupt(path, f"truncated: data chunk declares {size} bytes, {len(buf) - pos} present")
            return _decode_wav_data(buf[pos:end], fmt, path)
        pos += size + (size & 1)
    raise _corrupt(path, "no data chunk" if fmt else "no fmt chunk")


def _decode_wav_data(
    data: memoryview, fmt: tuple[int, int, int, int, int], path: str
) -> tuple[np.ndarray, int] | str:
    tag, channels, rate, block_align, bits = fmt
    if not channels or not rate or not block_align or block_align % channels:
        raise _corrupt(path, f"bad fmt chunk: {channels} channels, {rate} Hz, block align {block_align}")
    width = block_align // channels
    n = len(data) // block_align
    if tag == _WAVE_FORMAT_PCM and width in INTEGER_ENCODINGS:
        samples = integer_samples(data[: n * block_align], width)
    elif tag == _WAVE_FORMAT_IEEE_FLOAT and width in (4, 8):
        samples = np.frombuffer(data, dtype=f"<f{width}", count=n * channels).astype(np.float64)
        if not np.isfinite(samples).all():
            raise _corrupt(path, "float samples contain NaN or infinity")
    else:
        return f"uses an unsupported WAV encoding (format tag {tag:#06x}, {bits} bits per sample)"
    return np.clip(samples, -1.0, 1.0).reshape(n, channels).mean(axis=1), rate


def _decode_av(buf: bytes, sample_rate: int, name: str, reason: str, max_seconds: float | None) -> np.ndarray:
    """The first audio stream of ``buf`` with PyAV, resampled to ``sample_rate`` with its channels averaged."""
    pieces: list[np.ndarray] = []
    samples = 0
    try:
        with av.open(io.BytesIO(buf), mode="r") as container:
            if not container.streams.audio:
                raise AudioFormatError(f"{name} {reason} and holds no audio stream: send an audio file")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="fltp", rate=sample_rate)  # planar: one row per channel
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    pieces.append(out.to_ndarray().mean(axis=0))
                    samples += out.samples
                _check_length(samples / sample_rate, name, max_seconds)
            pieces += [out.to_ndarray().mean(axis=0) for out in resampler.resample(None)]
    except av.FFmpegError as exc:
        raise AudioFormatError(f"{name} {reason}, and it could not be decoded as audio either ({exc}): send "
                               f"an audio file ({', '.join(FORMATS)})") from None
    if not pieces:
        raise AudioFormatError(f"{name} {reason} and its audio stream holds no samples: send a longer file")
    return np.clip(np.concatenate(pieces), -1.0, 1.0).astype(np.float32)
