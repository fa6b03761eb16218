"""Tests for streaming.engine.mel against an independent numpy reference."""

import math

import numpy as np
import pytest
import torch

from streaming.engine import mel
from streaming.engine.mel import N_FRAMES, N_SAMPLES, log_mel_spectrogram, mel_filters, pad_or_trim


def slaney_mel(hz: float) -> float:
    return hz / (200 / 3) if hz < 1000 else 15 + math.log(hz / 1000) / (math.log(6.4) / 27)


def slaney_hz(m: float) -> float:
    return m * 200 / 3 if m < 15 else 1000 * math.exp((m - 15) * math.log(6.4) / 27)


def reference_filters(n_mels: int, sr: int = 16000, n_fft: int = 400) -> tuple[np.ndarray, list[float]]:
    """Triangle-by-triangle Slaney filterbank and its centre frequencies, with plain loops."""
    top = slaney_mel(sr / 2)
    points = [slaney_hz(top * i / (n_mels + 1)) for i in range(n_mels + 2)]
    bank = np.zeros((n_mels, n_fft // 2 + 1))
    for m in range(n_mels):
        left, centre, right = points[m], points[m + 1], points[m + 2]
        for k in range(n_fft // 2 + 1):
            f = k * sr / n_fft
            if left < f <= centre:
                bank[m, k] = (f - left) / (centre - left)
            elif centre < f < right:
                bank[m, k] = (right - f) / (right - centre)
        bank[m] *= 2 / (right - left)
    return bank, points[1:-1]


def reference_log_mel(x: np.ndarray, n_mels: int) -> np.ndarray:
    """Whisper's log-mel with a framed numpy rfft STFT."""
    padded = np.pad(x.astype(np.float64), 200, mode="reflect")
    n_frames = len(x) // 160
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)
    frames = np.stack([padded[i * 160 : i * 160 + 400] * window for i in range(n_frames)], axis=1)
    power = np.abs(np.fft.rfft(frames, axis=0)) ** 2
    log_spec = np.log10(np.maximum(reference_filters(n_mels)[0] @ power, 1e-10))
    return (np.maximum(log_spec, log_spec.max() - 8) + 4) / 4


def test_constants():
    assert (mel.SAMPLE_RATE, mel.N_FFT, mel.HOP_LENGTH, mel.CHUNK_LENGTH) == (16000, 400, 160, 30)
    assert (N_SAMPLES, N_FRAMES, mel.FRAMES_PER_SECOND) == (480000, 3000, 100)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_filters_match_reference(n_mels):
    got = mel_filters(n_mels)
    assert got.shape == (n_mels, 201) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), reference_filters(n_mels)[0], atol=1e-6)
    assert mel_filters(n_mels) is got  # cached


def test_filters_other_rates():
    expected = reference_filters(40, 22050, 512)[0]
    np.testing.assert_allclose(mel_filters(40, 22050, 512).numpy(), expected, atol=1e-6)


def test_filters_match_librosa_if_available():
    librosa = pytest.importorskip("librosa")
    for n_mels in (80, 128):
        expected = librosa.filters.mel(sr=16000, n_fft=400, n_mels=n_mels)
        np.testing.assert_allclose(mel_filters(n_mels).numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_reference(n_mels):
    rng = np.random.default_rng(n_mels)
    t = np.arange(16000 * 2 + 123) / 16000
    x = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)
    got = log_mel_spectrogram(x, n_mels=n_mels)
    assert got.shape == (n_mels, len(x) // 160)
    np.testing.assert_allclose(got.numpy(), reference_log_mel(x, n_mels), atol=1e-4)


def test_log_mel_padding_and_inputs():
    x = np.random.default_rng(3).standard_normal(5000).astype(np.float32) * 0.1
    padded = log_mel_spectrogram(x, padding=N_SAMPLES)
    assert padded.shape == (80, (5000 + N_SAMPLES) // 160)
    np.testing.assert_allclose(
        padded.numpy(), reference_log_mel(np.concatenate([x, np.zeros(N_SAMPLES, np.float32)]), 80), atol=1e-4
    )
    from_tensor = log_mel_spectrogram(torch.from_numpy(x).double(), padding=N_SAMPLES, device="cpu")
    torch.testing.assert_close(from_tensor, padded)
    assert log_mel_spectrogram(x).shape == (80, 31)


@pytest.mark.parametrize("length", [201, 320, 16000, 16159, 16160])
def test_frame_count(length):
    assert log_mel_spectrogram(np.zeros(length, np.float32) + 0.01).shape[1] == length // 160


def test_log_mel_rejects_bad_input():
    with pytest.raises(ValueError, match="more than 200 samples"):
        log_mel_spectrogram(np.zeros(200, np.float32))
    with pytest.raises(ValueError, match="1-D"):
        log_mel_spectrogram(np.zeros((2, 1000), np.float32))


def test_sine_energy_in_right_bin():
    t = np.arange(16000) / 16000
    spec = log_mel_spectrogram(np.sin(2 * np.pi * 1000 * t).astype(np.float32))
    centres = reference_filters(80)[1]
    expected = int(np.argmin([abs(c - 1000) for c in centres]))
    assert expected == 26
    assert (spec[:, 5:-5].argmax(dim=0) == expected).all()


def test_pad_or_trim_numpy():
    a = np.arange(12).reshape(3, 4)
    assert pad_or_trim(a, 2).tolist() == [[0, 1], [4, 5], [8, 9]]
    np.testing.assert_array_equal(pad_or_trim(a, 6, axis=0), np.vstack([a, np.zeros((3, 4), int)]))
    assert pad_or_trim(a, 4) is a
    assert pad_or_trim(np.ones(10, np.float32)).shape == (N_SAMPLES,)


def test_pad_or_trim_torch():
    a = torch.arange(12.0).reshape(3, 4)
    assert pad_or_trim(a, 2).tolist() == [[0, 1], [4, 5], [8, 9]]
    torch.testing.assert_close(pad_or_trim(a, 6, axis=0), torch.cat([a, torch.zeros(3, 4)]))
    torch.testing.assert_close(pad_or_trim(a, 5, axis=1), torch.cat([a, torch.zeros(3, 1)], dim=1))
    assert pad_or_trim(torch.ones(N_SAMPLES + 5)).shape == (N_SAMPLES,)
