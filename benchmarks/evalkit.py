"""Shared helpers for benchmarks: the eval streams in ../shared/eval and its reference scorer."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import sys
import wave
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# Benchmarks run the package of their own checkout, not the one pip installed in editable mode: a second
# checkout of an older commit, run for an old-against-new comparison, would otherwise measure today's code.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
EVAL = Path(os.environ.get("WHISPER_STREAM_EVAL", ROOT.parent / "shared" / "eval"))
STREAMS = EVAL / "streams"


def require_eval() -> None:
    if not STREAMS.is_dir():
        sys.exit(f"eval data not found at {STREAMS}: put ../shared beside the project "
                 "or set WHISPER_STREAM_EVAL to the eval directory")


def stream_path(name: str) -> Path:
    """An eval stream's description: a name in ../shared/eval/streams, or the path of a NAME.json built
    elsewhere in the same format (the held-out streams of ``heldout.py``)."""
    if name.endswith(".json"):
        return Path(name)
    require_eval()
    return STREAMS / f"{name}.json"


def load_stream(name: str) -> tuple[np.ndarray, dict]:
    """Audio (16 kHz mono float32) and the reference description of an eval stream."""
    path = stream_path(name)
    with wave.open(str(path.with_suffix(".wav"))) as w:
        audio = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
    return audio, json.loads(path.read_text())


def scorer():
    """The reference scoring module (../shared/eval/score.py), imported from where it lies."""
    spec = importlib.util.spec_from_file_location("eval_score", EVAL / "score.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def score_text(reference: dict, text: str) -> dict:
    return scorer().score(reference, [{"t": 0.0, "type": "final", "text": text}])


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def child_pids(pid: int) -> list[int]:
    """The child processes of ``pid`` (from /proc/PID/task/TID/children; empty once it has exited)."""
    children: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for tid in tids:
        try:
            children += [int(child) for child in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            pass
    return children


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (/proc/PID/stat utime, stime; 0 once it has exited)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
