"""Token decoding over encoded audio: greedy, sampling and beam search with Whisper's logit rules.

A :class:`Prefill` runs the prompt and start-of-transcript tokens through the decoder once per audio
window; every decoding pass over that window (fallback temperatures, alignment) starts from its cache.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from ..core.languages import check_task
from .model import KVCache, Whisper, decode_padded
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class DecodingOptions:
    task: str = "transcribe"
    language: str | None = None
    temperature: float = 0.0
    beam_size: int = 1
    best_of: int = 1
    patience: float = 1.0
    length_penalty: float | None = None
    prompt: tuple[int, ...] = ()
    prefix: tuple[int, ...] = ()
    suppress_blank: bool = True
    suppress_tokens: tuple[int, ...] | None = None
    without_timestamps: bool = False
    max_initial_timestamp: float = 1.0
    sample_len: int | None = None
    # Tokens a greedy decode probably starts with (the window's previous hypothesis): fed with the prefill,
    # so that greedy choice confirms them without a decoder pass per token. The result is the same with or
    # without it.
    draft: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        check_task(self.task)
        if self.beam_size < 1 or self.best_of < 1:
            raise ValueError("beam_size and best_of must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")


@dataclass
class DecodingResult:
    tokens: list[int]
    text: str
    avg_logprob: float
    no_speech_prob: float
    temperature: float
    compression_ratio: float
    token_probs: list[float] = field(default_factory=list)


def compression_ratio(text: str) -> float:
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw)) if raw else 0.0


@dataclass
class Prefill:
    """Decoder state after the initial tokens over one audio window, reusable across passes.

    A greedy decode's ``draft`` (see :class:`DecodingOptions`; empty for other decodes) is fed in the same
    pass: ``draft_logits`` [len(draft), vocab] are the logits after each of its tokens and ``ahead`` the cache
    that holds them too; ``cache`` holds only the initial tokens.
    """

    initial: list[int]
    cache: KVCache
    last_logits: Tensor
    no_speech_prob: float
    draft: tuple[int, ...]
    draft_logits: Tensor
    ahead: KVCache


def initial_tokens(tokenizer: Tokenizer, options: DecodingOptions) -> tuple[list[int], int]:
    """[startofprev, prompt...] + sot sequence (+ notimestamps) + prefix, and the index of sot."""
    tokens: list[int] = []
    max_prompt = 223
    if options.prompt:
        tokens = [tokenizer.sot_prev, *options.prompt[-(max_prompt - len(options.prefix)):]]
    sot_index = len(tokens)
    tokens += list(tokenizer.sot_sequence)
    if options.without_timestamps:
        tokens.append(tokenizer.no_timestamps)
    tokens += list(options.prefix)
    return tokens, sot_index


@torch.inference_mode()
def prefill(model: Whisper, tokenizer: Tokenizer, features: Tensor, options: DecodingOptions,
            cache: KVCache | None = None) -> Prefill:
    """Run the initial tokens once over ``features`` (1 x ctx x state). ``cache`` may carry the
    cross-attention keys/values already computed for these features."""
    base = cache if cache is not None else model.decoder.new_cache(features)
    return prefill_batch(model, [(tokenizer, options, base)])[0]


@torch.inference_mode()
def prefill_batch(model: Whisper, windows: list[tuple[Tokenizer, DecodingOptions, KVCache]]) -> list[Prefill]:
    """:func:`prefill` for several windows, each given as its tokenizer, options and a cache holding its
    audio's cross-attention keys/values, in one decoder pass (:func:`streaming.engine.model.decode_padded`); each
    row's cache is cut back to its own tokens and audio afterwards."""
    starts = [initial_tokens(tokenizer, options) for tokenizer, options, _ in windows]
    drafts = [_fed_draft(model, options, len(initial)) for (initial, _), (_, options, _) in zip(starts, windows)]
    width = 2 + max(map(len, drafts))
    positions = [[sot_index, *range(len(initial) - 1, len(initial) + len(draft))]
                 for (initial, sot_index), draft in zip(starts, drafts)]
    logits_at = torch.tensor([p + p[-1:] * (width - len(p)) for p in positions], device=model.device)
    logits, cache, _ = decode_padded(model.decoder, [initial + list(draft) for (initial, _), draft in
                                                     zip(starts, drafts)], [c for _, _, c in windows],
                                     logits_at=logits_at)
    prefills = []
    for row, ((initial, _), draft, (tokenizer, _, own_audio)) in enumerate(zip(starts, drafts, windows)):
        fed = len(initial) + len(draft)
        own = KVCache([(k[row: row + 1, :, :fed], v[row: row + 1, :, :fed]) for k, v in cache.self_kv],
                      own_audio.cross_kv, own_audio.audio_mask)
        no_speech = logits[row, 0].softmax(-1)[tokenizer.no_speech].item()
        prefills.append(Prefill(initial, own.trim(len(initial)), logits[row, 1], no_speech, draft,
                                logits[row, 2: 2 + len(draft)], own))
    return prefills


