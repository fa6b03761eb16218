"""LocalAgreement-n commit policy: a word is final once the last n hypotheses agree on it."""

from __future__ import annotations

import unicodedata
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Word:
    """A recognised word; ``text`` as Whisper produced it, times in seconds on the stream timeline."""

    text: str
    start: float
    end: float
    probability: float
    tokens: tuple[int, ...] = field(default=(), compare=False)


def normalize(text: str) -> str:
    """Comparison key: lower case, surrounding whitespace and punctuation stripped."""
    text = text.strip()
    lo, hi = 0, len(text)
    while lo < hi and unicodedata.category(text[lo]).startswith("P"):
        lo += 1
    while hi > lo and unicodedata.category(text[hi - 1]).startswith("P"):
        hi -= 1
    return text[lo:hi].strip().lower()


def keys(words: list[Word]) -> list[str]:
    return [normalize(w.text) for w in words]


class LocalAgreement:
    """Commit the longest common prefix of the last ``n`` hypotheses of the uncommitted words."""

    def __init__(self, n: int = 2) -> None:
        if n < 1:
            raise ValueError(f"n={n!r} is out of range; allowed: n >= 1")
        self._history: deque[list[Word]] = deque(maxlen=n)

    def update(self, hypothesis: list[Word]) -> tuple[list[Word], list[Word]]:
        """Add the newest hypothesis; return ``(newly_committed, partial)`` taken from it."""
        hypothesis = list(hypothesis)
        self._history.append(hypothesis)
        if len(self._history) < self._history.maxlen:
            return [], hypothesis
        agreed = 0
        for column in zip(*(keys(h) for h in self._history)):
            if any(key != column[0] for key in column):
                break
            agreed += 1
        for i, h in enumerate(self._history):
            self._history[i] = h[agreed:]
        return hypothesis[:agreed], hypothesis[agreed:]

    def commit_all(self) -> list[Word]:
        """End of utterance: commit the newest hypothesis entirely and reset."""
        committed = self._history[-1] if self._history else []
        self.reset()
        return committed

    def reset(self) -> None:
        """Forget all stored hypotheses."""
        self._history.clear()
