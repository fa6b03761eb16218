"""Speaker embeddings: a GE2E speaker encoder (Wan et al. 2018, "Generalized end-to-end loss for speaker
verification") with the trained weights that the Resemblyzer package ships.

Only the weights file comes from Resemblyzer (``pip install --no-deps resemblyzer==0.1.4``: its own
dependencies are not needed). Features: the 40-channel mel *power* spectrogram (not log) of 16 kHz audio,
25 ms Hann window, 10 ms hop, Slaney filterbank, with audio quieter than -30 dBFS raised to it first. Network:
a 3-layer LSTM (hidden size 256) over the frames; the last layer's final state goes through a 256 x 256
linear layer and a ReLU and is L2-normalised. A clip is cut into partials of 160 frames (1.6 s, the length
the network was trained on) every 80 frames; its embedding is the normalised mean of theirs. A clip shorter
than a partial is one partial of its own length.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.speakers import SPEAKER_ENCODER_INSTALL
from .mel import mel_filters

SAMPLE_RATE = 16000
N_MELS = 40
WINDOW = 400  # 25 ms
HOP = 160  # 10 ms
HIDDEN = 256
LAYERS = 3
EMBEDDING_SIZE = 256
PARTIAL_FRAMES = 160
PARTIAL_STEP = 80
TARGET_DBFS = -30.0


class SpeakerModelMissing(RuntimeError):
    """The speaker encoder's weights are not installed."""


def weights_path() -> Path:
    """Where the installed Resemblyzer package keeps ``pretrained.pt`` (the package itself is not imported:
    it needs librosa, which we do not)."""
    spec = importlib.util.find_spec("resemblyzer")
    path = Path(next(iter(spec.submodule_search_locations or ()), "")) / "pretrained.pt" if spec else None
    if path is None or not path.is_file():
        raise SpeakerModelMissing(f"speaker labels need the GE2E speaker encoder's weights; install them with: "
                                  f"{SPEAKER_ENCODER_INSTALL}")
    return path


def available() -> bool:
    """Whether the speaker encoder's weights are installed."""
    try:
        weights_path()
    except SpeakerModelMissing:
        return False
    return True


def _level(audio: np.ndarray) -> np.ndarray:
    """``audio`` raised (never lowered) to an RMS of ``TARGET_DBFS``: the network reads power, not its log."""
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) if audio.size else 0.0
    if rms <= 0:
        return audio
    gain = 10 ** (TARGET_DBFS / 20) / rms
    return audio * gain if gain > 1 else audio


class SpeakerEncoder(nn.Module):
    """Audio clips in, one unit-length 256-dimensional speaker embedding per clip out."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(N_MELS, HIDDEN, LAYERS, batch_first=True)
        self.linear = nn.Linear(HIDDEN, EMBEDDING_SIZE)

    @classmethod
    def load(cls, path: str | Path | None = None, device: str | torch.device = "cpu") -> SpeakerEncoder:
        """The encoder with Resemblyzer's weights (``path``: another checkpoint of the same shape); raises
        :class:`SpeakerModelMissing` naming the install command when they are not installed."""
        checkpoint = torch.load(path or weights_path(), map_location="cpu", weights_only=True)
        state = {k: v for k, v in checkpoint["model_state"].items() if k.startswith(("lstm.", "linear."))}
        encoder = cls()
        encoder.load_state_dict(state)
        return encoder.to(device).eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.linear.weight.device

    def features(self, audio: np.ndarray) -> torch.Tensor:
        """Mel power spectrogram [frames, 40] of 16 kHz mono audio (one frame per 10 ms, centred)."""
        x = torch.as_tensor(_level(np.asarray(audio, dtype=np.float32)), dtype=torch.float32, device=self.device)
        x = nn.functional.pad(x, (0, max(0, WINDOW // 2 + 1 - x.numel())))  # the reflect pad needs this much
        stft = torch.stft(x, WINDOW, HOP, window=torch.hann_window(WINDOW, device=x.device), center=True,
                          pad_mode="reflect", return_complex=True)
        return (mel_filters(N_MELS, SAMPLE_RATE, WINDOW).to(x.device) @ stft.abs().square()).T

    def forward(self, mels: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Embeddings [batch, 256] of mel partials [batch, frames, 40], each ``lengths[i]`` frames long."""
        packed = nn.utils.rnn.pack_padded_sequence(mels, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (hidden, _) = self.lstm(packed)
        return nn.functional.normalize(torch.relu(self.linear(hidden[-1])), dim=1)

    @torch.inference_mode()
    def embed(self, clips: list[np.ndarray]) -> np.ndarray:
        """One embedding per clip [len(clips), 256], float32; all partials of all clips run in one batch."""
        partials: list[torch.Tensor] = []
        owner: list[int] = []
        for i, clip in enumerate(clips):
            mel = self.features(clip)
            for k in range(max(1, math.ceil((mel.shape[0] - PARTIAL_FRAMES) / PARTIAL_STEP) + 1)):
                partials.append(mel[k * PARTIAL_STEP: k * PARTIAL_STEP + PARTIAL_FRAMES])
                owner.append(i)
        if not partials:
            return np.zeros((0, EMBEDDING_SIZE), np.float32)
        lengths = torch.tensor([p.shape[0] for p in partials])
        batch = nn.utils.rnn.pad_sequence(partials, batch_first=True)
        vectors = self(batch, lengths)
        sums = torch.zeros(len(clips), EMBEDDING_SIZE, device=vectors.device)
        sums.index_add_(0, torch.tensor(owner, device=vectors.device), vectors)
        return nn.functional.normalize(sums, dim=1).cpu().numpy()
