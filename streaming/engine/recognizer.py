"""The embeddable recogniser: a :class:`StreamCore` whose decodes run inline on an :class:`Engine`."""

from __future__ import annotations

import asyncio

import numpy as np

from ..core.events import Event
from ..core.stream import StreamCore, StreamOptions
from ..core.vad import SAMPLE_RATE
from .engine import Engine
from .inference import run_request


class Recognizer:
    """Embeddable streaming recogniser: feed audio, get events.

    >>> rec = Recognizer(Engine.load("tiny.en"))
    >>> for event in rec.feed(chunk): print(event.to_dict())
    >>> events = rec.close()
    """

    def __init__(self, engine: Engine, options: StreamOptions = StreamOptions()):
        """With ``options.diarize``, the speaker encoder loads now (SpeakerModelMissing names the install)."""
        if options.diarize:
            engine.speakers  # noqa: B018 - loads it, or raises naming the install command
        self.engine = engine
        self.core = StreamCore(options, engine.multilingual)

    def _run(self, events: list[Event]) -> list[Event]:
        while (request := self.core.next_request()) is not None:
            events += self.core.complete(request, run_request(self.engine, request))
        return events

    def feed(self, audio: np.ndarray) -> list[Event]:
        """Add 16 kHz mono float32 audio (any chunk size); decode as needed; return new events.

        The audio goes to the core one VAD frame at a time, with the due decodes run after each frame, so
        the windows decoded (and so the events) do not depend on how the caller chunks the audio."""
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1:
            return self._run(self.core.feed(audio))  # the VAD refuses it with a clear message
        frame = self.core.options.vad.frame_ms * SAMPLE_RATE // 1000
        events: list[Event] = []
        pos = 0
        while pos < audio.size:
            step = frame - self.core.samples_seen % frame
            events = self._run(events + self.core.feed(audio[pos: pos + step]))
            pos += step
        return events

    def finalize(self) -> list[Event]:
        """Commit everything pending now."""
        return self._run(self.core.finalize())

    def close(self) -> list[Event]:
        """End of audio: decode what is left and return the last events."""
        return self._run(self.core.flush())

    async def feed_async(self, audio: np.ndarray) -> list[Event]:
        """:meth:`feed` on a worker thread, for asyncio programs."""
        return await asyncio.to_thread(self.feed, audio)

    async def close_async(self) -> list[Event]:
        return await asyncio.to_thread(self.close)

