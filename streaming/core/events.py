"""Recogniser output events and their wire JSON shape (times in stream seconds)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .agreement import Word


def _t(seconds: float) -> float:
    return round(float(seconds), 3)


def _p(probability: float) -> float:
    return round(float(probability), 4)


def word_dict(word: str, start: float, end: float, probability: float) -> dict[str, Any]:
    """A word's JSON object, in ``final`` messages and in offline JSON output alike."""
    return {"word": word, "start": _t(start), "end": _t(end), "probability": _p(probability)}


@dataclass(frozen=True)
class Partial:
    """Unstable tail of segment ``segment``; a higher ``revision`` replaces the previous one."""

    segment: int
    revision: int
    text: str
    start: float
    end: float

    def to_dict(self) -> dict[str, Any]:
        """Wire JSON object."""
        return {"type": "partial", "segment": self.segment, "revision": self.revision, "text": self.text,
                "start": _t(self.start), "end": _t(self.end)}


@dataclass(frozen=True)
class Final:
    """Committed, append-only text of segment ``segment`` with its words; ``speaker`` labels them all (with
    speaker labels on; None otherwise)."""

    segment: int
    text: str
    start: float
    end: float
    words: tuple[Word, ...]
    speaker: int | None = None

    def to_dict(self, words: bool = True) -> dict[str, Any]:
        """Wire JSON object; ``words`` False leaves the word list out."""
        label = {} if self.speaker is None else {"speaker": self.speaker}
        message = {"type": "final", "segment": self.segment, "text": self.text, "start": _t(self.start),
                   "end": _t(self.end), **label}
        if words:
            message["words"] = [{**word_dict(w.text, w.start, w.end, w.probability), **label} for w in self.words]
        return message


@dataclass(frozen=True)
class UtteranceEnd:
    """Segment ``segment`` is over: the speaker paused at ``end``."""

    segment: int
    end: float

    def to_dict(self) -> dict[str, Any]:
        """Wire JSON object."""
        return {"type": "utterance_end", "segment": self.segment, "end": _t(self.end)}


@dataclass(frozen=True)
class LanguageDetected:
    """Spoken language (ISO code such as ``"en"``) and its probability."""

    language: str
    probability: float

    def to_dict(self) -> dict[str, Any]:
        """Wire JSON object."""
        return {"type": "language", "language": self.language, "probability": _p(self.probability)}


Event = Partial | Final | UtteranceEnd | LanguageDetected
