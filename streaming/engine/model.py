"""The Whisper encoder-decoder Transformer with explicit, batchable decoder caches.

Parameter names follow OpenAI's checkpoints, so their ``model_state_dict`` loads directly; the other
weight formats are renamed into this layout by :mod:`streaming.engine.weights`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tokenizer import MULTILINGUAL_VOCAB


@dataclass(frozen=True)
class ModelDims:
    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> Tensor:
    """The encoder's fixed sinusoidal position embedding, [length, channels]."""
    inv = torch.exp(-math.log(max_timescale) / (channels // 2 - 1) * torch.arange(channels // 2))
    angles = torch.arange(length)[:, None] * inv[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


@dataclass
class KVCache:
    """Decoder state for a batch of token sequences.

    ``self_kv`` grows by one entry per decoded position; ``cross_kv`` is computed once from the audio
    features. Tensors are [batch, heads, time, head_dim]; a ``cross_kv`` of batch 1 is shared by every row
    (beams and samples of one audio window), so reordering rows never copies it. ``audio_mask`` (optional,
    [batch, audio_ctx], True = keep) hides padding when streams with different audio lengths share a batch;
    ``self_mask`` (optional, [batch, time], True = a real position) does the same for streams whose token
    sequences have different lengths: each row's next position is its count of real positions.
    """

    self_kv: list[tuple[Tensor, Tensor]]
    cross_kv: list[tuple[Tensor, Tensor]]
    audio_mask: Tensor | None = None
    self_mask: Tensor | None = None

    @property
    def length(self) -> int:
        """Decoded positions held (padding included when rows differ)."""
        return self.self_kv[0][0].shape[2] if self.self_kv else 0

    @property
    def batch_size(self) -> int:
        return (self.self_kv or self.cross_kv)[0][0].shape[0]

    @classmethod
    def stack(cls, caches: list[KVCache]) -> KVCache:
        """One batch of the rows of ``caches`` (e.g. several streams' prefills), padded to the longest token
        sequence and audio context with masks hiding the padding. Either every cache has decoded positions
        or none has (fresh caches of several windows, for one prefill pass)."""
        if len({bool(c.self_kv) for c in caches}) > 1:
            raise ValueError("KVCache.stack needs caches that all have decoded positions, or none")
        rows = [c.batch_size for c in caches]
        cross = [[(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in c.cross_kv]
                 for c, n in zip(caches, rows)]
        length, ctx = max(c.length for c in caches), max(c[0][0].shape[2] for c in cross)
        device = cross[0][0][0].device
        self_mask = _stack_masks([c.self_mask for c in caches], [c.length for c in caches], rows, length, device)
        audio_mask = _stack_masks([c.audio_mask for c in caches], [c[0][0].shape[2] for c in cross], rows, ctx,
                                  device)
        return cls(_stack_kv([c.self_kv for c in caches], length), _stack_kv(cross, ctx), audio_mask, self_mask)

    def select(self, index: Tensor) -> KVCache:
        """Rows ``index`` of the batch (beam reordering, splitting a batch back into streams)."""
        pick = lambda kv: (kv[0].index_select(0, index), kv[1].index_select(0, index))  # noqa: E731
        shared = self.cross_kv[0][0].shape[0] == 1
        cross = self.cross_kv if shared else [pick(kv) for kv in self.cross_kv]
        audio_mask = self.audio_mask if self.audio_mask is None or shared else self.audio_mask.index_select(0, index)
        self_mask = None if self.self_mask is None else self.self_mask.index_select(0, index)
        return KVCache([pick(kv) for kv in self.self_kv], cross, audio_mask, self_mask)

    def trim(self, length: int) -> KVCache:
        """Keep only the first ``length`` decoded positions (e.g. the committed prefix)."""
        kept = [(k[:, :, :length], v[:, :, :length]) for k, v in self.self_kv] if length else []
        self_mask = None if self.self_mask is None or not length else self.self_mask[:, :length]
        return KVCache(kept, self.cross_kv, self.audio_mask, self_mask)

    def nbytes(self) -> int:
        tensors = [t for kv in self.self_kv + self.cross_kv for t in kv]
        return sum(t.numel() * t.element_size() for t in tensors)


def decode_padded(decoder: TextDecoder, sequences: list[list[int]], caches: list[KVCache],
                  **kwargs) -> tuple[Tensor, KVCache, Tensor | None]:
    """One ``decoder`` pass over token sequences of different lengths, each over its own audio (the
    cross-attention keys/values of ``caches``; their decoded positions are ignored). Sequences are padded at
    the end with their last token: causal attention keeps that padding out of every real position, so the
    first ``len(sequences[i])`` positions of row i are exactly its own. ``kwargs`` go to the decoder."""
    width = max(map(len, sequences))
    bases = [cache.trim(0) for cache in caches]
    device = bases[0].cross_kv[0][0].device
    tokens = torch.tensor([s + [s[-1]] * (width - len(s)) for s in sequences], device=device)
    return decoder(tokens, bases[0] if len(bases) == 1 else KVCache.stack(bases), **kwargs)


def _stack_kv(caches: list[list[tuple[Tensor, Tensor]]], length: int) -> list[tuple[Tensor, Tensor]]:
    """Per layer, the keys and values of every cache concatenated on the batch axis, zero-padded in time."""
    pad = lambda t: F.pad(t, (0, 0, 0, length - t.shape[2]))  # noqa: E731
    return [(torch.cat([pad(k) for k, _ in layer]), torch.cat([pad(v) for _, v in layer])) for layer in zip(*caches)]


def _stack_masks(masks: list[Tensor | None], lengths: list[int], rows: list[int], length: int,
                 device: torch.device) -> Tensor | None:
    """The batch's [rows, length] keep-mask (False on padding), or None when nothing is hidden."""
    if all(m is None and n == length for m, n in zip(masks, lengths)):
        return None
    full = [torch.ones(r, n, dtype=torch.bool, device=device) if m is None else m.expand(r, -1)
            for m, n, r in zip(masks, lengths, rows)]
    return torch.cat([F.pad(m, (0, length - m.shape[1]), value=False) for m in full])


def _row_bucket(rows: int) -> int:
    """``rows`` rounded up to one of four sizes per octave (exact up to 16): at most 25 % padding."""
    if rows <= 16:
        return rows
    step = 1 << (rows.bit_length() - 3)
    return -(-rows // step) * step


@dataclass(frozen=True)
class HalfStored:
    """A float32 weight stored in half precision for fbgemm's products, which widen it back to float32 and
    accumulate in float32 (see :func:`pack_weight`)."""

    params: torch.ScriptObject


Packed = Tensor | torch.ScriptObject | HalfStored


def pack_weight(weight: Tensor, bias: Tensor | None = None, int8: bool = False,
                half_stored: bool = False) -> Packed | None:
    """``weight`` [out, in] prepared once for the CPU's products, or None where nothing applies.

    ``int8``: quantized per output channel (symmetric) and prepacked for fbgemm's dynamically quantized
    products, ``bias`` included; activations are quantized per call. On CPUs without fast bfloat16 this is
    what makes the model cheaper than float32 (as CTranslate2's int8 does).

    ``half_stored`` (float32 weights): kept in half precision for fbgemm, whose products read half the
    memory and compute in float32. For the vocabulary projection, a product of one to five rows with an
    80 MB matrix at every token step, memory is the whole cost: on a 2-core AVX2 EPYC it takes 2.6 ms
    instead of 13 for one row and 3 instead of 26 for five. Only weights that float16 holds exactly (Whisper's
    checkpoints are published in float16) are half-stored, so the logits differ from float32's only in
    summation order; others stay float32.

    Else bfloat16 on CPU only: ``weight`` reordered into oneDNN's blocked layout, which oneDNN otherwise
    redoes on every call, making the decoder's one-row products (a token step) up to three times slower;
    the vocabulary projection alone reorders 40 MB per step.
    """
    if int8:
        w = weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-8).double()
        with warnings.catch_warnings():  # quantized tensors are deprecated in torch (pytorch#184982); pinned here
            warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
            q = torch.quantize_per_channel(w, scales, torch.zeros_like(scales, dtype=torch.long), 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(q, None if bias is None else bias.detach().float())
    if weight.device.type != "cpu":
        return None
    if weight.dtype == torch.float32:
        if not half_stored or "fbgemm" not in torch.backends.quantized.supported_engines:
            return None
        if not torch.equal(weight.detach().half().float(), weight.detach()):
            return None  # float16 would round these weights (e.g. dequantized int8 checkpoints): stay exact
        return HalfStored(torch.ops.quantized.linear_prepack_fp16(
            weight.detach(), None if bias is None else bias.detach()))
    if weight.dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, 1)
    except (AttributeError, RuntimeError):  # a torch build without these oneDNN ops
        return None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, packed: Packed | None = None,
           bucket: bool = True) -> Tensor:
    """``F.linear``, or its product with a ``packed`` weight (:func:`pack_weight`, for this ``weight`` and
    ``bias``): dynamically quantized (int8) or half-stored (float32). On CPU in half precision the rows are
    padded to a bucket size first (unless not ``bucket``), and ``packed`` skips oneDNN's per-call weight
    reorder.

    oneDNN, which runs those products, builds and caches a kernel (with its scratch memory) for every
    distinct shape: streaming windows of every length made memory grow by hundreds of MB. Bucketed
    shapes keep that cache small at the cost of a little padding.
    """
    if isinstance(packed, (torch.ScriptObject, HalfStored)) and x.dtype == torch.float32:
        flat = x.reshape(-1, x.shape[-1])
        if isinstance(packed, HalfStored):
            out = torch.ops.quantized.linear_dynamic_fp16(flat, packed.params)
        else:
            out = torch.ops.quantized.linear_dynamic(flat, packed, True)
        return out.reshape(*x.shape[:-1], weight.shape[0])
    if x.device.type != "cpu" or x.dtype == torch.float32 or not bucket:
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    flat, padding = x.reshape(rows, -1), _row_bucket(rows) - rows
    if padding:
        flat = F.pad(flat, (0, 0, 0, padding))
    if packed is not None and x.dtype == weight.dtype == torch.bfloat16:
        out = torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "")
    else:
        out = F.linear(flat, weight, bias)
    return out[:rows].reshape(*x.shape[:-1], weight.shape[0])


class PackedLinear(nn.Linear):
    """A linear layer whose weight can be prepared once for the CPU (:func:`pack_weight`). The encoder's
    need no row buckets: its callers bucket the audio context to whole seconds."""

    packed: Packed | None = None
    bucket = False

    def pack(self, int8: bool = False) -> None:
        """Prepare the weight (:func:`pack_weight`); call again after changing dtype."""
        self.packed = pack_weight(self.weight, self.bias, int8)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, self.packed, self.bucket)


class BucketedLinear(PackedLinear):
    """A linear layer for inputs of many row counts (the decoder's token sequences); see :func:`linear`."""

    bucket = True


class LayerNorm(nn.LayerNorm):
    """Normalises in float32 whatever the model's dtype (half precision loses too much here)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).type(x.dtype)


class MultiHeadAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int, linear_layer: type[PackedLinear] = PackedLinear):
        super().__init__()
        self.n_head = n_head
        self.query = linear_layer(n_state, n_state)
        self.key = linear_layer(n_state, n_state, bias=False)
        self.value = linear_layer(n_state, n_state)
        self.out = linear_layer(n_state, n_state)

    def heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_head, -1).transpose(1, 2)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.heads(self.key(x)), self.heads(self.value(x))

    def attend(
        self, x: Tensor, kv: tuple[Tensor, Tensor], mask: Tensor | None, causal_offset: int | None,
        want_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attention of queries from ``x`` over ``kv``. ``causal_offset`` is the number of cached
        positions before ``x`` (None: no causal mask). Returns output and, if asked, the weights."""
        q = self.heads(self.query(x))
        k, v = kv
        if k.shape[0] == 1 < q.shape[0] and causal_offset is None and not want_weights and (
                mask is None or mask.shape[0] == mask.shape[-2] == 1) and q.dtype == torch.float32:
            # One audio shared by several rows (the beams): their queries attend as one sequence, so the
            # keys and values are read once, in one product, instead of once per row (a fifth of a float32
            # beam-5 decode's time on a 2-core AVX2 CPU). Not in half precision, whose kernels round the
            # folded product differently: beam choices flip.
            b, h, t, d = q.shape
            out = F.scaled_dot_product_attention(q.transpose(0, 1).reshape(1, h, b * t, d), k, v, attn_mask=mask)
            return self.out(out.reshape(h, b, t, d).permute(1, 2, 0, 3).reshape(b, t, h * d)), None
        if k.shape[0] != q.shape[0]:  # one audio shared by several rows
            k, v = k.expand(q.shape[0], -1, -1, -1), v.expand(q.shape[0], -1, -1, -1)
        t_q, t_k = q.shape[2], k.shape[2]
        if causal_offset is not None and t_q > 1:
            causal = torch.ones(t_q, t_k, dtype=torch.bool, device=x.device).tril(causal_offset)
            mask = causal if mask is None else mask & causal
        if want_weights:  # in float32: few rows, and no per-shape oneDNN kernels in half precision
            scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = scores.softmax(dim=-1)
            out = (weights @ v.float()).to(q.dtype)
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        b, h, t, d = out.shape
        return self.out(out.transpose(1, 2).reshape(b, t, h * d)), weights


class EncoderBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head)
        self.attn_ln = LayerNorm(n_state)
        self.mlp = nn.Sequential(PackedLinear(n_state, 4 * n_state), nn.GELU(), PackedLinear(4 * n_state, n_state))
        self.mlp_ln = LayerNorm(n_state)

    def forward(self, x: Tensor) -> Tensor:
        h = self.attn_ln(x)
        x = x + self.attn.attend(h, self.attn.project_kv(h), None, None)[0]
        return x + self.mlp(self.mlp_ln(x))


class DecoderBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head, BucketedLinear)
        self.attn_ln = LayerNorm(n_state)
        self.cross_attn = MultiHeadAttention(n_state, n_head, BucketedLinear)
        self.cross_attn_ln = LayerNorm(n_state)
        self.mlp = nn.Sequential(BucketedLinear(n_state, 4 * n_state), nn.GELU(), BucketedLinear(4 * n_state, n_state))
        self.mlp_ln = LayerNorm(n_state)


class AudioEncoder(nn.Module):
    def __init__(self, dims: ModelDims):
        super().__init__()
        self.conv1 = nn.Conv1d(dims.n_mels, dims.n_audio_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(dims.n_audio_state, dims.n_audio_state, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(dims.n_audio_ctx, dims.n_audio_state))
        self.blocks = nn.ModuleList(EncoderBlock(dims.n_audio_state, dims.n_audio_head)
                                    for _ in range(dims.n_audio_layer))
        self.ln_post = LayerNorm(dims.n_audio_state)

    def forward(self, mel: Tensor) -> Tensor:
        """mel [batch, n_mels, frames] with frames <= 3000 (fewer = a shorter audio context)."""
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        if x.shape[1] > self.positional_embedding.shape[0]:
            raise ValueError(f"audio of {mel.shape[-1]} mel frames is longer than the model's 30 s window")
        x = x + self.positional_embedding[: x.shape[1]].to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)


