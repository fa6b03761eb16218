"""Word-level timestamps from the decoder's cross-attention, aligned to audio frames by DTW.

The alignment heads' attention over the audio is normalised per frame across tokens, smoothed along time
and averaged; dynamic time warping then finds the monotone token-to-frame path of highest attention. A
token starts at the first frame the path assigns to it; each audio frame is 20 ms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..core.agreement import SENTENCE_END
from ..core.messages import WordTiming
from .model import KVCache, Whisper, decode_padded

FRAME_SECONDS = 0.02
MAX_MEDIAN_WORD_SECONDS = 0.7
PREPENDED_PUNCTUATION = frozenset("\"'“¿([{-")
APPENDED_PUNCTUATION = frozenset("\"'.。,，!！?？:：”)]}、")


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost monotone path through ``cost`` [N, M] from (0, 0) to (N-1, M-1).

    Steps are (1, 1), (1, 0) and (0, 1). Accumulated costs are computed one anti-diagonal at a time with the
    textbook recurrence; on ties the path prefers a diagonal step, then a text step (1, 0). Returns the
    path's (text_indices, time_indices), both non-decreasing.
    """
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or 0 in cost.shape:
        raise ValueError(f"cost must be a non-empty 2-D matrix, got shape {cost.shape}")
    n, m = cost.shape
    diagonals = n + m - 1
    # skew[d, i] = cost[i, d - i] (+inf outside the matrix): padding each row with n + 1 infs and
    # re-reading the flat buffer with rows one element shorter shifts row i right by i.
    padded = np.pad(cost, ((0, 0), (0, n + 1)), constant_values=np.inf).reshape(-1)
    skew = np.ascontiguousarray(padded[: n * (m + n)].reshape(n, m + n).T[:diagonals])
    # acc[d + 1, i + 1] is the accumulated cost of cell (i, d - i); acc[0] (diagonal -1) and column 0 stay
    # +inf, so cells on the borders only see their in-matrix predecessors.
    acc = np.full((diagonals + 1, n + 1), np.inf)
    acc[1, 1] = cost[0, 0]
    best = np.empty(n)
    for d in range(1, diagonals):
        np.minimum(acc[d - 1, :n], acc[d, :n], out=best)  # from (i-1, j-1) and (i-1, j)
        np.minimum(best, acc[d, 1:], out=best)  # from (i, j-1)
        np.add(best, skew[d], out=acc[d + 1, 1:])

    i, j = n - 1, m - 1
    path = [(i, j)]
    while i or j:
        if i == 0:
            j -= 1
        elif j == 0:
            i -= 1
        else:
            diag, up, left = acc[i + j - 1, i], acc[i + j, i], acc[i + j, i + 1]
            if diag <= up and diag <= left:
                i, j = i - 1, j - 1
            elif up <= left:
                i -= 1
            else:
                j -= 1
        path.append((i, j))
    text, time = np.array(path[::-1]).T
    return text, time


def median_filter(x: torch.Tensor, width: int) -> torch.Tensor:
    """Running median of odd ``width`` along the last axis, with reflect padding.

    Rows too short to reflect (length <= width // 2) are returned unchanged.
    """
    if width < 1 or width % 2 == 0:
        raise ValueError(f"width={width!r} must be a positive odd number")
    pad = width // 2
    if pad == 0 or x.shape[-1] <= pad:
        return x
    flat = F.pad(x.reshape(-1, 1, x.shape[-1]), (pad, pad), mode="reflect")
    return flat.unfold(-1, width, 1).median(dim=-1).values.reshape(x.shape)


@dataclass(frozen=True)
class AlignmentWindow:
    """One window to align: ``text_tokens`` spoken in its first ``num_frames`` mel frames, and a decoder cache
    holding its audio's cross-attention keys/values (its decoded positions are ignored). The decoder runs
    over ``prefix_tokens`` (default: the tokenizer's ``sot_sequence`` + ``no_timestamps``), the text tokens
    and eot. ``tokenizer`` needs ``sot_sequence``, ``no_timestamps``, ``eot`` and ``split_to_word_tokens``."""

    tokenizer: Any
    text_tokens: list[int]
    num_frames: int
    cache: KVCache
    prefix_tokens: list[int] | None = None


@torch.inference_mode()
def find_alignment(
    model: Whisper,
    tokenizer: Any,
    text_tokens: list[int],
    audio_features: torch.Tensor,
    num_frames: int,
    *,
    prefix_tokens: list[int] | None = None,
    cache: KVCache | None = None,
    medfilt_width: int = 7,
) -> list[WordTiming]:
    """Word timings for ``text_tokens`` spoken in the first ``num_frames`` mel frames of the window
    (``audio_features`` 1 x ctx x state, or ``cache`` with their cross-attention keys/values); see
    :class:`AlignmentWindow` and :func:`find_alignments`."""
    base = model.decoder.new_cache(audio_features) if cache is None else cache
    window = AlignmentWindow(tokenizer, list(text_tokens), num_frames, base, prefix_tokens)
    return find_alignments(model, [window], medfilt_width=medfilt_width)[0]


