"""Batched inference across streams: ragged decoder caches, batched greedy decoding, ``run_windows``.

Every batched result must be the one each request gets on its own: the same tokens and words, logits equal
up to float rounding (reordered sums in batched matrix products).
"""

from __future__ import annotations

import asyncio
import os
import signal
import wave
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from streaming.engine import Engine, inference
from streaming.engine.decoding import (
    DecodingOptions,
    FallbackPolicy,
    GreedyJob,
    decode,
    decode_greedy_batch,
    prefill,
    prefill_batch,
)
from streaming.engine.inference import (
    WindowReply,
    WindowRequest,
    encode_window,
    encode_windows,
    run_window,
    run_windows,
)
from streaming.engine.model import KVCache, Whisper
from streaming.engine.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

SR = 16000
ATOL = 1e-4


def random_features(model: Whisper, frames: int, seed: int) -> torch.Tensor:
    mel = torch.randn(1, 80, frames, generator=torch.Generator().manual_seed(seed)) * 0.5
    return model.encode(mel)


# ------------------------------------------------------------------ ragged caches on the random tiny model

# Three streams: different audio contexts (200, 300, 250 positions) and token histories (3, 7, 5 tokens).
STREAMS = [(400, [50257, 50362, 440]), (600, [50257, 50362, 440, 2068, 11, 257, 3290]),
           (500, [50257, 50362, 13, 50256, 198])]


@pytest.fixture(scope="module")
def streams(tiny_model) -> list[tuple[torch.Tensor, list[int]]]:
    return [(random_features(tiny_model, frames, seed), tokens) for seed, (frames, tokens) in enumerate(STREAMS)]