def _fed_draft(model: Whisper, options: DecodingOptions, initial: int) -> tuple[int, ...]:
    """The draft tokens a prefill feeds: a greedy decode's, no more than its sample length leaves room for."""
    if options.beam_size != 1 or options.temperature != 0:
        return ()
    return options.draft[:_sample_len(model, options, initial) - 1]


class LogitRules:
    """Suppression and timestamp rules applied to next-token logits before choosing."""

    def __init__(self, tokenizer: Tokenizer, options: DecodingOptions, sample_begin: int,
                 audio_seconds: float):
        self.tok = tokenizer
        self.options = options
        self.sample_begin = sample_begin
        suppress = set(tokenizer.non_speech_tokens if options.suppress_tokens is None else options.suppress_tokens)
        suppress |= {tokenizer.transcribe, tokenizer.translate, tokenizer.sot, tokenizer.sot_prev,
                     tokenizer.sot_lm, tokenizer.no_speech}
        if not options.without_timestamps:
            suppress.add(tokenizer.no_timestamps)
        self.suppress = torch.tensor(sorted(suppress))
        self.blank = tokenizer.encode(" ") + [tokenizer.eot]
        # the last timestamp the audio allows (the model would otherwise point past the window's end)
        self.max_timestamp = tokenizer.timestamp_begin + min(1500, round(audio_seconds / 0.02))

    def apply(self, logits: Tensor, tokens: list[list[int]]) -> None:
        """Edit ``logits`` [batch, vocab] in place given each row's full token list."""
        logits[:, self.suppress] = -float("inf")
        if self.options.suppress_blank and len(tokens[0]) == self.sample_begin:
            logits[:, self.blank] = -float("inf")
        if not self.options.without_timestamps:
            self._timestamps(logits, tokens)

    def _timestamps(self, logits: Tensor, tokens: list[list[int]]) -> None:
        tb, eot = self.tok.timestamp_begin, self.tok.eot
        logits[:, self.max_timestamp + 1:] = -float("inf")
        for row, seq in enumerate(tokens):
            sampled = seq[self.sample_begin:]
            last_ts = len(sampled) >= 1 and sampled[-1] >= tb
            penult_ts = len(sampled) < 2 or sampled[-2] >= tb
            if last_ts:
                if penult_ts:
                    logits[row, tb:] = -float("inf")
                else:
                    logits[row, :eot] = -float("inf")
            stamps = [t for t in sampled if t >= tb]
            if stamps:
                floor = stamps[-1] if last_ts and not penult_ts else stamps[-1] + 1
                logits[row, tb:floor] = -float("inf")
            if not sampled:
                logits[row, :tb] = -float("inf")
                limit = tb + round(self.options.max_initial_timestamp / 0.02)
                logits[row, limit + 1:] = -float("inf")
        logprobs = logits.float().log_softmax(-1)
        ts_mass = logprobs[:, tb:].logsumexp(-1)
        text_max = logprobs[:, :tb].max(-1).values
        force = ts_mass > text_max
        if force.any():
            logits[force, :tb] = -float("inf")


