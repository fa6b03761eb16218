"""LocalAgreement-n commit policy: a word is final once the last n hypotheses agree on it."""

from __future__ import annotations

import unicodedata
from collections import deque
from dataclasses import dataclass, field

OVERLAP_MAX_WORDS = 5


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


def _keys(words: list[Word]) -> list[str]:
    return [normalize(w.text) for w in words]


def drop_committed_overlap(hypothesis: list[Word], committed_tail: list[Word]) -> list[Word]:
    """Remove the leading words of ``hypothesis`` that repeat the end of ``committed_tail``.

    Matches the longest leading run (up to ``OVERLAP_MAX_WORDS``) by text alone: word times from
    cross-attention are least reliable at window edges, exactly where the overlap sits.
    """
    tail, head = _keys(committed_tail[-OVERLAP_MAX_WORDS:]), _keys(hypothesis[:OVERLAP_MAX_WORDS])
    for k in range(min(len(tail), len(head)), 0, -1):
        if head[:k] == tail[-k:]:
            return list(hypothesis[k:])
    return list(hypothesis)


def drop_repetitions(words: list[Word]) -> list[Word]:
    """Cut a hypothesis where it starts looping: a phrase of two or more words repeated back to back,
    or one word three times in a row. Whisper does this on short windows; speech almost never does."""
    keys = _keys(words)
    for i in range(len(keys)):
        for size in range(1, (len(keys) - i) // 2 + 1):
            gram = keys[i:i + size]
            if keys[i + size:i + 2 * size] != gram:
                continue
            if size >= 2 or keys[i + 2 * size:i + 3 * size] == gram:
                return words[:i + size]
    return list(words)


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
        keys = [_keys(h) for h in self._history]
        agreed = 0
        for column in zip(*keys, strict=False):
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
