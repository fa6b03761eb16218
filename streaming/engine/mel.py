"""Whisper's log-mel spectrogram front end: 25 ms Hann STFT, 10 ms hop, Slaney mel filterbank."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from ..core.audio import SAMPLE_RATE

N_FFT = 400
HOP_LENGTH = 160
CHUNK_LENGTH = 30
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples in a 30 s chunk
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 frames in a 30 s chunk
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100

# Slaney mel scale: linear (200/3 Hz per mel) below 1 kHz, logarithmic (27 mels per factor 6.4) above.
_HZ_PER_MEL = 200.0 / 3.0
_LOG_HZ = 1000.0
_LOG_MEL = _LOG_HZ / _HZ_PER_MEL
_MELS_PER_LOG = 27.0 / math.log(6.4)


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    log_part = _LOG_MEL + np.log(np.maximum(hz, _LOG_HZ) / _LOG_HZ) * _MELS_PER_LOG
    return np.where(hz < _LOG_HZ, hz / _HZ_PER_MEL, log_part)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return np.where(mel < _LOG_MEL, mel * _HZ_PER_MEL, _LOG_HZ * np.exp((mel - _LOG_MEL) / _MELS_PER_LOG))


@functools.lru_cache(maxsize=32)
def mel_filters(n_mels: int, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT) -> torch.Tensor:
    """Slaney-normalised triangular mel filterbank [n_mels, n_fft // 2 + 1] from 0 Hz to Nyquist.

    Matches ``librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels)`` defaults. The result is
    cached and shared: do not modify it in place.
    """
    if n_mels <= 0 or n_fft <= 0 or sample_rate <= 0:
        raise ValueError(f"need positive n_mels, sample_rate, n_fft; got {n_mels}, {sample_rate}, {n_fft}")
    edges = _mel_to_hz(np.linspace(0.0, _hz_to_mel(np.float64(sample_rate / 2)), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    rising = (freqs - lower) / (centre - lower)
    falling = (upper - freqs) / (upper - centre)
    triangles = np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (upper - lower))
    return torch.from_numpy(triangles.astype(np.float32))


def log_mel_spectrogram(
    audio: np.ndarray | torch.Tensor,
    n_mels: int = 80,
    padding: int = 0,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Whisper's normalised log-mel spectrogram [n_mels, (len(audio) + padding) // HOP_LENGTH].

    ``audio`` is 16 kHz mono; ``padding`` zeros are appended before the STFT. Values are log10 power,
    floored at 8 below the maximum, then mapped by ``(x + 4) / 4``.
    """
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if isinstance(audio, torch.Tensor):
        x = audio.float()
    else:
        x = torch.tensor(np.asarray(audio), dtype=torch.float32)
    if x.ndim != 1:
        raise ValueError(f"log_mel_spectrogram expects 1-D audio, got shape {tuple(x.shape)}")
    if device is not None:
        x = x.to(device)
    if padding:
        x = F.pad(x, (0, padding))
    if x.shape[0] <= N_FFT // 2:
        raise ValueError(
            f"need more than {N_FFT // 2} samples (audio plus padding) for the reflect-padded STFT, "
            f"got {x.shape[0]}; pass a longer signal or a larger padding"
        )
    window = torch.hann_window(N_FFT, device=x.device)
    stft = torch.stft(
        x, N_FFT, HOP_LENGTH, window=window, center=True, pad_mode="reflect", return_complex=True
    )
    power = stft[:, :-1].abs() ** 2
    log_spec = torch.clamp(mel_filters(n_mels).to(x.device) @ power, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def pad_or_trim(
    array: np.ndarray | torch.Tensor, length: int = N_SAMPLES, axis: int = -1
) -> np.ndarray | torch.Tensor:
    """Zero-pad at the end or truncate ``array`` along ``axis`` to ``length``; numpy or torch in, same out."""
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    if isinstance(array, torch.Tensor):
        dim = axis % array.ndim
        size = array.shape[dim]
        if size > length:
            return array.narrow(dim, 0, length)
        if size < length:
            pads = [0] * (2 * array.ndim)
            pads[2 * (array.ndim - 1 - dim) + 1] = length - size
            return F.pad(array, pads)
        return array
    array = np.asarray(array)
    dim = axis % array.ndim
    size = array.shape[dim]
    if size > length:
        return array[(slice(None),) * dim + (slice(0, length),)]
    if size < length:
        widths = [(0, 0)] * array.ndim
        widths[dim] = (0, length - size)
        return np.pad(array, widths)
    return array
