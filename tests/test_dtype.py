"""Model precision and device choice: bfloat16 on CPU transcribes like float32; bad choices are clear errors."""

from __future__ import annotations

import copy
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from streaming.engine import Engine
from streaming.engine.engine import fast_cpu_dtype
from streaming.engine.inference import WindowRequest, run_window
from streaming.engine.model import HalfStored, MultiHeadAttention, _row_bucket, linear, pack_weight
from streaming.engine.weights import ModelLoadError


@pytest.mark.real_model
def test_bfloat16_transcribes_the_jfk_clip_like_float32(engine: Engine, shared_eval: Path) -> None:
    with wave.open(str(shared_eval / "streams" / "en_mixed.wav")) as w:
        audio = np.frombuffer(w.readframes(int(11.6 * 16000)), "<i2").astype(np.float32) / 32768
    half = Engine.load("tiny.en", device="cpu", dtype="bfloat16")
    assert half.model.dtype == torch.bfloat16
    for request in (WindowRequest(audio[: 3 * 16000]), WindowRequest(audio, final=True, beam_size=5, context=30)):
        reference, reply = run_window(engine, request), run_window(half, request)
        assert [w.word for w in reply.words] == [w.word for w in reference.words]
        for a, b in zip(reply.words, reference.words):
            assert a.start == pytest.approx(b.start, abs=0.1) and a.end == pytest.approx(b.end, abs=0.1)
    assert "fellow Americans" in "".join(w.word for w in reply.words)


def test_fast_cpu_dtype_follows_the_cpu_flags() -> None:
    flags = Path("/proc/cpuinfo").read_text(errors="replace") if Path("/proc/cpuinfo").exists() else ""
    native = "amx_bf16" in flags or "avx512_bf16" in flags
    assert fast_cpu_dtype() == ("bfloat16" if native else "float32")


def test_auto_dtype_is_the_fast_cpu_dtype_on_cpu() -> None:
    expected = torch.bfloat16 if fast_cpu_dtype() == "bfloat16" else torch.float32
    assert Engine.load("tiny.en", device="cpu", dtype="auto").model.dtype == expected
    if not torch.cuda.is_available():
        assert Engine.load("tiny.en", dtype="auto").model.dtype == expected


def test_unknown_dtype_and_missing_cuda_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="dtype 'int4' is not supported; use one of float32, bfloat16, float16"):
        Engine.load("tiny.en", dtype="int4")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="this torch build sees no CUDA GPU; use --device cpu"):
            Engine.load("tiny.en", device="cuda")
    with pytest.raises(ModelLoadError, match="--device 'tpu9' is not a device"):
        Engine.load("tiny.en", device="tpu9")


def test_half_precision_linear_pads_rows_to_few_buckets_and_keeps_results() -> None:
    """oneDNN caches a kernel per shape: the decoder's many token counts must map to few row counts."""
    buckets = {_row_bucket(rows) for rows in range(1, 12001)}
    assert len(buckets) < 70
    assert all(rows <= _row_bucket(rows) <= rows * 1.25 for rows in range(1, 12001))
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 64).bfloat16(), torch.randn(96).bfloat16()
    for shape in ((1, 1, 64), (3, 37, 64), (2, 301, 64)):
        x = torch.randn(shape).bfloat16()
        out = linear(x, weight, bias)
        assert out.shape == (*shape[:-1], 96)
        torch.testing.assert_close(out.float(), F.linear(x.float(), weight.float(), bias.float()), atol=0.1, rtol=0.02)


