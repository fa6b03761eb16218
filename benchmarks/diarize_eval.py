"""Speaker labels on a stream with several voices (en_meeting): plays it through the recogniser with
``diarize`` off and on, and reports

- the share of correctly recognised words that carry the right speaker label, after the best one-to-one
  mapping of labels to the reference's speakers (a word whose label maps to no speaker counts as wrong);
- the number of labels against the number of true speakers;
- WER and final-word latency (p50, p90) with and without labels;
- the CPU seconds of the speaker embeddings per second of audio, and the wall-clock time of each embedding
  request (p50 and max: a final waits for at most one).

``--speed 0`` (default) plays as fast as possible and stamps events with the audio time fed so far, so
latency there counts no computation; ``--speed 1`` plays in real time on the wall clock (see stream_eval.py).

Two more modes need no Whisper model:

- ``--similarities``: the measurements behind the thresholds of streaming/core/speakers.py: the cosine of a
  piece of speech to the centroid of other pieces of the same voice and of other voices, on the en_mixed
  clips (8 voices) and 30 en_prompts clips (one voice), and the threshold with the fewest errors;
- ``--labels-only STREAM ...``: speaker labels alone (the VAD, the tracker and the encoder) on whole eval
  streams, as seconds of each reference voice per label.

Usage: python benchmarks/diarize_eval.py [--stream en_meeting] [--speed 0] [--model tiny.en] [--threads 1]
                                         [--repeats 1]
       python benchmarks/diarize_eval.py --similarities
       python benchmarks/diarize_eval.py --labels-only en_meeting en_mixed en_prompts en_continuous
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
from pathlib import Path

import numpy as np
from evalkit import ROOT, load_stream, machine, scorer
from stream_eval import play

from streaming.core.agreement import Word
from streaming.core.messages import EmbedReply
from streaming.core.speakers import SpeakerTracker
from streaming.core.stream import StreamOptions
from streaming.core.vad import SAMPLE_RATE, SpeechAudio, SpeechEnd, VadConfig, VoiceActivityDetector
from streaming.engine import Engine, configure_threads
from streaming.engine.speaker import SpeakerEncoder


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


def voice_of(segment: dict) -> str:
    """A reference clip's voice: its ``speaker`` letter, else where it was recorded (the Asterisk prompts are
    one voice, the folder named after it; the ALSA channel names another), else the clip itself."""
    if "speaker" in segment:
        return segment["speaker"]
    parts = segment["source"].split("/")
    voice = next((p for p in parts if p.startswith("en_US_")), None)
    return voice or ("alsa" if "alsa-utils" in parts[0] else parts[-1].split()[0])


def clips(name: str, limit: int | None = None) -> list[tuple[str, np.ndarray]]:
    audio, reference = load_stream(name)
    return [(voice_of(s), audio[round(s["start"] * SAMPLE_RATE): round(s["end"] * SAMPLE_RATE)])
            for s in reference["segments"][:limit]]


def similarities(encoder: SpeakerEncoder) -> None:
    """Cosine of pieces to centroids of the same voice and of other voices, and the best threshold."""
    voices = clips("en_mixed") + clips("en_prompts", 30)
    rng = np.random.default_rng(0)

    def pieces(seconds: float) -> tuple[np.ndarray, np.ndarray]:
        n = round(seconds * SAMPLE_RATE)
        cut = [(v, c[k: k + n]) for v, c in voices for k in range(0, c.size - n + 1, n)]
        return np.array([v for v, _ in cut]), encoder.embed([c for _, c in cut])

    def report(what: str, same: list[float], other: list[float]) -> None:
        same_a, other_a = np.array(same), np.array(other)
        errors, threshold = min(((np.mean(same_a < t) + np.mean(other_a >= t)) / 2, t)
                                for t in np.arange(0.40, 0.95, 0.01))
        q = lambda x: " ".join(f"{v:.2f}" for v in np.percentile(x, [5, 50, 95]))  # noqa: E731
        print(f"{what:<44} same {q(same_a)}  other {q(other_a)}  fewest errors {100 * errors:4.1f} % at "
              f"{threshold:.2f}")

    print("cosine, 5th / 50th / 95th percentile; en_mixed clips and 30 en_prompts clips")
    for seconds in (0.5, 1.0, 1.6, 3.0):
        voice, vectors = pieces(seconds)
        same, other = [], []
        for i in range(len(voice)):
            for v in set(voice):
                members = [j for j in np.flatnonzero(voice == v) if j != i][:6]
                if members:
                    centroid = vectors[members].sum(0)
                    (same if v == voice[i] else other).append(float(vectors[i] @ centroid / np.linalg.norm(centroid)))
        report(f"{seconds} s piece, centroid of up to 6 others", same, other)
    voice, vectors = pieces(1.2)
    base_voice, base = pieces(1.0)
    for k in (1, 2, 3, 6):
        same, other = [], []
        for i in range(len(voice)):
            for v in set(base_voice):
                members = np.flatnonzero(base_voice == v)
                if len(members) >= k:
                    centroid = base[rng.choice(members, k, replace=False)].sum(0)
                    (same if v == voice[i] else other).append(float(vectors[i] @ centroid / np.linalg.norm(centroid)))
        report(f"1.2 s piece, centroid of {k} x 1 s", same, other)


def labels_only(encoder: SpeakerEncoder, name: str) -> None:
    """Speaker labels of a whole stream without transcribing it: seconds of each reference voice per label."""
    audio, reference = load_stream(name)
    config = VadConfig()
    vad, tracker = VoiceActivityDetector(config), SpeakerTracker(config)
    frame = config.frame_ms * SAMPLE_RATE // 1000
    for start in range(0, audio.size + frame, frame):
        for event in vad.feed(audio[start: start + frame]) if start < audio.size else vad.flush():
            if isinstance(event, SpeechAudio):
                tracker.feed(event.start_sample, event.audio, vad.noise_floor_dbfs)
            elif isinstance(event, SpeechEnd):
                tracker.end_utterance()
        while (request := tracker.next_request()) is not None:
            tracker.complete(request, EmbedReply(encoder.embed(list(request.clips))))
    seconds: collections.Counter = collections.Counter()
    for segment in reference["segments"]:  # each clip in steps of 0.1 s, labelled as words there would be
        steps = np.arange(segment["start"], segment["end"], 0.1)
        for step, label in zip(steps, tracker.labels([Word("", t, t + 0.1, 1.0) for t in steps]) or []):
            seconds[(voice_of(segment), label)] += min(0.1, segment["end"] - step)
    found = sorted({label for _, label in seconds})
    print(f"{name}: {len({v for v, _ in seconds})} voices, {len(found)} labels; seconds of each voice per label")
    for voice in sorted({v for v, _ in seconds}):
        print(f"  {voice:<24}", "  ".join(f"{label}: {seconds[(voice, label)]:5.1f}" for label in found
                                          if seconds[(voice, label)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stream", default="en_meeting")
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--dtype", default="auto", help="auto (what serve uses), float32, bfloat16 or float16")
    parser.add_argument("--speed", type=float, default=0.0, help="0 = as fast as possible (default); 1 = real time")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1,
                        help="alternate off and on this many times and add the medians (real time on a busy machine)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    parser.add_argument("--similarities", action="store_true", help="measure the cosine distributions only")
    parser.add_argument("--labels-only", nargs="+", metavar="STREAM", help="label these streams' voices only")
    args = parser.parse_args()
    configure_threads(args.threads)
    if args.similarities or args.labels_only:
        encoder = SpeakerEncoder.load()
        if args.similarities:
            similarities(encoder)
        for name in args.labels_only or ():
            labels_only(encoder, name)
        return
    engine = Engine.load(args.model, dtype=args.dtype)
    audio, reference = load_stream(args.stream)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = Path(args.stream).stem
    print(f"# speaker labels, {name}, {args.model} {engine.dtype_name}, speed {args.speed or 'max'}, "
          f"{args.threads} thread(s), {machine()}")
    print(f"{'diarize':<8} {'WER %':>6} {'p50 s':>6} {'p90 s':>6} {'right labels %':>15} {'labels/true':>12} "
          f"{'embed cpu s/audio s':>20} {'requests':>9} {'ms p50/max':>11}")
    latencies: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for diarize in [False, True] * args.repeats:
        log, stats = play(engine, audio, StreamOptions(language=reference.get("language"), diarize=diarize),
                          args.speed)
        (out / f"{name}{'_diarize' if diarize else ''}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
        result = scorer().score(reference, log)
        latencies[diarize].append((result["latency_p50"], result["latency_p90"]))
        labels = "-" * 15, "-" * 12, "-" * 20, "-" * 9, "-" * 11
        if diarize:
            accuracy, wall = speaker_accuracy(reference, log), stats["embed_wall_seconds"]
            labels = (f"{100 * accuracy['right']:15.1f}", f"{accuracy['labels']:>5}/{accuracy['speakers']:<6}",
                      f"{stats['embed_cpu_seconds'] / stats['audio_seconds']:20.4f}", f"{len(wall):9}",
                      f"{1000 * np.median(wall):5.0f}/{1000 * max(wall):<5.0f}")
        print(f"{'on' if diarize else 'off':<8} {100 * result['wer']:6.2f} {result['latency_p50']:6.2f} "
              f"{result['latency_p90']:6.2f} {labels[0]} {labels[1]:>12} {labels[2]} {labels[3]} {labels[4]:>11}",
              flush=True)
    if args.repeats > 1:
        for diarize, runs in latencies.items():
            p50, p90 = np.median(runs, axis=0)
            print(f"{'on' if diarize else 'off':<8} median of {args.repeats} runs: p50 {p50:.2f} s, p90 {p90:.2f} s")


if __name__ == "__main__":
    main()
