"""The core's requests run on the engine: a streaming window update (encode once, decode with fallback,
align words) or the speaker embeddings of clips of speech.

The streaming core describes the work as a :class:`WindowRequest` or an :class:`EmbedRequest`; whoever owns
the engine (the embeddable recogniser inline, the server's scheduler on a worker thread) runs it and hands
back a :class:`WindowReply` or an :class:`EmbedReply`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ..core.messages import (
    PROMPT_TOKENS,
    TRAILING_SILENCE,
    EmbedReply,
    EmbedRequest,
    Reply,
    Request,
    WindowReply,
    WindowRequest,
)
from .alignment import AlignmentWindow, find_alignments
from .decoding import (
    DecodingOptions,
    DecodingResult,
    FallbackPolicy,
    GreedyJob,
    Prefill,
    decode_greedy_batch,
    decode_with_fallback,
    detect_language,
    prefill_batch,
)
from .engine import Engine
from .mel import HOP_LENGTH, SAMPLE_RATE
from .model import KVCache
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .transcribe import TranscribeRequest, Transcript

log = logging.getLogger(__name__)

# A window has ~3 to 5 tokens per second of speech; more is a repetition loop.
MAX_TOKENS_PER_SECOND = 8
MIN_SAMPLE_LEN = 12
# Noise that passes the VAD makes Whisper say " You" or " Thank you." with a high no-speech probability and
# words it barely believes; real speech rarely has both.
NO_SPEECH_GATE = 0.6
WORD_PROBABILITY_GATE = 0.4
# Windows are padded to a whole number of buckets: equal bucket sizes let the scheduler batch encoders.
CONTEXT_BUCKET = 1.0
# Mel frames per batched encoder call. On one CPU thread, 8 short windows (3 to 5 s) encode ~10% faster
# together than one by one, while two 30 s windows encode ~6% slower (and the attention memory grows).
ENCODER_BATCH_FRAMES = 4000


def _context_padding(audio: np.ndarray, context: float, silence: float = TRAILING_SILENCE) -> int:
    """Samples of silence after the window: at least ``silence`` seconds, rounded up to a whole bucket, and
    at least ``context`` seconds in all (at most 30)."""
    seconds = len(audio) / SAMPLE_RATE
    total = max(context, math.ceil((seconds + silence) / CONTEXT_BUCKET) * CONTEXT_BUCKET)
    return max(0, round(min(30.0, total) * SAMPLE_RATE) - len(audio))


def encode_window(engine: Engine, audio: np.ndarray, context: float = 0.0,
                  silence: float = TRAILING_SILENCE) -> tuple[torch.Tensor, int]:
    """Encoder output for the window plus trailing silence (at least ``context`` seconds in all), and the
    number of mel frames of real audio."""
    mel = engine.mel(audio, padding=_context_padding(audio, context, silence))
    return engine.encode(mel), len(audio) // HOP_LENGTH


def encode_windows(engine: Engine, requests: list[WindowRequest]) -> list[tuple[torch.Tensor, int]]:
    """:func:`encode_window` for several requests: those with equally long contexts share one encoder call."""
    mels = [engine.mel(r.audio, padding=_context_padding(r.audio, r.context, r.silence)) for r in requests]
    # Engine.encode pads an odd frame count with the spectrogram's floor; do it per request before stacking.
    mels = [F.pad(m, (0, m.shape[-1] % 2), value=float(m.min())) for m in mels]
    groups: dict[int, list[int]] = {}
    for i, mel in enumerate(mels):
        groups.setdefault(mel.shape[-1], []).append(i)
    features: dict[int, torch.Tensor] = {}
    for frames, members in groups.items():
        per_call = max(1, ENCODER_BATCH_FRAMES // frames)
        for part in (members[k: k + per_call] for k in range(0, len(members), per_call)):
            encoded = engine.encode(torch.stack([mels[i] for i in part]))
            features.update((i, encoded[row: row + 1]) for row, i in enumerate(part))
    return [(features[i], len(r.audio) // HOP_LENGTH) for i, r in enumerate(requests)]


@dataclass
class _Window:
    """A request between the stages of its run: encoded, prefilled, decoded."""

    request: WindowRequest
    reply: WindowReply
    features: torch.Tensor
    frames: int
    cache: KVCache
    tokenizer: Tokenizer
    options: DecodingOptions
    start: Prefill


def _prepare(engine: Engine, requests: list[WindowRequest],
             encoded: list[tuple[torch.Tensor, int]]) -> list[_Window]:
    """Language, decoding options and prefill of encoded windows; the prefills share one decoder pass."""
    staged = []
    for request, (features, frames) in zip(requests, encoded):
        reply = WindowReply(language=request.language)
        cache = engine.model.decoder.new_cache(features)
        if engine.multilingual and request.language is None:
            reply.language, probs = detect_language(engine.model, engine.tokenizer(None, request.task), features,
                                                    cache)
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
            prompt=tuple(prompt[-PROMPT_TOKENS:]), prefix=request.prefix, draft=request.draft,
            without_timestamps=True,
            sample_len=max(MIN_SAMPLE_LEN, round(seconds * MAX_TOKENS_PER_SECOND)))
        staged.append((request, reply, features, frames, cache, tokenizer, options))
    starts = prefill_batch(engine.model, [(tokenizer, options, cache) for *_, cache, tokenizer, options in staged])
    return [_Window(*window, start) for window, start in zip(staged, starts)]


def _finish(engine: Engine, decoded: list[tuple[_Window, DecodingResult, FallbackPolicy]]) -> list[WindowReply]:
    """The replies for decoded windows: silence, or the new words after the prefix with their times (the
    word alignments share one decoder pass)."""
    replies, aligned = [], []
    for window, result, policy in decoded:
        reply = replace(window.reply, words=[], no_speech_prob=result.no_speech_prob,
                        avg_logprob=result.avg_logprob)
        if policy.is_silence(result) or policy.needs_fallback(result):
            reply.silence = True
        elif result.tokens:
            aligned.append((window, result, reply))
        replies.append(reply)
    timings = find_alignments(engine.model, [
        AlignmentWindow(w.tokenizer, list(w.request.prefix) + r.tokens, w.frames, w.cache) for w, r, _ in aligned])
    for (window, _, reply), words in zip(aligned, timings):
        seen = 0
        for word in words:
            if seen >= len(window.request.prefix):
                reply.words.append(word)
            seen += len(word.tokens)
        if reply.words and reply.no_speech_prob > NO_SPEECH_GATE:
            if sum(w.probability for w in reply.words) / len(reply.words) < WORD_PROBABILITY_GATE:
                reply.words, reply.silence = [], True
    return replies


def _decode(engine: Engine, window: _Window, policy: FallbackPolicy) -> DecodingResult:
    return decode_with_fallback(engine.model, window.tokenizer, window.features, window.options, policy, window.start)


def _policy(request: WindowRequest, policy: FallbackPolicy) -> FallbackPolicy:
    """Interim decodes take no temperature fallback: an unreliable interim hypothesis is dropped (the next
    update or the final decode at the endpoint replaces it), which saves the cost of sampling."""
    return policy if request.final else replace(policy, temperatures=policy.temperatures[:1])


def run_window(engine: Engine, request: WindowRequest, policy: FallbackPolicy = FallbackPolicy()) -> WindowReply:
    """Decode the window after the forced ``prefix`` and time every new word (window-relative seconds)."""
    policy = _policy(request, policy)
    [window] = _prepare(engine, [request], [encode_window(engine, request.audio, request.context, request.silence)])
    return _finish(engine, [(window, _decode(engine, window, policy), policy)])[0]


def iter_windows(engine: Engine, requests: list[WindowRequest],
                 policy: FallbackPolicy = FallbackPolicy()) -> Iterator[WindowReply | Exception]:
    """Every request's :func:`run_window`, yielded in request order as each is ready, with the encoder calls,
    the prefills, the greedy decoding steps and the word alignments shared: a decoder pass costs about the
    same for one row as for several, as it reads all of the decoder's weights either way.

    Greedy first passes (beam 1, fallback starting at temperature 0) run in one batch and are aligned
    together; a result that needs fallback continues alone at the next temperatures, and beam-search
    requests decode alone (put them last so that the greedy replies are not held up). A request that raises
    gets its exception back, the others their replies: if a shared part fails, its requests run again on
    their own.
    """
    if len(requests) == 1:
        yield _alone(engine, requests[0], policy)
        return
    try:
        windows = _prepare(engine, requests, encode_windows(engine, requests))
        results: list[DecodingResult | None] = [None] * len(windows)
        greedy = [i for i, w in enumerate(windows) if w.options.beam_size == 1]
        if greedy and policy.temperatures[:1] == (0.0,):
            jobs = [GreedyJob(w.tokenizer, w.features, w.options, w.start) for w in (windows[i] for i in greedy)]
            for i, result in zip(greedy, decode_greedy_batch(engine.model, jobs)):
                results[i] = result
    except Exception:  # noqa: BLE001 - isolated below
        log.warning("batched run of %d windows failed; running them one by one", len(requests), exc_info=True)
        for request in requests:
            yield _alone(engine, request, policy)
        return
    policies = [_policy(window.request, policy) for window in windows]
    done = [i for i, (result, own) in enumerate(zip(results, policies))
            if result is not None and not _falls_back(result, own)]
    try:
        finished = dict(zip(done, _finish(engine, [(windows[i], results[i], policies[i]) for i in done])))
    except Exception:  # noqa: BLE001 - isolated below
        log.warning("batched alignment of %d windows failed; aligning them one by one", len(done), exc_info=True)
        finished = {}
    for i, (window, result, own) in enumerate(zip(windows, results, policies)):
        if i in finished:
            yield finished[i]
            continue
        try:
            if result is None:
                result = _decode(engine, window, own)
            elif _falls_back(result, own):
                result = _decode(engine, window, replace(own, temperatures=own.temperatures[1:]))
            yield _finish(engine, [(window, result, own)])[0]
        except Exception as exc:  # noqa: BLE001 - handed back to the stream that caused it
            yield exc


def _falls_back(result: DecodingResult, policy: FallbackPolicy) -> bool:
    """Whether a first greedy result goes on at the policy's next temperatures."""
    return len(policy.temperatures) > 1 and not policy.is_silence(result) and policy.needs_fallback(result)