def test_packed_bfloat16_weights_give_the_products_and_decoder_steps_of_the_plain_ones(tiny_model) -> None:
    """The decoder's weights reordered once for oneDNN (bfloat16 on CPU) change the speed, not the numbers."""
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 64).bfloat16(), torch.randn(96).bfloat16()
    packed = pack_weight(weight)
    if packed is None:
        pytest.skip("this torch build cannot reorder bfloat16 weights for oneDNN")
    for shape in ((1, 1, 64), (5, 1, 64), (2, 37, 64)):
        x = torch.randn(shape).bfloat16()
        torch.testing.assert_close(linear(x, weight, bias, packed), linear(x, weight, bias), atol=0, rtol=0)
    assert pack_weight(weight.float()) is None

    model = copy.deepcopy(tiny_model).to(torch.bfloat16)  # the fixture is shared: leave it float32
    features = torch.randn(1, 100, model.dims.n_audio_state).bfloat16()
    tokens = torch.tensor([[model.dims.n_vocab - 100, 11, 12, 13]])

    def logits() -> torch.Tensor:
        cache = model.decoder.new_cache(features)
        prompt, cache, _ = model.decoder(tokens, cache)
        step, _, _ = model.decoder(torch.tensor([[14], [15]]), cache.select(torch.tensor([0, 0])))
        return torch.cat([prompt[0], step[:, -1]])

    plain = logits()
    model.decoder.pack()
    assert model.decoder.packed_logits is not None
    torch.testing.assert_close(logits(), plain, atol=0, rtol=0)


@pytest.mark.real_model
def test_int8_transcribes_the_jfk_clip_like_float32(engine: Engine, shared_eval: Path) -> None:
    with wave.open(str(shared_eval / "streams" / "en_mixed.wav")) as w:
        audio = np.frombuffer(w.readframes(int(11.6 * 16000)), "<i2").astype(np.float32) / 32768
    int8 = Engine.load("tiny.en", device="cpu", dtype="int8")
    assert int8.dtype_name == "int8" and int8.model.dtype == torch.float32
    request = WindowRequest(audio, final=True, beam_size=5, context=30)
    reference, reply = run_window(engine, request), run_window(int8, request)

    def words(r) -> list[str]:  # punctuation may differ ("you." / "you")
        return [w.word.strip(" .,!?").lower() for w in r.words]

    assert words(reply) == words(reference)


def test_int8_products_stay_close_to_float32_and_need_float32_weights(tiny_model) -> None:
    layer = torch.nn.Linear(64, 96)
    x = torch.randn(5, 64)
    packed = pack_weight(layer.weight, layer.bias, int8=True)
    exact = F.linear(x, layer.weight, layer.bias)
    assert (linear(x, layer.weight, layer.bias, packed) - exact).abs().max() < 0.05 * exact.abs().max()
    with pytest.raises(ValueError, match="int8 runs on the CPU from float32 weights"):
        copy.deepcopy(tiny_model).to(torch.bfloat16).pack(int8=True)


def test_a_half_stored_float32_weight_gives_float32_products(tiny_model) -> None:
    """The vocabulary projection of a float32 model is half-stored (fbgemm); weights that float16 holds
    exactly (Whisper's checkpoints) give float32's logits up to summation order."""
    torch.manual_seed(0)
    weight = torch.randn(300, 64).half().float()
    packed = pack_weight(weight, half_stored=True)
    if packed is None:
        pytest.skip("this torch build has no fbgemm (half-stored products run on x86 only)")
    assert isinstance(packed, HalfStored) and pack_weight(weight) is None
    assert pack_weight(weight + 1e-6, half_stored=True) is None  # float16 would round it: stays float32
    for shape in ((1, 1, 64), (5, 1, 64), (2, 37, 64)):
        x = torch.randn(shape)
        torch.testing.assert_close(linear(x, weight, packed=packed), F.linear(x, weight), atol=1e-5, rtol=1e-5)
    model = copy.deepcopy(tiny_model)  # the fixture is shared: leave it unpacked
    model.pack()
    assert model.decoder.packed_logits is None  # random float32 weights: float16 would round them
    model = model.half().float()  # as Whisper's checkpoints: float16 values
    model.pack()
    assert isinstance(model.decoder.packed_logits, HalfStored)


def test_beams_sharing_one_audio_attend_to_it_as_the_rows_of_their_own_copies_do() -> None:
    torch.manual_seed(0)
    attention = MultiHeadAttention(64, 4)
    rows, audio = torch.randn(5, 3, 64), torch.randn(1, 50, 64)
    k, v = attention.project_kv(audio)
    copies = (k.expand(5, -1, -1, -1).contiguous(), v.expand(5, -1, -1, -1).contiguous())
    for mask in (None, torch.rand(1, 1, 1, 50) > 0.2):
        shared, _ = attention.attend(rows, (k, v), mask, None)
        torch.testing.assert_close(shared, attention.attend(rows, copies, mask, None)[0], atol=1e-6, rtol=1e-5)
