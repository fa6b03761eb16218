"""Speaker labels on a stream with several voices (en_meeting): plays it through the recogniser with
``diarize`` off and on, and reports

- the share of correctly recognised words that carry the right speaker label, after the best one-to-one
  mapping of labels to the reference's speakers (a word whose label maps to no speaker counts as wrong);
- the number of labels against the number of true speakers;
- WER and final-word latency (p50, p90) with and without labels;
- the CPU seconds of the speaker embeddings per second of audio.

``--speed 0`` (default) plays as fast as possible and stamps events with the audio time fed so far, so
latency there counts no computation; ``--speed 1`` plays in real time on the wall clock (see stream_eval.py).

Usage: python benchmarks/diarize_eval.py [--stream en_meeting] [--speed 0] [--model tiny.en] [--threads 1]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
from evalkit import ROOT, load_stream, machine, scorer
from stream_eval import play

from streaming.core.stream import StreamOptions
from streaming.engine import Engine, configure_threads


def best_mapping(counts: np.ndarray) -> tuple[int, dict[int, int]]:
    """The one-to-one mapping of rows (labels) to columns (speakers) with the largest total count, by brute
    force (a handful of each), as (total, {row: column})."""
    rows, cols = counts.shape
    best: tuple[int, dict[int, int]] = (0, {})
    if rows <= cols:
        for chosen in itertools.permutations(range(cols), rows):
            total = sum(int(counts[r, c]) for r, c in enumerate(chosen))
            if total > best[0]:
                best = (total, dict(enumerate(chosen)))
    else:
        for chosen in itertools.permutations(range(rows), cols):
            total = sum(int(counts[r, c]) for c, r in enumerate(chosen))
            if total > best[0]:
                best = (total, {r: c for c, r in enumerate(chosen)})
    return best


def speaker_accuracy(reference: dict, log: list[dict]) -> dict:
    """Right labels among the correctly recognised words (aligned with the reference scorer's rules)."""
    score = scorer()
    lang = reference.get("language", "en")
    ref, truth = [], []
    for segment in reference["segments"]:
        words = score.normalize(segment["text"], lang)
        ref += words
        truth += [segment["speaker"]] * len(words)
    hyp, labels = [], []
    for event in log:
        if event["type"] == "final":
            for word in event["words"]:
                tokens = score.normalize(word["word"], lang)
                hyp += tokens
                labels += [word["speaker"]] * len(tokens)
    _, pairs = score.align(ref, hyp)
    correct = [(labels[j], truth[i]) for i, j in pairs if i is not None and j is not None and ref[i] == hyp[j]]
    speakers, found = sorted(set(truth)), sorted(set(labels))
    counts = np.zeros((len(found), len(speakers)), int)
    for label, speaker in correct:
        counts[found.index(label), speakers.index(speaker)] += 1
    right, mapping = best_mapping(counts)
    return {"right": right / max(len(correct), 1), "correct_words": len(correct), "labels": len(found),
            "speakers": len(speakers),
            "mapping": {found[r]: speakers[c] for r, c in mapping.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stream", default="en_meeting")
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--dtype", default="auto", help="auto (what serve uses), float32, bfloat16 or float16")
    parser.add_argument("--speed", type=float, default=0.0, help="0 = as fast as possible (default); 1 = real time")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    args = parser.parse_args()
    configure_threads(args.threads)
    engine = Engine.load(args.model, dtype=args.dtype)
    audio, reference = load_stream(args.stream)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = Path(args.stream).stem
    print(f"# speaker labels, {name}, {args.model} {engine.dtype_name}, speed {args.speed or 'max'}, "
          f"{args.threads} thread(s), {machine()}")
    print(f"{'diarize':<8} {'WER %':>6} {'p50 s':>6} {'p90 s':>6} {'right labels %':>15} {'labels/true':>12} "
          f"{'embed cpu s/audio s':>20}")
    for diarize in (False, True):
        log, stats = play(engine, audio, StreamOptions(language=reference.get("language"), diarize=diarize),
                          args.speed)
        (out / f"{name}{'_diarize' if diarize else ''}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
        result = scorer().score(reference, log)
        labels = "-" * 15, "-" * 12, "-" * 20
        if diarize:
            accuracy = speaker_accuracy(reference, log)
            labels = (f"{100 * accuracy['right']:15.1f}", f"{accuracy['labels']:>5}/{accuracy['speakers']:<6}",
                      f"{stats['embed_cpu_seconds'] / stats['audio_seconds']:20.4f}")
        print(f"{'on' if diarize else 'off':<8} {100 * result['wer']:6.2f} {result['latency_p50']:6.2f} "
              f"{result['latency_p90']:6.2f} {labels[0]} {labels[1]:>12} {labels[2]}", flush=True)


if __name__ == "__main__":
    main()