@torch.inference_mode()
def find_alignments(model: Whisper, windows: list[AlignmentWindow], medfilt_width: int = 7) -> list[list[WordTiming]]:
    """Word timings for each window, from one decoder pass over all of them
    (:func:`streaming.engine.model.decode_padded`). Times are seconds from the window start, non-decreasing; every
    text token belongs to exactly one word."""
    for window in windows:
        if window.text_tokens and window.num_frames < 2:
            raise ValueError(f"num_frames={window.num_frames!r} must be at least 2 (one audio position)")
    todo = [i for i, window in enumerate(windows) if window.text_tokens]
    results: list[list[WordTiming]] = [[] for _ in windows]
    if not todo:
        return results
    rows = [windows[i] for i in todo]
    prefixes = [list(w.prefix_tokens or [*w.tokenizer.sot_sequence, w.tokenizer.no_timestamps]) for w in rows]
    sequences = [p + list(w.text_tokens) + [w.tokenizer.eot] for p, w in zip(prefixes, rows)]
    most = max(len(w.text_tokens) for w in rows)
    device = rows[0].cache.cross_kv[0][0].device
    # each row's logits at the positions that predict its text tokens (the last one repeated as padding)
    logits_at = torch.tensor([[len(p) - 1 + min(j, len(w.text_tokens) - 1) for j in range(most)]
                              for p, w in zip(prefixes, rows)], device=device)
    logits, _, weights = decode_padded(model.decoder, sequences, [w.cache for w in rows],
                                       alignment_heads=model.alignment_heads, logits_at=logits_at)
    for row, (i, window, prefix, sequence) in enumerate(zip(todo, rows, prefixes, sequences)):
        n = len(window.text_tokens)
        text = torch.tensor(window.text_tokens, device=device)
        token_probs = logits[row, :n].softmax(dim=-1).gather(-1, text[:, None])[:, 0].cpu().numpy()
        results[i] = _timings(window, token_probs, weights[row, :, :len(sequence)], len(prefix), medfilt_width)
    return results


def _timings(window: AlignmentWindow, token_probs: np.ndarray, weights: torch.Tensor, first: int,
             medfilt_width: int) -> list[WordTiming]:
    """Word timings from one window's alignment-head attention [heads, tokens, audio positions] (its whole
    token sequence, prefix first) by dynamic time warping."""
    text_tokens = window.text_tokens
    # [heads, tokens, frames] over the real audio, each token's attention renormalised to sum to 1 there.
    weights = weights[:, :, : window.num_frames // 2].float()
    weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-10)
    std, mean = torch.std_mean(weights, dim=-2, keepdim=True, correction=0)
    weights = median_filter((weights - mean) / std.clamp_min(1e-10), medfilt_width)
    matrix = weights.mean(dim=0)[first:]
    text_index, time_index = dtw(-matrix.double().cpu().numpy())
    jumps = np.diff(text_index, prepend=-1).astype(bool)
    token_starts = np.round(time_index[jumps] * FRAME_SECONDS, 2)  # one per text token, then eot's start

    words, word_tokens = window.tokenizer.split_to_word_tokens(list(text_tokens))
    lengths = [len(t) for t in word_tokens]
    if sum(lengths) != len(text_tokens):
        raise ValueError("tokenizer.split_to_word_tokens must partition the text tokens")
    bounds = np.cumsum([0, *lengths])
    timings = [
        WordTiming(word, tuple(int(t) for t in group), float(token_starts[lo]), float(token_starts[hi]),
                   float(token_probs[lo:hi].mean()))
        for word, group, lo, hi in zip(words, word_tokens, bounds[:-1], bounds[1:], strict=True)
    ]
    return _monotone(_merge_punctuation(_clamp_long_words(timings)))


def _ends_sentence(word: str) -> bool:
    text = word.strip()
    return bool(text) and text[-1] in SENTENCE_END


def _clamp_long_words(words: list[WordTiming]) -> list[WordTiming]:
    """Trim words longer than twice the median duration (median capped at 0.7 s) on their sentence side.

    Such a word usually swallowed a pause: a word ending a sentence loses its tail, a word after a sentence
    end loses its head.
    """
    durations = [w.end - w.start for w in words if w.end > w.start]
    if not durations:
        return words
    limit = 2 * min(MAX_MEDIAN_WORD_SECONDS, float(np.median(durations)))
    out = []
    for i, w in enumerate(words):
        if w.end - w.start > limit:
            if _ends_sentence(w.word):
                w = WordTiming(w.word, w.tokens, w.start, w.start + limit, w.probability)
            elif i > 0 and _ends_sentence(words[i - 1].word):
                w = WordTiming(w.word, w.tokens, w.end - limit, w.end, w.probability)
        out.append(w)
    return out


def _join(a: WordTiming, b: WordTiming, timed: WordTiming) -> WordTiming:
    """``a`` followed by ``b`` with the times of ``timed``; probability stays the mean over all tokens."""
    n_a, n_b = len(a.tokens), len(b.tokens)
    probability = (a.probability * n_a + b.probability * n_b) / (n_a + n_b)
    return WordTiming(a.word + b.word, a.tokens + b.tokens, timed.start, timed.end, probability)


def _merge_punctuation(words: list[WordTiming]) -> list[WordTiming]:
    """Attach opening punctuation words (`` "``, `` (``, ...) to the next word and closing ones to the
    previous word, keeping the receiving word's times."""
    backward: list[WordTiming] = []
    for w in reversed(words):
        text = w.word.strip()
        if backward and w.word.startswith(" ") and text and set(text) <= PREPENDED_PUNCTUATION:
            backward[-1] = _join(w, backward[-1], backward[-1])
        else:
            backward.append(w)
    merged: list[WordTiming] = []
    for w in reversed(backward):
        if (merged and w.word and not w.word[0].isspace() and not merged[-1].word.endswith(" ")
                and set(w.word) <= APPENDED_PUNCTUATION):
            merged[-1] = _join(merged[-1], w, merged[-1])
        else:
            merged.append(w)
    return merged


def _monotone(words: list[WordTiming]) -> list[WordTiming]:
    """Shift starts/ends so that no word starts before the previous one ends or ends before it starts."""
    out = []
    last = 0.0
    for w in words:
        start = max(w.start, last)
        last = max(w.end, start)
        out.append(w if (start, last) == (w.start, w.end) else
                   WordTiming(w.word, w.tokens, start, last, w.probability))
    return out