@torch.inference_mode()
def decode(model: Whisper, tokenizer: Tokenizer, features: Tensor, options: DecodingOptions,
           start: Prefill | None = None) -> DecodingResult:
    """Decode one audio window (features 1 x ctx x state) and return the best hypothesis."""
    start = start or prefill(model, tokenizer, features, options)
    if options.beam_size == 1 and options.temperature == 0:
        return decode_greedy_batch(model, [GreedyJob(tokenizer, features, options, start)])[0]
    rules = LogitRules(tokenizer, options, len(start.initial), features.shape[1] * 0.02)
    sample_len = _sample_len(model, options, len(start.initial))
    if options.temperature == 0:
        tokens, sum_lp, probs = _beam_search(model, rules, start, options, tokenizer.eot, sample_len)
    else:
        tokens, sum_lp, probs = _sample(model, rules, start, options, tokenizer.eot, sample_len)
    return _result(tokenizer, options, start, tokens, sum_lp, probs)


@dataclass(frozen=True)
class GreedyJob:
    """One audio window's share of :func:`decode_greedy_batch`: what :func:`decode` takes for it."""

    tokenizer: Tokenizer
    features: Tensor
    options: DecodingOptions
    start: Prefill


@torch.inference_mode()
def decode_greedy_batch(model: Whisper, jobs: list[GreedyJob]) -> list[DecodingResult]:
    """Greedy decoding (temperature 0, beam 1) of several audio windows in one decoder pass per step.

    Each row first takes its tokens from its prefill: the logits after the initial tokens and after each
    token of the draft fed with them, for as long as greedy choice confirms the draft. The rows' caches
    (any prompt, prefix and audio lengths, cut back to the tokens kept) are then stacked into one padded,
    masked cache; each row follows its own logit rules and stops at eot or its sample length, then leaves
    the batch. Every result is the one :func:`decode` gives for that window alone without a draft (up to
    float rounding).
    """
    if any(j.options.temperature != 0 or j.options.beam_size != 1 for j in jobs):
        raise ValueError("decode_greedy_batch decodes greedily: every job needs temperature 0 and beam_size 1")
    rules = [LogitRules(j.tokenizer, j.options, len(j.start.initial), j.features.shape[1] * 0.02) for j in jobs]
    limits = [_sample_len(model, j.options, len(j.start.initial)) for j in jobs]
    seqs = [list(j.start.initial) for j in jobs]
    sum_lp = torch.zeros(len(jobs))  # float32, as _sample sums
    probs: list[list[float]] = [[] for _ in jobs]

    def choose(i: int, logits: Tensor, draft: tuple[int, ...] = ()) -> tuple[int, bool]:
        """Job ``i``'s next tokens from ``logits`` [1 + len(draft), vocab] (row k: the logits after
        ``draft[:k]``) for as long as they confirm the draft; returns how many draft tokens were kept and
        whether the job is finished."""
        for position in range(len(draft) + 1):
            step = logits[position: position + 1].float()
            rules[i].apply(step, [seqs[i]])
            token = int(step.argmax(-1))
            lp = float(step.log_softmax(-1)[0, token])
            seqs[i].append(token)
            sum_lp[i] += lp
            probs[i].append(math.exp(lp))
            if token == jobs[i].tokenizer.eot or len(seqs[i]) - len(jobs[i].start.initial) >= limits[i]:
                return position, True
            if position == len(draft) or token != draft[position]:
                return position, False
        raise AssertionError("unreachable: the last position always returns")

    active, caches = [], []  # the job of each batch row, and its cache
    for i, job in enumerate(jobs):
        start = job.start
        kept, finished = choose(i, torch.cat([start.last_logits[None], start.draft_logits]), start.draft)
        if not finished:
            active.append(i)
            caches.append(start.ahead.trim(len(start.initial) + kept))
    cache = KVCache.stack(caches) if active else None
    while active:
        feed = torch.tensor([[seqs[i][-1]] for i in active], device=model.device)
        logits, cache, _ = model.decoder(feed, cache)
        keep = [row for row, i in enumerate(active) if not choose(i, logits[row])[1]]
        if len(keep) < len(active) and keep:
            cache = cache.select(torch.tensor(keep, device=model.device))
        active = [active[row] for row in keep]
    return [_result(j.tokenizer, j.options, j.start, seq[len(j.start.initial):], float(lp), p)
            for j, seq, lp, p in zip(jobs, seqs, sum_lp, probs)]


