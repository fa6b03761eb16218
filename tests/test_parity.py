"""Parity with faster-whisper (benchmarks/parity.py) on 20 s of en_prompts, tiny.en, greedy: every divergence of
our offline transcription from faster-whisper's must have a cause explained below."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = [pytest.mark.real_model, pytest.mark.usefixtures("one_thread")]

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
EXPLAINED = {
    # Our short last window is padded with the spectrogram's floor (the silence after the audio, as Whisper was
    # trained); faster-whisper, like openai/whisper's transcribe, pads the normalised mel with zeros.
    "mel_padding": "short-window padding",
    # Float differences between two correct float32 implementations.
    "mel": "front-end float noise",
    "encoder_numerics": "encoder float noise",
    "near_tie": "decoder float noise",
    "timestamp_rule_tie": "float noise at the timestamp-mass rule",
    # Our own long-form rules (streaming/transcribe.py): speech after text that ended early is decoded, an open
    # end is anchored at its last word, digital silence is not decoded.
    "seek_rest": "rest of a window decoded",
    "seek_anchor": "open end anchored",
    "skip_silence": "digital silence skipped",
}


def require(ok: bool, reason: str) -> None:
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the parity check: {reason}")
        pytest.skip(reason)


def load_parity() -> ModuleType:
    if str(BENCHMARKS) not in sys.path:  # parity.py imports evalkit from beside it, as when run as a script
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("parity", BENCHMARKS / "parity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["parity"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_divergences_from_faster_whisper_are_explained() -> None:
    require(importlib.util.find_spec("faster_whisper") is not None, "faster-whisper is not installed (pip install "
            "-e '.[bench]')")
    parity = load_parity()
    streams = sys.modules["evalkit"].STREAMS  # where parity.py reads the eval streams
    require(streams.is_dir(), f"evaluation data not found at {streams} (needs ../shared or WHISPER_STREAM_EVAL)")
    engine, fw = parity.load_engines("tiny.en", threads=1)
    report = parity.run(engine, fw, "en_prompts", start=0.0, seconds=20.0, beam=1)
    assert report.mel_max_diff_interior < 1e-3, report.mel_max_diff_interior
    assert report.encoder_diff_same_mel[1] < 1e-3, report.encoder_diff_same_mel
    assert report.compared == report.fw_windows >= 1
    unexplained = [d for d in report.divergences if d.cause not in EXPLAINED]
    assert not unexplained, "\n".join(f"window {d.window} (seek {d.seek}) {d.cause}: {d.detail}" for d in unexplained)
