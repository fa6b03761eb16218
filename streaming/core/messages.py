"""The messages between the core and the engine: a window to decode and what the engine heard in it, and
clips of speech to embed and their speaker embeddings.

The core never runs a model; it asks with a :class:`WindowRequest` or an :class:`EmbedRequest` and takes a
:class:`WindowReply` or an :class:`EmbedReply`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Tokens of earlier committed text given as the prompt of a final decode.
PROMPT_TOKENS = 96
# Silence appended to every window: with no silence after the speech a short audio context makes Whisper loop
# ("and so and so ...").
TRAILING_SILENCE = 4.0


@dataclass(frozen=True)
class WordTiming:
    """A word (text with its leading space), its token ids, times in seconds in the window, probability."""

    word: str
    tokens: tuple[int, ...]
    start: float
    end: float
    probability: float


@dataclass(frozen=True)
class WindowRequest:
    audio: np.ndarray
    prompt: tuple[int, ...] = ()
    prefix: tuple[int, ...] = ()
    draft: tuple[int, ...] = ()  # the tokens expected after the prefix (see DecodingOptions.draft)
    initial_prompt: str | None = None
    language: str | None = None
    task: str = "transcribe"
    final: bool = False
    beam_size: int = 1
    context: float = 0.0  # encode at least this many seconds (window + silence); 30 = Whisper's full window
    silence: float = TRAILING_SILENCE  # and at least this much silence after the window
    speculative: bool = False  # its result may go unused: worth running only on a worker with nothing else to do


@dataclass
class WindowReply:
    words: list[WordTiming] = field(default_factory=list)
    language: str | None = None
    language_probability: float = 0.0
    no_speech_prob: float = 0.0
    avg_logprob: float = 0.0
    silence: bool = False
    skipped: bool = False  # a speculative request not run: no worker was free for it


@dataclass(frozen=True, eq=False)
class EmbedRequest:
    """Speaker embeddings for clips of one stream's speech (16 kHz mono float32)."""

    clips: tuple[np.ndarray, ...]


@dataclass
class EmbedReply:
    """One unit-length speaker embedding per clip of the request, as rows [len(clips), dimension]."""

    embeddings: np.ndarray


Request = WindowRequest | EmbedRequest
Reply = WindowReply | EmbedReply