def _alone(engine: Engine, request: WindowRequest, policy: FallbackPolicy) -> WindowReply | Exception:
    try:
        return run_window(engine, request, policy)
    except Exception as exc:  # noqa: BLE001 - handed back to the stream that caused it
        return exc


def run_windows(engine: Engine, requests: list[WindowRequest],
                policy: FallbackPolicy = FallbackPolicy()) -> list[WindowReply | Exception]:
    """:func:`iter_windows` as a list: one reply or exception per request, one stream's failure never
    failing another."""
    return list(iter_windows(engine, requests, policy))


def embed(engine: Engine, requests: list[EmbedRequest]) -> list[EmbedReply]:
    """The speaker embeddings of every request's clips, computed in one batch."""
    vectors = engine.speakers.embed([clip for request in requests for clip in request.clips])
    replies, start = [], 0
    for request in requests:
        replies.append(EmbedReply(vectors[start: start + len(request.clips)]))
        start += len(request.clips)
    return replies


def run_request(engine: Engine, request: Request, policy: FallbackPolicy = FallbackPolicy()) -> Reply:
    """:func:`run_window` or :func:`embed` for one request."""
    if isinstance(request, EmbedRequest):
        return embed(engine, [request])[0]
    return run_window(engine, request, policy)


def iter_requests(engine: Engine, requests: list[Request | TranscribeRequest],
                  policy: FallbackPolicy = FallbackPolicy()) -> Iterator[Reply | Transcript | Exception]:
    """A batch of the scheduler's in request order: the speaker embeddings together first (they are cheap),
    then the window decodes as :func:`iter_windows` runs them; a whole recording (:class:`TranscribeRequest`)
    is transcribed where it comes."""
    from .transcribe import TranscribeRequest, run_request  # here: streaming.engine.transcribe imports this module

    embeds = {i: r for i, r in enumerate(requests) if isinstance(r, EmbedRequest)}
    embedded: dict[int, EmbedReply | Exception] = {}
    if embeds:
        try:
            embedded = dict(zip(embeds, embed(engine, list(embeds.values()))))
        except Exception as exc:  # noqa: BLE001 - handed back to the streams that asked
            embedded = dict.fromkeys(embeds, exc)
    windows = iter_windows(engine, [r for i, r in enumerate(requests)
                                    if i not in embeds and isinstance(r, WindowRequest)], policy)
    for i, request in enumerate(requests):
        if isinstance(request, TranscribeRequest):
            try:
                yield run_request(engine, request)
            except Exception as exc:  # noqa: BLE001 - handed back to the caller
                yield exc
        else:
            yield embedded[i] if i in embedded else next(windows)
