"""Segmentation against the reference clip timings: does the detector end utterances where speakers pause,
never inside a clip, and keep every clip's audio?

No model runs, so this takes seconds. For each stream: the share of pauses between clips where an utterance
ends (``pause ends``), utterances that end inside a clip (``cuts``), clip audio outside every utterance
(``missed``), the longest utterance, and on ``noise_only`` the seconds passed on as speech.

Usage: python benchmarks/vad_eval.py [--streams en_prompts en_continuous en_prompts_noisy noise_only PATH.json]
       [--vad FIELD=VALUE ...]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
from evalkit import load_stream

from streaming.core.vad import SAMPLE_RATE, SpeechAudio, SpeechEnd, VadConfig, VoiceActivityDetector

EDGE = 0.1  # seconds: an end this close to a clip's edge is at the pause, not inside the clip


def segment(audio: np.ndarray, config: VadConfig) -> tuple[list[float], np.ndarray]:
    """Utterance end times (s) and a per-sample mask of the audio passed on as speech."""
    vad, ends, kept = VoiceActivityDetector(config), [], np.zeros(len(audio), bool)
    events = []
    for pos in range(0, len(audio), 320):
        events += vad.feed(audio[pos: pos + 320])
    for ev in events + vad.flush():
        if isinstance(ev, SpeechAudio):
            kept[ev.start_sample: ev.end_sample] = True
        elif isinstance(ev, SpeechEnd):
            ends.append(ev.sample / SAMPLE_RATE)
    return ends, kept


def evaluate(name: str, config: VadConfig) -> dict:
    audio, ref = load_stream(name)
    ends, kept = segment(audio, config)
    clips = ref["segments"]
    if not clips:
        return {"stream": Path(name).stem, "speech_s": round(kept.sum() / SAMPLE_RATE, 2), "utterances": len(ends)}
    pauses = list(zip(clips, clips[1:]))
    ended = sum(any(a["end"] - EDGE <= t <= b["start"] + EDGE for t in ends) for a, b in pauses)
    cuts = sum(any(c["start"] + EDGE < t < c["end"] - EDGE for t in ends) for c in clips)
    total = missed = 0
    for c in clips:
        span = kept[round(c["start"] * SAMPLE_RATE): round(c["end"] * SAMPLE_RATE)]
        total, missed = total + span.size, missed + (~span).sum()
    starts = [0.0] + ends[:-1]
    return {"stream": Path(name).stem, "pause_ends_pct": round(100 * ended / max(1, len(pauses)), 1),
            "cuts": cuts, "missed_pct": round(100 * missed / total, 2), "utterances": len(ends),
            "longest_s": round(max((e - s for s, e in zip(starts, ends)), default=0.0), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", nargs="+",
                        default=["en_prompts", "en_mixed", "en_continuous", "en_prompts_noisy", "noise_only"])
    parser.add_argument("--vad", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="detector settings to change, e.g. noise_margin_db=0")
    args = parser.parse_args()
    types = {f.name: f.type for f in dataclasses.fields(VadConfig)}
    changes = {k: (int if types[k] == "int" else float)(v) for k, v in (item.split("=", 1) for item in args.vad)}
    config = VadConfig(**changes)
    print(f"VadConfig: {dataclasses.asdict(config)}")
    for name in args.streams:
        print(evaluate(name, config))


if __name__ == "__main__":
    main()