class TextDecoder(nn.Module):
    def __init__(self, dims: ModelDims):
        super().__init__()
        self.token_embedding = nn.Embedding(dims.n_vocab, dims.n_text_state)
        self.positional_embedding = nn.Parameter(torch.empty(dims.n_text_ctx, dims.n_text_state))
        self.blocks = nn.ModuleList(DecoderBlock(dims.n_text_state, dims.n_text_head)
                                    for _ in range(dims.n_text_layer))
        self.ln = LayerNorm(dims.n_text_state)
        self.packed_logits: Packed | None = None  # the vocabulary projection's weight, see :meth:`pack`

    def pack(self, int8: bool = False) -> None:
        """Prepare the weights of the token-by-token products once for the CPU (:func:`pack_weight`: int8,
        bfloat16's layout, or in float32 the vocabulary projection half-stored). Call again after moving the
        model to another dtype or device."""
        for module in self.modules():
            if isinstance(module, BucketedLinear):
                module.pack(int8)
        self.packed_logits = pack_weight(self.token_embedding.weight, int8=int8, half_stored=True)

    def new_cache(self, audio_features: Tensor, audio_mask: Tensor | None = None) -> KVCache:
        """An empty cache whose cross-attention keys/values are computed once from ``audio_features``."""
        cross = [block.cross_attn.project_kv(audio_features) for block in self.blocks]
        return KVCache([], cross, audio_mask)

    def forward(
        self, tokens: Tensor, cache: KVCache, alignment_heads: list[tuple[int, int]] | None = None,
        logits_at: slice | list[int] | Tensor | None = None,
    ) -> tuple[Tensor, KVCache, Tensor | None]:
        """Logits [batch, new_tokens, vocab] for ``tokens`` that follow the cached positions.

        Returns the logits, the extended cache and, when ``alignment_heads`` is given, the cross-attention
        weights of those heads, [batch, n_heads_selected, new_tokens, audio_ctx]. ``logits_at`` picks the new
        positions that get logits (the vocabulary projection dominates the cost of a long prompt): the same
        for every row, or a [batch, k] tensor of positions per row.
        """
        offset, n = cache.length, tokens.shape[1]
        self_mask, key_mask = cache.self_mask, None
        if self_mask is None:
            positions = self.positional_embedding[offset: offset + n]
        else:  # rows of different lengths: each continues at its own position, padding is hidden
            start = self_mask.sum(-1, keepdim=True)
            positions = self.positional_embedding[start + torch.arange(n, device=tokens.device)]
            self_mask = torch.cat([self_mask, self_mask.new_ones(tokens.shape[0], n)], dim=1)
            key_mask = self_mask[:, None, None, :]
        x = (self.token_embedding(tokens) + positions).to(cache.cross_kv[0][0].dtype)
        cross_mask = None if cache.audio_mask is None else cache.audio_mask[:, None, None, :]
        wanted: dict[int, list[int]] = {}
        for layer, head in alignment_heads or []:
            wanted.setdefault(layer, []).append(head)
        new_self, weights = [], []
        for i, block in enumerate(self.blocks):
            h = block.attn_ln(x)
            k, v = block.attn.project_kv(h)
            if offset:
                k = torch.cat([cache.self_kv[i][0], k], dim=2)
                v = torch.cat([cache.self_kv[i][1], v], dim=2)
            new_self.append((k, v))
            x = x + block.attn.attend(h, (k, v), key_mask, offset)[0]
            out, w = block.cross_attn.attend(block.cross_attn_ln(x), cache.cross_kv[i], cross_mask, None,
                                             want_weights=i in wanted)
            x = x + out
            if w is not None:
                weights.append(w[:, wanted[i]])
            x = x + block.mlp(block.mlp_ln(x))
        if isinstance(logits_at, Tensor):
            x = x.gather(1, logits_at[..., None].expand(-1, -1, x.shape[-1]))
        elif logits_at is not None:
            x = x[:, logits_at]
        x = self.ln(x)
        logits = linear(x, self.token_embedding.weight.to(x.dtype), packed=self.packed_logits).float()
        aligned = torch.cat(weights, dim=1) if weights else None
        return logits, KVCache(new_self, cache.cross_kv, cache.audio_mask, self_mask), aligned


