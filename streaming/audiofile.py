"""Reading audio files: WAV natively, anything else through an ffmpeg executable; 16 kHz mono float out."""

from __future__ import annotations

import errno
import os
import shutil
import struct
import subprocess

import numpy as np

from .core.audio import INTEGER_ENCODINGS, SAMPLE_RATE, AudioFormatError, check_rate, integer_samples, resample

_WAVE_FORMAT_PCM = 0x0001
_WAVE_FORMAT_IEEE_FLOAT = 0x0003
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE


def read_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read an audio file as float32 mono in [-1, 1] at ``sample_rate``, averaging channels.

    WAV (integer PCM 8/16/24/32-bit, IEEE float 32/64-bit, plain or WAVE_FORMAT_EXTENSIBLE) is decoded
    natively; anything else needs an ``ffmpeg`` executable on PATH.
    """
    sample_rate = check_rate("sample_rate", sample_rate)
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            buf = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "audio file not found", path) from None
    if not buf:
        raise AudioFormatError(f"{path!r} is empty: provide a WAV file or another ffmpeg-readable format")
    if buf[:4] != b"RIFF" or buf[8:12] != b"WAVE":
        if buf[:4] == b"RIFF" and len(buf) < 12:
            raise AudioFormatError(f"{path!r} is a truncated WAV file (header incomplete); re-export it")
        return _decode_ffmpeg(path, sample_rate, "is not a WAV file")
    decoded = _parse_wav(memoryview(buf), path)
    if isinstance(decoded, str):
        return _decode_ffmpeg(path, sample_rate, decoded)
    audio, rate = decoded
    if rate != sample_rate:
        audio = resample(audio, rate, sample_rate)
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


def _corrupt(path: str, cause: str) -> AudioFormatError:
    return AudioFormatError(f"{path!r} is not a valid WAV file ({cause}); re-export or re-download it")


def _parse_wav(buf: memoryview, path: str) -> tuple[np.ndarray, int] | str:
    """Decode RIFF/WAVE bytes to (mono float64, rate), or return why ffmpeg is needed instead."""
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


def _decode_ffmpeg(path: str, sample_rate: int, reason: str) -> np.ndarray:
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise AudioFormatError(
            f"{path!r} {reason}: only WAV (PCM or float) is decoded natively; install ffmpeg and put it "
            "on PATH to read MP3, FLAC, OGG, M4A and other formats, or convert the file to WAV"
        )
    cmd = [exe, "-nostdin", "-hide_banner", "-loglevel", "error", "-i", os.path.abspath(path)]
    cmd += ["-f", "s16le", "-ac", "1", "-ar", str(sample_rate), "-"]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0:
        lines = proc.stderr.decode(errors="replace").split("\n")
        detail = "; ".join(line.strip() for line in lines if line.strip()) or f"exit status {proc.returncode}"
        raise AudioFormatError(f"{path!r} {reason}, and ffmpeg could not decode it either ({detail}): "
                               "check that it is an audio file")
    return np.frombuffer(proc.stdout, dtype="<i2", count=len(proc.stdout) // 2).astype(np.float32) / 32768.0
