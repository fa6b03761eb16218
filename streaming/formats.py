"""Transcript writers: plain text, SubRip, WebVTT and JSON, with speaker labels when cues carry them (0 for the
first voice; shown from 1 to people: ``[SPEAKER 1]`` in txt and srt, a ``<v Speaker 1>`` voice tag in vtt)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

FORMATS = ("txt", "srt", "vtt", "json")


@dataclass
class Cue:
    start: float
    end: float
    text: str
    words: Sequence[dict] = field(default_factory=list)
    speaker: int | None = None

    def labelled(self, voice_tag: bool = False) -> str:
        """The stripped text, after its speaker's label if it has one."""
        text = self.text.strip()
        if self.speaker is None:
            return text
        return f"<v Speaker {self.speaker + 1}>{text}" if voice_tag else f"[SPEAKER {self.speaker + 1}] {text}"


def _clock(seconds: float, separator: str) -> str:
    ms = max(0, round(seconds * 1000))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{separator}{ms:03d}"


def render(cues: Iterable[Cue], fmt: str, language: str | None = None) -> str:
    """The transcript in ``fmt`` (one of :data:`FORMATS`)."""
    cues = [c for c in cues if c.text.strip()]
    if fmt == "txt":
        return "\n".join(c.labelled() for c in cues) + "\n"
    if fmt == "srt":
        blocks = [f"{i}\n{_clock(c.start, ',')} --> {_clock(c.end, ',')}\n{c.labelled()}\n"
                  for i, c in enumerate(cues, 1)]
        return "\n".join(blocks)
    if fmt == "vtt":
        blocks = [f"{_clock(c.start, '.')} --> {_clock(c.end, '.')}\n{c.labelled(voice_tag=True)}\n" for c in cues]
        return "WEBVTT\n\n" + "\n".join(blocks)
    if fmt == "json":
        segments = [{"start": round(c.start, 3), "end": round(c.end, 3), "text": c.text.strip(),
                     **({} if c.speaker is None else {"speaker": c.speaker}),
                     **({"words": list(c.words)} if c.words else {})} for c in cues]
        text = " ".join(c.text.strip() for c in cues)
        return json.dumps({"language": language, "text": text, "segments": segments}, ensure_ascii=False,
                          indent=2) + "\n"
    raise ValueError(f"unknown output format {fmt!r}: choose one of {', '.join(FORMATS)}")