@torch.inference_mode()
def alone(model: Whisper, features: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """Logits of ``tokens`` decoded on their own, [1, len(tokens), vocab]."""
    return model.decoder(torch.tensor([tokens]), model.decoder.new_cache(features))[0]


@torch.inference_mode()
def test_stacked_caches_decode_each_row_as_alone(tiny_model, streams) -> None:
    caches = [tiny_model.decoder(torch.tensor([t]), tiny_model.decoder.new_cache(f))[1] for f, t in streams]
    cache = KVCache.stack(caches)
    assert cache.batch_size == 3 and cache.length == 7
    assert cache.self_mask.sum(-1).tolist() == [3, 7, 5]
    assert cache.audio_mask.sum(-1).tolist() == [200, 300, 250]
    # One step, then two tokens at once (the causal mask and the padding mask together).
    steps = [torch.tensor([[11], [13], [262]]), torch.tensor([[262, 11], [198, 440], [11, 13]])]
    history = [list(t) for _, t in streams]
    for step in steps:
        logits, cache, _ = tiny_model.decoder(step, cache)
        for row, (features, _) in enumerate(streams):
            history[row] += step[row].tolist()
            ref = alone(tiny_model, features, history[row])[0, -step.shape[1]:]
            torch.testing.assert_close(logits[row], ref, atol=ATOL, rtol=0)
    # Rows leave the batch; a single remaining row keeps its masks.
    for keep in ([2, 0], [1]):
        cache = cache.select(torch.tensor(keep))
        history = [history[i] for i in keep]
        streams = [streams[i] for i in keep]
        logits, cache, _ = tiny_model.decoder(torch.full((len(keep), 1), 257), cache)
        for row, (features, _) in enumerate(streams):
            history[row].append(257)
            torch.testing.assert_close(logits[row, -1], alone(tiny_model, features, history[row])[0, -1],
                                       atol=ATOL, rtol=0)
    assert cache.audio_mask is not None and cache.self_mask is not None


@torch.inference_mode()
def test_stacking_equal_caches_adds_no_masks(tiny_model, streams) -> None:
    features, tokens = streams[0]
    cache = tiny_model.decoder(torch.tensor([tokens]), tiny_model.decoder.new_cache(features))[1]
    stacked = KVCache.stack([cache, cache.select(torch.zeros(2, dtype=torch.long))])
    assert stacked.batch_size == 3 and stacked.self_mask is None and stacked.audio_mask is None
    assert stacked.trim(2).length == 2
    with pytest.raises(ValueError, match="all have decoded positions, or none"):
        KVCache.stack([cache, cache.trim(0)])


def jobs_for(model: Whisper, tok: Tokenizer, streams, options: list[DecodingOptions]) -> list[GreedyJob]:
    return [GreedyJob(tok, f, o, prefill(model, tok, f, o)) for (f, _), o in zip(streams, options)]


def test_greedy_batch_matches_decode(tiny_model, streams, tok) -> None:
    options = [DecodingOptions(without_timestamps=True, sample_len=9),
               DecodingOptions(without_timestamps=True, prompt=(440, 2068, 11), prefix=(257,), sample_len=6),
               DecodingOptions(sample_len=12)]  # with timestamps: their rules apply per row
    jobs = jobs_for(tiny_model, tok, streams, options)
    batched = decode_greedy_batch(tiny_model, jobs)
    for job, result in zip(jobs, batched):
        ref = decode(tiny_model, tok, job.features, job.options, job.start)
        assert result.tokens == ref.tokens and result.text == ref.text
        assert result.avg_logprob == pytest.approx(ref.avg_logprob, abs=ATOL)
        assert result.token_probs == pytest.approx(ref.token_probs, abs=ATOL)


def draft_cases(tokens: list[int]) -> dict[str, tuple[int, ...]]:
    """Drafts for a window whose greedy decode is ``tokens``: right, partly right, wrong, too long."""
    return {"whole": tuple(tokens), "start": tuple(tokens[:3]), "wrong middle": (*tokens[:2], 7, *tokens[3:]),
            "wrong first": (7, *tokens[1:]), "too long": (*tokens, *tokens)}


@pytest.mark.parametrize("timestamps", [False, True])
def test_draft_changes_nothing_but_the_passes(tiny_model, streams, tok, monkeypatch, timestamps) -> None:
    features = streams[1][0]
    options = DecodingOptions(without_timestamps=not timestamps, prompt=(440, 2068), sample_len=10)
    calls = []
    forward = tiny_model.decoder.forward
    monkeypatch.setattr(tiny_model.decoder, "forward", lambda *a, **k: calls.append(a[0].shape) or forward(*a, **k))
    plain = decode(tiny_model, tok, features, options)
    # the prefill, then a pass per token after the first (and for the end of text, unless at the sample length)
    steps = len(plain.tokens) - (len(plain.tokens) == options.sample_len)
    assert len(plain.tokens) >= 5 and len(calls) == 1 + steps
    for name, draft in draft_cases(plain.tokens).items():
        drafted = replace(options, draft=draft)
        start = prefill(tiny_model, tok, features, drafted)
        assert start.cache.length == len(start.initial)  # the draft's positions are only in start.ahead
        calls.clear()
        result = decode(tiny_model, tok, features, drafted, start)
        assert result.tokens == plain.tokens, name
        assert result.token_probs == pytest.approx(plain.token_probs, abs=ATOL), name
        assert result.avg_logprob == pytest.approx(plain.avg_logprob, abs=ATOL), name
        if name in ("whole", "too long"):
            assert calls == [], name  # the prefill's pass checked it all
            assert len(start.draft) <= options.sample_len - 1, name
        if name == "start":
            assert len(calls) == steps - 3, name
        if name == "wrong first":
            assert len(calls) == steps, name


def test_drafts_in_a_batch_give_each_rows_own_result(tiny_model, streams, tok) -> None:
    options = [DecodingOptions(without_timestamps=True, sample_len=9),
               DecodingOptions(without_timestamps=True, prompt=(440, 2068, 11), prefix=(257,), sample_len=6),
               DecodingOptions(sample_len=12)]
    plain = decode_greedy_batch(tiny_model, jobs_for(tiny_model, tok, streams, options))
    for names in (("whole", "wrong middle", "start"), ("wrong first", "too long", "whole"), ("start", None, None)):
        drafted = [replace(o, draft=draft_cases(r.tokens)[n] if n else ()) for o, r, n in zip(options, plain, names)]
        for result, ref in zip(decode_greedy_batch(tiny_model, jobs_for(tiny_model, tok, streams, drafted)), plain):
            assert result.tokens == ref.tokens, names
            assert result.token_probs == pytest.approx(ref.token_probs, abs=ATOL), names


@torch.inference_mode()
def test_a_batched_prefill_gives_each_window_its_own(tiny_model, streams, tok) -> None:
    options = [DecodingOptions(without_timestamps=True, sample_len=9, draft=(262, 11, 290)),
               DecodingOptions(without_timestamps=True, prompt=(440, 2068, 11), prefix=(257, 11), sample_len=6),
               DecodingOptions(prefix=(13,), sample_len=12, draft=(464,))]  # three token counts and audio contexts
    fresh = [tiny_model.decoder.new_cache(features) for features, _ in streams]
    batched = prefill_batch(tiny_model, [(tok, o, cache) for o, cache in zip(options, fresh)])
    for (features, _), o, start in zip(streams, options, batched):
        ref = prefill(tiny_model, tok, features, replace(o, draft=()))
        assert start.initial == ref.initial and start.draft == o.draft
        if o.draft:  # the logits after each draft token are those of feeding it after the initial tokens
            alone = tiny_model.decoder(torch.tensor([list(o.draft)]), ref.cache)[0][0]
            torch.testing.assert_close(start.draft_logits, alone, atol=ATOL, rtol=0)
            assert start.ahead.length == len(start.initial) + len(o.draft)
        assert start.cache.length == ref.cache.length == len(ref.initial) and start.cache.self_mask is None
        assert start.cache.cross_kv[0][0].shape == ref.cache.cross_kv[0][0].shape  # its own audio, unpadded
        torch.testing.assert_close(start.last_logits, ref.last_logits, atol=ATOL, rtol=0)
        assert start.no_speech_prob == pytest.approx(ref.no_speech_prob, abs=ATOL)
        # and each row's cache continues as its own would
        step = torch.tensor([[262]])
        torch.testing.assert_close(tiny_model.decoder(step, start.cache)[0], tiny_model.decoder(step, ref.cache)[0],
                                   atol=ATOL, rtol=0)


def test_greedy_batch_refuses_other_decodings(tiny_model, streams, tok) -> None:
    for options in (DecodingOptions(beam_size=2), DecodingOptions(temperature=0.5)):
        with pytest.raises(ValueError, match="greedily"):
            decode_greedy_batch(tiny_model, jobs_for(tiny_model, tok, streams[:1], [options]))


# -------------------------------------------------------------------------- run_windows on the real tiny.en


def read_wav(path: Path, start: float, end: float) -> np.ndarray:
    with wave.open(str(path)) as w:
        w.setpos(int(start * SR))
        data = w.readframes(int((end - start) * SR))
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


@pytest.fixture(scope="module")
def requests(engine, shared_eval) -> list[WindowRequest]:
    """Windows of en_mixed as streams send them: different audio lengths, committed prefixes and prompts,
    a final decode with beam search and Whisper's full context, and a window of noise."""
    streams = shared_eval / "streams"
    clip = lambda a, b: read_wav(streams / "en_mixed.wav", a, b)  # noqa: E731
    enc = engine.tokenizer().encode
    return [
        WindowRequest(clip(0.5, 6.0)),
        WindowRequest(clip(0.5, 9.3), prefix=tuple(enc(" And so my fellow Americans,"))),
        WindowRequest(clip(12.9, 17.2), initial_prompt="Samuel Beckett"),
        WindowRequest(clip(23.3, 26.4), prompt=tuple(enc(" Ever tried. Ever failed. No matter."))),
        WindowRequest(clip(32.0, 35.2), prefix=tuple(enc(" The north wind"))),
        WindowRequest(clip(38.6, 44.8)),
        WindowRequest(clip(36.0, 37.8), prompt=tuple(enc(" front left")), final=True, beam_size=5, context=30.0),
        WindowRequest(read_wav(streams / "noise_only.wav", 3.0, 7.0)),
    ]


def assert_same_reply(batched: WindowReply, alone: WindowReply) -> None:
    assert [(w.word, w.tokens) for w in batched.words] == [(w.word, w.tokens) for w in alone.words]
    for b, a in zip(batched.words, alone.words):  # word times are whole 20 ms frames from a DTW path
        assert (b.start, b.end) == pytest.approx((a.start, a.end), abs=0.021)
        assert b.probability == pytest.approx(a.probability, abs=ATOL)
    assert (batched.language, batched.silence) == (alone.language, alone.silence)
    assert batched.no_speech_prob == pytest.approx(alone.no_speech_prob, abs=ATOL)
    assert batched.avg_logprob == pytest.approx(alone.avg_logprob, abs=ATOL)


@pytest.mark.real_model
def test_encoder_batches_equal_contexts(engine, requests, monkeypatch) -> None:
    calls = []
    encode = engine.encode
    monkeypatch.setattr(engine, "encode", lambda mel: calls.append(mel.shape[0]) or encode(mel))
    encoded = encode_windows(engine, requests)
    monkeypatch.undo()
    contexts = [f.shape[1] for f, _ in encoded]
    assert sorted(calls) == sorted(contexts.count(c) for c in set(contexts)) and max(calls) > 1
    for request, (features, frames) in zip(requests, encoded):
        ref, ref_frames = encode_window(engine, request.audio, request.context)
        assert frames == ref_frames
        torch.testing.assert_close(features, ref, atol=ATOL, rtol=0)


@pytest.mark.real_model
def test_run_windows_replies_as_each_request_alone(engine, requests, monkeypatch) -> None:
    torch.manual_seed(0)  # a fallback decode samples: the same draws in the same order in both runs
    expected = [run_window(engine, r) for r in requests]
    assert any(r.words for r in expected) and expected[-1].silence and not expected[-1].words
    batches = []
    greedy = inference.decode_greedy_batch
    monkeypatch.setattr(inference, "decode_greedy_batch", lambda m, jobs: batches.append(len(jobs)) or greedy(m, jobs))
    torch.manual_seed(0)
    replies = run_windows(engine, requests)
    assert batches == [len(requests) - 1]  # every greedy request in one batch; the beam search alone
    for reply, alone in zip(replies, expected, strict=True):
        assert_same_reply(reply, alone)


@pytest.mark.real_model
def test_a_failing_request_gets_its_own_exception(engine, requests) -> None:
    broken = replace(requests[0], audio=np.zeros((2, SR), np.float32))  # not mono: the front end refuses it
    batch = [requests[3], broken, requests[4]]
    replies = run_windows(engine, batch)
    assert isinstance(replies[1], ValueError)
    for reply, request in zip([replies[0], replies[2]], [requests[3], requests[4]]):
        assert_same_reply(reply, run_window(engine, request))


def test_single_request_runs_alone(tiny_model, tok, monkeypatch) -> None:
    monkeypatch.setattr(inference, "encode_windows", lambda *a: pytest.fail("a single request needs no batch"))
    small = Engine(tiny_model, tok)
    [reply] = run_windows(small, [WindowRequest(np.zeros(SR, np.float32), beam_size=1)])
    assert isinstance(reply, WindowReply)



@pytest.mark.real_model
@pytest.mark.parametrize("batched", [False, True])
def test_only_final_decodes_fall_back_to_sampling(engine, requests, monkeypatch, batched: bool) -> None:
    calls = []
    decode = inference._decode
    monkeypatch.setattr(inference, "_decode", lambda engine, window, policy: calls.append(
        (window.request.final, policy.temperatures)) or decode(engine, window, policy))
    replies = run_windows(engine, requests) if batched else [run_window(engine, r) for r in requests]
    interim = [temperatures for final, temperatures in calls if not final]
    if batched:  # greedy interim decodes run in the batch and never continue at a higher temperature
        assert interim == []
    else:
        assert interim and all(t == (0.0,) for t in interim)
    assert [t for final, t in calls if final] == [FallbackPolicy().temperatures]
    assert all(not isinstance(r, Exception) for r in replies)


@pytest.mark.real_model
def test_worker_processes_reply_as_decoding_in_this_process(engine, requests) -> None:
    from streaming.scheduler import Scheduler
    from streaming.workers import ChildEngine, ProcessRunner

    greedy = [r for r in requests if not r.final]  # a final decode may sample: its draws differ by process
    expected = run_windows(engine, greedy)
    runner = ProcessRunner("tiny.en", engine.dtype_name, workers=2, threads=1, heap_trim_seconds=0.5)
    assert runner.engine == ChildEngine("tiny.en", multilingual=False, dtype_name=engine.dtype_name)
    children = [running_check(pid) for pid in runner.pids]
    scheduler = Scheduler(engine, max_batch=4, runner=runner, workers=2)

    async def submit_all() -> list[WindowReply]:
        return list(await asyncio.gather(*(scheduler.submit(r) for r in greedy)))

    try:
        replies = asyncio.run(submit_all())
    finally:
        scheduler.close()
    for reply, alone in zip(replies, expected, strict=True):
        assert_same_reply(reply, alone)
    assert not any(alive() for alive in children)  # closing the scheduler stopped the children


@pytest.mark.real_model
def test_worker_processes_compute_speaker_embeddings_with_the_decodes(engine, requests, speaker_encoder) -> None:
    from streaming.core.messages import EmbedReply, EmbedRequest
    from streaming.workers import ProcessRunner

    clips = (requests[0].audio, requests[1].audio[:8000])
    runner = ProcessRunner("tiny.en", engine.dtype_name, workers=1, threads=1, heap_trim_seconds=0)
    try:
        embedded, decoded = list(runner(None, [EmbedRequest(clips), requests[0]]))
    finally:
        runner.close()
    assert isinstance(embedded, EmbedReply) and embedded.embeddings.shape == (2, 256)
    np.testing.assert_allclose(embedded.embeddings, speaker_encoder.embed(list(clips)), atol=1e-4)
    assert_same_reply(decoded, run_window(engine, requests[0]))


@pytest.mark.real_model
def test_a_worker_process_that_dies_fails_its_batch_and_is_replaced(engine, requests) -> None:
    from streaming.workers import ProcessRunner

    runner = ProcessRunner("tiny.en", engine.dtype_name, workers=1, threads=1, heap_trim_seconds=0)
    try:
        [pid] = runner.pids
        os.kill(pid, signal.SIGKILL)
        [failed] = list(runner(None, [requests[0]]))
        assert isinstance(failed, RuntimeError) and "died (exit code -9)" in str(failed)
        assert runner.pids != [pid]
        [reply] = list(runner(None, [requests[0]]))
        assert_same_reply(reply, run_window(engine, requests[0]))
    finally:
        runner.close()


def test_worker_processes_name_a_model_that_does_not_load() -> None:
    from streaming.workers import ProcessRunner

    with pytest.raises(RuntimeError, match="model path /no-such-model does not exist"):
        ProcessRunner("/no-such-model", "float32", workers=1)


def running_check(pid: int):
    """A check whether process ``pid`` still runs (and is not a zombie), from /proc."""
    def alive() -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False
    return alive
