"""LocalAgreement-n commit policy: a word is final once the last n hypotheses agree on it."""

from __future__ import annotations

import unicodedata
from collections import deque
from dataclasses import dataclass, field

# Punctuation that ends a sentence, in the scripts Whisper writes.
SENTENCE_END = (".", "?", "!", "。", "？", "！")


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
    """Commit the longest common prefix of the last ``n`` hypotheses of the uncommitted words.

    With a ``margin``, a word is committed only once the oldest of those hypotheses heard at least
    ``margin`` seconds of audio after it: a word cut off at the end of a window ("for" of "forwarding")
    can be decoded the same way twice, and is not final until audio after it confirms it. With a
    ``min_probability``, agreement stops at a word that the newest hypothesis, which heard the most audio,
    gives a lower probability: an unsure word waits for more audio (or the decode at the end of the
    utterance). An older hypothesis's doubt does not hold a word back, except the first word committed
    since :meth:`reset` (an utterance's first word): with no text before it, an early guess that just
    passes the floor ("Mark" for "Marque" at 0.31 after 0.29) is wrong too often, and a wrong first word
    also misleads the decode of the rest, which has to follow it.
    """

    def __init__(self, n: int = 2, margin: float = 0.0, min_probability: float = 0.0) -> None:
        if n < 1:
            raise ValueError(f"n={n!r} is out of range; allowed: n >= 1")
        if margin < 0:
            raise ValueError(f"margin={margin!r} is out of range; allowed: margin >= 0 seconds")
        if not 0 <= min_probability <= 1:
            raise ValueError(f"min_probability={min_probability!r} is out of range; allowed: 0 to 1")
        self.margin, self.min_probability = margin, min_probability
        self._history: deque[tuple[list[Word], float]] = deque(maxlen=n)
        self._started = False  # a word was committed since the last reset

    def update(self, hypothesis: list[Word], heard_until: float = float("inf")) -> tuple[list[Word], list[Word]]:
        """Add the newest hypothesis, decoded from audio up to ``heard_until`` (stream seconds); return
        ``(newly_committed, partial)`` taken from it."""
        hypothesis = list(hypothesis)
        self._history.append((hypothesis, heard_until))
        if len(self._history) < self._history.maxlen:
            return [], hypothesis
        oldest, oldest_heard = self._history[0]
        agreed = 0
        for column in zip(*(keys(h) for h, _ in self._history)):
            if any(key != column[0] for key in column) or oldest[agreed].end > oldest_heard - self.margin:
                break
            checked = [hypothesis] if self._started or agreed else [h for h, _ in self._history]
            if any(h[agreed].probability < self.min_probability for h in checked):
                break
            agreed += 1
        self._started = self._started or agreed > 0
        for i, (h, heard) in enumerate(self._history):
            self._history[i] = (h[agreed:], heard)
        return hypothesis[:agreed], hypothesis[agreed:]

    @property
    def pending(self) -> bool:
        """Whether a stored hypothesis holds words not committed yet."""
        return any(h for h, _ in self._history)

    def commit_all(self) -> list[Word]:
        """End of utterance: commit the newest hypothesis entirely and reset."""
        committed = self._history[-1][0] if self._history else []
        self.reset()
        return committed

    def reset(self) -> None:
        """Forget all stored hypotheses."""
        self._history.clear()
        self._started = False
