"""Test signals shared by the test modules: a speech-like tone that webrtcvad takes for speech."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

SAMPLE_RATE = 16000
FORMANTS = ((700, 130), (1220, 70), (2600, 160))  # (centre Hz, bandwidth Hz) of an /a/-like vowel


@lru_cache(maxsize=8)
def _vowel(samples: int, rate: int) -> np.ndarray:
    t = np.arange(samples) / rate
    f0 = 140.0
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.03 * np.sin(2 * np.pi * 3 * t))) / rate
    signal = np.zeros_like(t)
    for k in range(1, int(4000 / f0)):
        gain = sum(1 / (1 + ((k * f0 - fc) / bw) ** 2) for fc, bw in FORMANTS)
        signal += gain / np.sqrt(k) * np.sin(k * phase)
    signal *= 0.6 + 0.4 * np.sin(2 * np.pi * 4 * t) ** 2
    return signal / np.sqrt(np.mean(signal**2))


def vowel(seconds: float, level_dbfs: float = -20.0, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Harmonic, formant-shaped, syllable-modulated tone (140 Hz, 4 syllables a second) at ``level_dbfs`` RMS:
    webrtcvad reliably takes it for speech. Slices of one long cached signal, so it is cheap to call often."""
    rate = int(rate)
    n = round(seconds * rate)
    return (_vowel(max(n, 60 * rate), rate)[:n] * 10 ** (level_dbfs / 20)).astype(np.float32)