def _sample_len(model: Whisper, options: DecodingOptions, initial: int) -> int:
    """The most tokens a decode after ``initial`` tokens may sample."""
    sample_len = options.sample_len or model.dims.n_text_ctx // 2
    return min(sample_len, model.dims.n_text_ctx - initial)


def _result(tokenizer: Tokenizer, options: DecodingOptions, start: Prefill, tokens: list[int], sum_lp: float,
            probs: list[float]) -> DecodingResult:
    text_tokens = [t for t in tokens if t != tokenizer.eot]
    text = tokenizer.decode(text_tokens)
    return DecodingResult(text_tokens, text, sum_lp / (len(text_tokens) + 1), start.no_speech_prob,
                          options.temperature, compression_ratio(text), probs)


def _score(sum_logprob: float, length: int, penalty: float | None) -> float:
    if penalty is None:
        return sum_logprob / max(length, 1)
    return sum_logprob / (((5 + length) / 6) ** penalty)


def _sample(model, rules, start, options, eot, sample_len):
    """Best-of-n sampling at ``options.temperature`` (> 0); returns the best sequence by length-normalised
    score."""
    n = options.best_of
    cache = start.cache.select(torch.zeros(n, dtype=torch.long, device=start.last_logits.device))
    seqs = [list(start.initial) for _ in range(n)]
    sum_lp = torch.zeros(n)
    probs: list[list[float]] = [[] for _ in range(n)]
    done = [False] * n
    logits = start.last_logits.unsqueeze(0).repeat(n, 1)
    # a fixed seed per decode: the same audio gives the same text, whatever ran before in the process
    generator = torch.Generator(device=logits.device).manual_seed(0)
    for _ in range(sample_len):
        logits = logits.float()
        rules.apply(logits, seqs)
        nxt = torch.multinomial((logits / options.temperature).softmax(-1), 1, generator=generator).squeeze(-1)
        logprobs = logits.log_softmax(-1)
        for i in range(n):
            if done[i]:
                continue
            token = int(nxt[i])
            lp = float(logprobs[i, token])
            seqs[i].append(token)
            sum_lp[i] += lp
            probs[i].append(math.exp(lp))
            done[i] = token == eot
        if all(done):
            break
        feed = torch.tensor([[s[-1] if not d else eot] for s, d in zip(seqs, done)], device=logits.device)
        step, cache, _ = model.decoder(feed, cache)
        logits = step[:, -1]
    sample_begin = len(start.initial)
    scores = [_score(float(sum_lp[i]), len(seqs[i]) - sample_begin, options.length_penalty) for i in range(n)]
    best = max(range(n), key=scores.__getitem__)
    return seqs[best][sample_begin:], float(sum_lp[best]), probs[best]


