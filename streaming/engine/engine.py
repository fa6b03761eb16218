"""The inference engine: one loaded model with its tokenizer and front end, shared by every stream."""

from __future__ import annotations

import os
import threading
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from .mel import N_FRAMES, log_mel_spectrogram
from .model import Whisper
from .speaker import SpeakerEncoder
from .tokenizer import Tokenizer, load_tokenizer
from .weights import choose_device, load_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.float32}


def fast_cpu_dtype() -> str:
    """``bfloat16`` when this CPU multiplies bfloat16 natively (AMX or AVX-512 BF16: 1.5 to 2.5x faster
    than float32 for Whisper, same transcripts on the eval streams), else ``float32``."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "float32"
    return "bfloat16" if {"amx_bf16", "avx512_bf16"} & set(flags) else "float32"


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads deliberately (default: the CPU count, at most 4).

    Oversubscribed OpenMP threads on a busy machine make the many small kernels of decoding far slower.
    """
    threads = threads or min(os.cpu_count() or 1, 4)
    torch.set_num_threads(threads)
    return threads


class Engine:
    """A Whisper model ready for inference: ``Engine.load("tiny.en")``."""

    def __init__(self, model: Whisper, tokenizer: Tokenizer, name: str = "custom"):
        self.model = model
        self.name = name
        self._tokenizer = tokenizer
        self._speakers: SpeakerEncoder | None = None
        self._speakers_lock = threading.Lock()

    @classmethod
    def load(cls, name_or_path: str = "tiny.en", device: str | None = None, dtype: str | None = None) -> Engine:
        """``dtype``: float32, bfloat16, float16 or int8 (CPU only: float32 weights, products quantized per
        call; default: float32 on CPU, float16 on CUDA); ``auto`` is the default on CUDA and
        :func:`fast_cpu_dtype` on CPU."""
        chosen = choose_device(device)
        if dtype == "auto":
            dtype = None if chosen.type == "cuda" else fast_cpu_dtype()
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        loaded = load_model(name_or_path, device=chosen, dtype=DTYPES[dtype] if dtype else None,
                            int8=dtype == "int8")
        tokenizer = load_tokenizer(loaded.vocab_source, multilingual=loaded.model.is_multilingual)
        return cls(loaded.model, tokenizer, loaded.name)

    @property
    def multilingual(self) -> bool:
        return self.model.is_multilingual

    @property
    def n_mels(self) -> int:
        return self.model.dims.n_mels

    @property
    def dtype_name(self) -> str:
        """The precision as its flag spells it: "float32", "bfloat16", "float16" or "int8"."""
        return "int8" if self.model.int8 else str(self.model.dtype).removeprefix("torch.")

    @lru_cache(maxsize=256)  # noqa: B019 - engines live as long as the process
    def tokenizer(self, language: str | None = None, task: str = "transcribe") -> Tokenizer:
        """The tokenizer for a language and task (English-only models ignore both)."""
        if not self.multilingual:
            return self._tokenizer
        return self._tokenizer.with_options(language=language, task=task)

    @property
    def speakers(self) -> SpeakerEncoder:
        """The speaker encoder, loaded on first use (float32, on the model's device); raises
        :class:`streaming.engine.speaker.SpeakerModelMissing` naming the install command when it is missing."""
        with self._speakers_lock:
            if self._speakers is None:
                self._speakers = SpeakerEncoder.load(device=self.model.device)
            return self._speakers

    def mel(self, audio: np.ndarray | Tensor, padding: int = 0) -> Tensor:
        """Log-mel spectrogram [n_mels, frames] on the model's device."""
        return log_mel_spectrogram(audio, self.n_mels, padding=padding, device=self.model.device)

    def encode(self, mel: Tensor, full_window: bool = False) -> Tensor:
        """Audio features for mel [n_mels, frames] (or a batch). ``full_window`` pads to 30 s as Whisper
        was trained (padding with the spectrogram's floor, i.e. silence); otherwise only the frames given are
        encoded (a shorter audio context)."""
        if mel.dim() == 2:
            mel = mel.unsqueeze(0)
        frames = mel.shape[-1]
        target = N_FRAMES if full_window else frames + frames % 2
        if frames < target:
            mel = torch.nn.functional.pad(mel, (0, target - frames), value=float(mel.min()))
        return self.model.encode(mel[..., :N_FRAMES])