class Whisper(nn.Module):
    def __init__(self, dims: ModelDims, alignment_heads: list[tuple[int, int]] | None = None):
        super().__init__()
        self.dims = dims
        self.encoder = AudioEncoder(dims)
        self.decoder = TextDecoder(dims)
        if alignment_heads is None:
            half = dims.n_text_layer // 2
            alignment_heads = [(layer, head) for layer in range(half, dims.n_text_layer)
                               for head in range(dims.n_text_head)]
        self.alignment_heads = [(int(layer), int(head)) for layer, head in alignment_heads]
        self.int8 = False

    def pack(self, int8: bool = False) -> None:
        """Prepare the weights for the CPU (:func:`pack_weight`); with ``int8`` (float32 weights on CPU only)
        every linear product, the encoder's and the vocabulary projection included, runs dynamically
        quantized to int8."""
        if int8 and (self.device.type != "cpu" or self.dtype != torch.float32):
            raise ValueError("int8 runs on the CPU from float32 weights; use --device cpu")
        self.int8 = int8
        self.decoder.pack(int8)
        for module in self.encoder.modules():
            if isinstance(module, PackedLinear):
                module.packed = pack_weight(module.weight, module.bias, int8=True) if int8 else None

    @property
    def is_multilingual(self) -> bool:
        return self.dims.n_vocab >= MULTILINGUAL_VOCAB

    @property
    def device(self) -> torch.device:
        return self.decoder.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.token_embedding.weight.dtype

    @torch.inference_mode()
    def encode(self, mel: Tensor) -> Tensor:
        """Audio features [batch, frames // 2, n_audio_state] for mel [batch, n_mels, frames]."""
        return self.encoder(mel.to(self.device, self.dtype))
