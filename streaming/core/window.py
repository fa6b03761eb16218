"""The sliding audio window: speech of the current utterance since the last trim point."""

from __future__ import annotations

import numpy as np

from .vad import SAMPLE_RATE


class AudioWindow:
    """Contiguous speech audio placed on the stream timeline (absolute sample numbers)."""

    def __init__(self) -> None:
        self._chunks: list[np.ndarray] = []
        self._joined: np.ndarray | None = None
        self.start_sample = 0
        self.length = 0

    def open(self, start_sample: int) -> None:
        """Start an empty window at ``start_sample``."""
        self._chunks, self._joined = [], None
        self.start_sample, self.length = start_sample, 0

    def append(self, start_sample: int, audio: np.ndarray) -> None:
        """Add audio; it must follow the window's end (a gap means a new utterance: open one)."""
        if self.length == 0 and not self._chunks:
            self.start_sample = start_sample
        elif start_sample != self.end_sample:
            raise ValueError(f"audio at sample {start_sample} does not continue the window ending at "
                             f"{self.end_sample}")
        self._chunks.append(audio)
        self._joined = None
        self.length += len(audio)

    @property
    def end_sample(self) -> int:
        return self.start_sample + self.length

    @property
    def start(self) -> float:
        return self.start_sample / SAMPLE_RATE

    @property
    def end(self) -> float:
        return self.end_sample / SAMPLE_RATE

    @property
    def duration(self) -> float:
        return self.length / SAMPLE_RATE

    @property
    def audio(self) -> np.ndarray:
        if self._joined is None:
            self._joined = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.float32)
            self._chunks = [self._joined]
        return self._joined

    def trim(self, sample: int) -> None:
        """Drop the audio before ``sample`` (on the stream timeline)."""
        cut = min(max(0, sample - self.start_sample), self.length)
        if cut:
            rest = self.audio[cut:]
            self._chunks, self._joined = [rest], rest
            self.start_sample += cut
            self.length -= cut
