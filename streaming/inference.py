"""One streaming window update on the engine: encode once, decode with fallback, align words.

The streaming core describes the work as a :class:`WindowRequest`; whoever owns the engine (the
embeddable recogniser inline, the server's scheduler on a worker thread) runs it and hands back a
:class:`WindowReply`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .alignment import WordTiming, find_alignment
from .decoding import DecodingOptions, FallbackPolicy, decode_with_fallback, detect_language, prefill
from .engine import Engine
from .mel import HOP_LENGTH, SAMPLE_RATE

# A window has ~3 to 5 tokens per second of speech; more is a repetition loop.
MAX_TOKENS_PER_SECOND = 8
MIN_SAMPLE_LEN = 12
PROMPT_TOKENS = 96
# Noise that passes the VAD makes Whisper say " You" or " Thank you." with a high no-speech probability and
# words it barely believes; real speech rarely has both.
NO_SPEECH_GATE = 0.6
WORD_PROBABILITY_GATE = 0.4
# Silence appended to every window, rounded up to a whole bucket: with no silence after the speech a short
# audio context makes Whisper loop ("and so and so ..."); equal bucket sizes let the scheduler batch encoders.
TRAILING_SILENCE = 4.0
CONTEXT_BUCKET = 1.0


@dataclass(frozen=True)
class WindowRequest:
    audio: np.ndarray
    prompt: tuple[int, ...] = ()
    prefix: tuple[int, ...] = ()
    initial_prompt: str | None = None
    language: str | None = None
    task: str = "transcribe"
    final: bool = False
    beam_size: int = 1
    context: float = 0.0  # encode at least this many seconds (window + silence); 30 = Whisper's full window


@dataclass
class WindowReply:
    words: list[WordTiming] = field(default_factory=list)
    language: str | None = None
    language_probability: float = 0.0
    no_speech_prob: float = 0.0
    avg_logprob: float = 0.0
    silence: bool = False


def encode_window(engine: Engine, audio: np.ndarray, context: float = 0.0) -> tuple[torch.Tensor, int]:
    """Encoder output for the window plus trailing silence (at least ``context`` seconds in all), and the
    number of mel frames of real audio."""
    seconds = len(audio) / SAMPLE_RATE
    total = max(context, math.ceil((seconds + TRAILING_SILENCE) / CONTEXT_BUCKET) * CONTEXT_BUCKET)
    total = min(30.0, total)
    padding = max(0, round(total * SAMPLE_RATE) - len(audio))
    mel = engine.mel(audio, padding=padding)
    return engine.encode(mel), len(audio) // HOP_LENGTH


def run_window(engine: Engine, request: WindowRequest, policy: FallbackPolicy = FallbackPolicy()) -> WindowReply:
    """Decode the window after the forced ``prefix`` and time every new word (window-relative seconds)."""
    reply = WindowReply(language=request.language)
    features, frames = encode_window(engine, request.audio, request.context)
    cache = engine.model.decoder.new_cache(features)
    if engine.multilingual and request.language is None:
        reply.language, probs = detect_language(engine.model, engine.tokenizer(None, request.task), features, cache)
        reply.language_probability = probs[reply.language]
    elif not engine.multilingual:
        reply.language = "en"
    tokenizer = engine.tokenizer(reply.language, request.task)
    prompt = list(request.prompt)
    if request.initial_prompt:
        prompt = tokenizer.encode(" " + request.initial_prompt.strip()) + prompt
    seconds = len(request.audio) / SAMPLE_RATE
    options = DecodingOptions(
        task=request.task, language=reply.language, beam_size=request.beam_size,
        prompt=tuple(prompt[-PROMPT_TOKENS:]), prefix=request.prefix, without_timestamps=True,
        sample_len=max(MIN_SAMPLE_LEN, round(seconds * MAX_TOKENS_PER_SECOND)))
    start = prefill(engine.model, tokenizer, features, options, cache)
    result = decode_with_fallback(engine.model, tokenizer, features, options, policy, start)
    reply.no_speech_prob, reply.avg_logprob = result.no_speech_prob, result.avg_logprob
    if policy.is_silence(result) or policy.needs_fallback(result):
        reply.silence = True
        return reply
    tokens = list(request.prefix) + result.tokens
    if not result.tokens:
        return reply
    words = find_alignment(engine.model, tokenizer, tokens, features, frames, cache=cache)
    seen = 0
    for word in words:
        if seen >= len(request.prefix):
            reply.words.append(word)
        seen += len(word.tokens)
    if reply.words and reply.no_speech_prob > NO_SPEECH_GATE:
        if sum(w.probability for w in reply.words) / len(reply.words) < WORD_PROBABILITY_GATE:
            reply.words, reply.silence = [], True
    return reply


def run_windows(engine: Engine, requests: list[WindowRequest]) -> list[WindowReply | Exception]:
    """Run several streams' window updates; a request that raises gets its exception back, the others
    their replies (one stream's failure never fails another)."""
    results: list[WindowReply | Exception] = []
    for request in requests:
        try:
            results.append(run_window(engine, request))
        except Exception as exc:  # noqa: BLE001 - handed back to the stream that caused it
            results.append(exc)
    return results
