"""Word alignment: DTW, median filter, cleanup heuristics and find_alignment on tiny/fake models."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from streaming.engine.alignment import (
    AlignmentWindow,
    WordTiming,
    _clamp_long_words,
    _merge_punctuation,
    _monotone,
    dtw,
    find_alignment,
    find_alignments,
    median_filter,
)
from streaming.engine.model import KVCache, ModelDims, Whisper

STEPS = {(1, 1), (1, 0), (0, 1)}


def naive_dtw(cost: np.ndarray) -> tuple[list[int], list[int]]:
    """Cell-by-cell DP with the same tie rule as ``dtw``: diagonal, then text step, then time step."""
    n, m = cost.shape
    acc = np.full((n + 1, m + 1), np.inf)
    for i in range(n):
        for j in range(m):
            prev = 0.0 if i == j == 0 else min(acc[i, j], acc[i, j + 1], acc[i + 1, j])
            acc[i + 1, j + 1] = cost[i, j] + prev
    i, j = n - 1, m - 1
    path = [(i, j)]
    while i or j:
        diag, up, left = acc[i, j], acc[i, j + 1], acc[i + 1, j]
        if diag <= up and diag <= left:
            i, j = i - 1, j - 1
        elif up <= left:
            i -= 1
        else:
            j -= 1
        path.append((i, j))
    text, time = zip(*path[::-1], strict=True)
    return list(text), list(time)


def all_paths(n: int, m: int, i: int = 0, j: int = 0):
    if (i, j) == (n - 1, m - 1):
        yield [(i, j)]
        return
    for di, dj in STEPS:
        if i + di < n and j + dj < m:
            for rest in all_paths(n, m, i + di, j + dj):
                yield [(i, j), *rest]


def assert_valid_path(text: np.ndarray, time: np.ndarray, n: int, m: int) -> None:
    assert (text[0], time[0]) == (0, 0) and (text[-1], time[-1]) == (n - 1, m - 1)
    assert set(zip(np.diff(text).tolist(), np.diff(time).tolist(), strict=True)) <= STEPS


def test_dtw_follows_the_cheap_diagonal():
    text, time = dtw(1.0 - np.eye(6))
    assert text.tolist() == list(range(6)) and time.tolist() == list(range(6))


def test_dtw_recovers_a_rewarded_staircase():
    path = [(0, 0), (0, 1), (1, 2), (2, 2), (2, 3), (3, 4), (3, 5), (3, 6)]
    cost = np.ones((4, 7))
    for i, j in path:
        cost[i, j] = -1.0  # a negative reward, so cutting a corner diagonally costs more
    text, time = dtw(cost)
    assert list(zip(text.tolist(), time.tolist(), strict=True)) == path


@pytest.mark.parametrize("seed", range(20))
def test_dtw_matches_naive_dp_and_brute_force(seed):
    cost = np.random.default_rng(seed).standard_normal((4, 5))
    text, time = dtw(cost)
    assert (text.tolist(), time.tolist()) == naive_dtw(cost)
    best = min(sum(cost[i, j] for i, j in p) for p in all_paths(4, 5))
    assert cost[text, time].sum() == pytest.approx(best)


def test_dtw_ties_are_deterministic():
    text, time = dtw(np.zeros((3, 5)))
    assert text.tolist() == [0, 0, 0, 1, 2] and time.tolist() == [0, 1, 2, 3, 4]
    for n, m in [(1, 1), (1, 4), (4, 1)]:
        assert (dtw(np.zeros((n, m)))[0].tolist(), dtw(np.zeros((n, m)))[1].tolist()) == naive_dtw(
            np.zeros((n, m)))


def test_dtw_medium_matrix_matches_naive():
    cost = np.random.default_rng(1).random((20, 300))
    text, time = dtw(cost)
    assert (text.tolist(), time.tolist()) == naive_dtw(cost)


def test_dtw_full_window_smoke():
    cost = np.random.default_rng(2).standard_normal((100, 1500)).astype(np.float32)
    text, time = dtw(cost)
    assert_valid_path(text, time, 100, 1500)


@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (5,)])
def test_dtw_rejects_bad_shapes(shape):
    with pytest.raises(ValueError):
        dtw(np.zeros(shape))


def naive_median(x: np.ndarray, width: int) -> np.ndarray:
    pad = width // 2
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="reflect")
    return np.stack([np.median(padded[..., k: k + width], axis=-1) for k in range(x.shape[-1])], axis=-1)


@pytest.mark.parametrize("width", [1, 3, 7])
@pytest.mark.parametrize("shape", [(9,), (3, 11), (2, 4, 50)])
def test_median_filter_matches_naive(width, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(width))
    out = median_filter(x, width)
    assert out.shape == x.shape
    np.testing.assert_allclose(out.numpy(), naive_median(x.numpy(), width))


def test_median_filter_edge_cases():
    short = torch.randn(2, 3)
    assert torch.equal(median_filter(short, 7), short)
    for width in (0, 4):
        with pytest.raises(ValueError):
            median_filter(short, width)


def word(text: str, start: float, end: float, probability: float = 0.5, tokens: tuple[int, ...] = (1,)):
    return WordTiming(text, tokens, start, end, probability)


def test_merge_punctuation():
    words = [word(' "', 0.0, 0.2, 0.2), word(" (", 0.2, 0.3), word(" Hi", 0.3, 0.6, 0.8, (5, 6)),
             word(",", 0.6, 0.7, 0.1), word(" there", 0.7, 1.0), word("?", 1.0, 1.2), word('"', 1.2, 1.3),
             word(" (", 1.3, 1.4)]
    merged = _merge_punctuation(words)
    assert [w.word for w in merged] == [' " ( Hi,', ' there?"', " ("]
    assert (merged[0].start, merged[0].end) == (0.3, 0.6)
    assert merged[0].tokens == (1, 1, 5, 6, 1)
    assert merged[0].probability == pytest.approx((0.2 + 0.5 + 0.8 * 2 + 0.1) / 5)
    assert (merged[1].start, merged[1].end) == (0.7, 1.0)
    assert _merge_punctuation([word(" a", 0, 1), word("-", 1, 2)]) == [word(" a", 0, 1), word("-", 1, 2)]


def test_clamp_long_words_at_sentence_boundaries():
    words = [word(" One", 0.0, 0.3), word(" two.", 0.3, 2.0), word(" Three", 2.0, 4.0), word(" four", 4.0, 6.0),
             word(" five", 6.0, 6.3)]
    clamped = _clamp_long_words(words)
    limit = 2 * 0.7  # the median duration (1.7 s) is capped at 0.7 s
    assert (clamped[1].start, clamped[1].end) == (0.3, pytest.approx(0.3 + limit))
    assert (clamped[2].start, clamped[2].end) == (pytest.approx(4.0 - limit), 4.0)
    assert clamped[3] == words[3] and clamped[0] == words[0] and clamped[4] == words[4]
    assert _clamp_long_words([word(" a", 1.0, 1.0)]) == [word(" a", 1.0, 1.0)]


def test_monotone():
    fixed = _monotone([word(" a", 0.0, 0.5), word(" b", 0.4, 0.3), word(" c", 0.2, 0.9)])
    assert [(w.start, w.end) for w in fixed] == [(0.0, 0.5), (0.5, 0.5), (0.5, 0.9)]


class FakeTokenizer:
    """English-vocabulary special tokens; a word starts at each piece with a leading space."""

    eot = 50256
    sot_sequence = (50257,)
    no_timestamps = 50362
    timestamp_begin = 50363

    def __init__(self, pieces: dict[int, str]):
        self.pieces = pieces

    def decode(self, ids: list[int]) -> str:
        return "".join(self.pieces[i] for i in ids if i < self.eot)

    def split_to_word_tokens(self, tokens: list[int]) -> tuple[list[str], list[list[int]]]:
        words: list[str] = []
        groups: list[list[int]] = []
        for t in tokens:
            piece = self.pieces[t]
            if not words or piece.startswith(" "):
                words.append(piece)
                groups.append([t])
            else:
                words[-1] += piece
                groups[-1].append(t)
        return words, groups


class BlockAttentionDecoder:
    """Decoder stub: text token k attends to frames [20k, 20k + 20), eot to the next block; every token also
    attends strongly to frames past the real audio, which find_alignment must ignore."""

    def __init__(self, n_prefix: int, vocab: int = 1000, audio_ctx: int = 150):
        self.n_prefix, self.vocab, self.audio_ctx = n_prefix, vocab, audio_ctx

    def new_cache(self, audio_features):
        audio = torch.zeros(1, 1, self.audio_ctx, 1)
        return KVCache([], [(audio, audio)])

    def __call__(self, tokens, cache, alignment_heads, logits_at):
        t = tokens.shape[1]
        w = torch.full((1, len(alignment_heads), t, self.audio_ctx), 0.01)
        w[..., 100:] = 1.0
        for k in range(t - self.n_prefix):
            w[:, :, self.n_prefix + k, 20 * k: 20 * k + 20] = 1.0
        logits = torch.zeros(1, t, self.vocab).gather(1, logits_at[..., None].expand(-1, -1, self.vocab))
        return logits, cache, w / w.sum(-1, keepdim=True)


def test_find_alignment_recovers_block_attention():
    tokenizer = FakeTokenizer({11: " one", 12: " two", 13: " three", 14: " four"})
    model = SimpleNamespace(decoder=BlockAttentionDecoder(n_prefix=2), alignment_heads=[(0, 0), (0, 1)])
    words = find_alignment(model, tokenizer, [11, 12, 13, 14], torch.zeros(1, 150, 8), num_frames=200)
    assert [w.word for w in words] == [" one", " two", " three", " four"]
    assert [w.start for w in words] == pytest.approx([0.0, 0.4, 0.8, 1.2])
    assert [w.end for w in words] == pytest.approx([0.4, 0.8, 1.2, 1.6])
    assert all(w.probability == pytest.approx(1 / 1000) for w in words)


PIECES = {464: " The", 3797: " cat", 82: "s", 11: ",", 257: " a", 1332: " te", 301: "st", 13: "."}
TEXT = [464, 3797, 82, 11, 257, 1332, 301, 13]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    dims = ModelDims(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=2,
                     n_vocab=51864, n_text_ctx=448, n_text_state=64, n_text_head=2, n_text_layer=2)
    model = Whisper(dims)
    torch.nn.init.normal_(model.decoder.positional_embedding, std=0.02)
    model = model.eval().requires_grad_(False)
    features = model.encode(torch.randn(1, 80, 3000))
    return model, FakeTokenizer(PIECES), features


def test_find_alignment_tiny_model(tiny):
    model, tokenizer, features = tiny
    num_frames = 1000
    words = find_alignment(model, tokenizer, TEXT, features, num_frames)
    assert [w.word for w in words] == [" The", " cats,", " a", " test."]
    assert [t for w in words for t in w.tokens] == TEXT
    for w in words:
        assert 0.0 <= w.start <= w.end <= num_frames * 0.01
        assert 0.0 <= w.probability <= 1.0
    assert all(a.end <= b.start for a, b in itertools.pairwise(words))

    tokens = torch.tensor([[*tokenizer.sot_sequence, tokenizer.no_timestamps, *TEXT, tokenizer.eot]])
    logits, _, _ = model.decoder(tokens, model.decoder.new_cache(features))
    probs = logits[0].softmax(-1)[torch.arange(1, 1 + len(TEXT)), torch.tensor(TEXT)]
    assert words[1].probability == pytest.approx(probs[1:4].mean().item(), rel=1e-5)


def test_find_alignment_reuses_cache(tiny):
    model, tokenizer, features = tiny
    expected = find_alignment(model, tokenizer, TEXT, features, 1000)
    fresh = model.decoder.new_cache(features)
    assert find_alignment(model, tokenizer, TEXT, features, 1000, cache=fresh) == expected
    prefix = [*tokenizer.sot_sequence, tokenizer.no_timestamps]
    _, prefilled, _ = model.decoder(torch.tensor([prefix]), fresh)
    assert find_alignment(model, tokenizer, TEXT, features, 1000, cache=prefilled) == expected
    assert find_alignment(model, tokenizer, TEXT, features, 1000, prefix_tokens=prefix) == expected


@torch.inference_mode()
def test_windows_aligned_together_get_their_own_timings(tiny):
    model, tokenizer, features = tiny
    cases = [(TEXT, features[:, :500], 1000, None),  # three text lengths, audio contexts and prefixes
             (TEXT[:3], features[:, :300], 560, [50257, 50358, 50362]),
             ([], features[:, :400], 800, None),
             (TEXT[2:], features, 1200, None)]
    windows = [AlignmentWindow(tokenizer, text, frames, model.decoder.new_cache(f), prefix)
               for text, f, frames, prefix in cases]
    together = find_alignments(model, windows)
    for (text, f, frames, prefix), words in zip(cases, together):
        alone = find_alignment(model, tokenizer, text, f, frames, prefix_tokens=prefix)
        assert [(w.word, w.tokens) for w in words] == [(w.word, w.tokens) for w in alone]
        for a, b in zip(words, alone):  # one 20 ms frame of leeway: batched sums round differently
            assert (a.start, a.end) == pytest.approx((b.start, b.end), abs=0.021)
            assert a.probability == pytest.approx(b.probability, abs=1e-4)
    assert together[2] == []


def test_find_alignment_edge_cases(tiny):
    model, tokenizer, features = tiny
    assert find_alignment(model, tokenizer, [], features, 1000) == []
    custom = find_alignment(model, tokenizer, TEXT, features, 64, prefix_tokens=[50257, 50358, 50362])
    assert [t for w in custom for t in w.tokens] == TEXT
    assert all(0.0 <= w.start <= w.end <= 0.64 for w in custom)
    with pytest.raises(ValueError):
        find_alignment(model, tokenizer, TEXT, features, 1)