def _beam_search(model, rules, start, options, eot, sample_len):
    """Beam search for one audio window; finished hypotheses are ranked by length-normalised score."""
    beam = options.beam_size
    sample_begin = len(start.initial)
    device = start.last_logits.device
    cache = start.cache.select(torch.zeros(1, dtype=torch.long, device=device))
    seqs = [list(start.initial)]
    sum_lps = [0.0]
    probs: list[list[float]] = [[]]
    logits = start.last_logits.unsqueeze(0)
    finished: list[tuple[list[int], float, list[float]]] = []
    max_finished = round(beam * options.patience)
    for step in range(sample_len):
        logits = logits.float()
        rules.apply(logits, seqs)
        logprobs = logits.log_softmax(-1)
        candidates = []
        for i in range(len(seqs)):
            top_lp, top_tok = logprobs[i].topk(beam + 1)
            for lp, tok in zip(top_lp.tolist(), top_tok.tolist()):
                candidates.append((sum_lps[i] + lp, i, tok, lp))
        candidates.sort(key=lambda c: -c[0])
        new_seqs, new_lps, new_probs, sources = [], [], [], []
        for total, i, tok, lp in candidates:
            seq = seqs[i] + [tok]
            if tok == eot:
                if len(finished) < max_finished:
                    finished.append((seq, total, probs[i] + [math.exp(lp)]))
                continue
            new_seqs.append(seq)
            new_lps.append(total)
            new_probs.append(probs[i] + [math.exp(lp)])
            sources.append(i)
            if len(new_seqs) == beam:
                break
        if len(finished) >= max_finished or not new_seqs or step == sample_len - 1:
            break
        cache = cache.select(torch.tensor(sources, device=device))
        seqs, sum_lps, probs = new_seqs, new_lps, new_probs
        step_logits, cache, _ = model.decoder(torch.tensor([[s[-1]] for s in seqs], device=device), cache)
        logits = step_logits[:, -1]
    if not finished:
        finished = [(s, lp, p) for s, lp, p in zip(new_seqs or seqs, new_lps or sum_lps, new_probs or probs)]
    best = max(finished, key=lambda f: _score(f[1], len(f[0]) - sample_begin, options.length_penalty))
    return best[0][sample_begin:], best[1], best[2]


@torch.inference_mode()
def detect_language(model: Whisper, tokenizer: Tokenizer, features: Tensor,
                    cache: KVCache | None = None) -> tuple[str, dict[str, float]]:
    """Most likely language of ``features`` (1 x ctx x state) and the probability of every language."""
    if not model.is_multilingual:
        return "en", {"en": 1.0}
    base = cache.trim(0) if cache is not None else model.decoder.new_cache(features)
    logits, _, _ = model.decoder(torch.tensor([[tokenizer.sot]], device=model.device), base)
    lang_tokens = torch.tensor(tokenizer.all_language_tokens)
    probs = logits[0, -1, lang_tokens].softmax(-1).tolist()
    table = dict(zip(tokenizer.all_language_codes, probs))
    return max(table, key=table.get), table


@dataclass(frozen=True)
class FallbackPolicy:
    temperatures: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    compression_ratio_threshold: float | None = 2.4
    logprob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6

    def is_silence(self, result: DecodingResult) -> bool:
        return (self.no_speech_threshold is not None and result.no_speech_prob > self.no_speech_threshold
                and (self.logprob_threshold is None or result.avg_logprob < self.logprob_threshold))

    def needs_fallback(self, result: DecodingResult) -> bool:
        if self.compression_ratio_threshold is not None and result.compression_ratio > self.compression_ratio_threshold:
            return True
        return self.logprob_threshold is not None and result.avg_logprob < self.logprob_threshold


def decode_with_fallback(model: Whisper, tokenizer: Tokenizer, features: Tensor, options: DecodingOptions,
                         policy: FallbackPolicy = FallbackPolicy(), start: Prefill | None = None) -> DecodingResult:
    """Decode at increasing temperatures until the result is neither repetitive nor improbable.

    The prefill is computed once and shared by every temperature.
    """
    start = start or prefill(model, tokenizer, features, options)
    result = None
    for temperature in policy.temperatures:
        opts = replace(options, temperature=temperature,
                       best_of=options.best_of if temperature > 0 else 1,
                       beam_size=options.beam_size if temperature == 0 else 1)
        result = decode(model, tokenizer, features, opts, start)
        if policy.is_silence(result) or not policy.needs_fallback(result):
            break
    return result
