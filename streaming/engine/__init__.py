"""The Whisper engine in PyTorch: model, weights, tokenizer, log-mel, decoding, alignment, window inference,
offline transcription and the embeddable recogniser. The core reaches it only through
:mod:`streaming.core.messages`."""

from .engine import Engine, configure_threads

__all__ = ["Engine", "configure_threads"]
