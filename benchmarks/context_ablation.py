"""Per-clip decoding of an eval stream under different audio contexts, prompts and beam sizes.

Each reference clip (its audio, 0.2 s before to 0.3 s after) is decoded once, with the previous clips'
text as prompt when asked. Shows how much audio context Whisper needs before a previous-text prompt helps
instead of being copied.

Usage: python benchmarks/context_ablation.py [--stream en_prompts] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import time

from evalkit import load_stream, machine, score_text

from streaming.engine import Engine, configure_threads
from streaming.engine.decoding import DecodingOptions, decode_with_fallback
from streaming.engine.mel import N_FRAMES, N_SAMPLES

CONFIGS = [  # (silence after the clip in seconds, or None for Whisper's full 30 s window; beam; prompt)
    (4, 1, False), (4, 1, True), (8, 1, True), (26, 1, True), (None, 1, False), (None, 1, True), (None, 5, True),
]


def run(engine: Engine, audio, reference: dict, pad: float | None, beam: int, prompt: bool) -> tuple[float, float]:
    tokenizer = engine.tokenizer()
    texts, history = [], []
    started = time.perf_counter()
    for seg in reference["segments"]:
        clip = audio[int((seg["start"] - 0.2) * 16000): int((seg["end"] + 0.3) * 16000)]
        if pad is None:
            mel = engine.mel(clip, padding=N_SAMPLES)[:, :N_FRAMES]
        else:
            mel = engine.mel(clip, padding=math.ceil(len(clip) / 16000 + pad) * 16000 - len(clip))
        options = DecodingOptions(beam_size=beam, without_timestamps=True,
                                  prompt=tuple(history[-96:]) if prompt else ())
        result = decode_with_fallback(engine.model, tokenizer, engine.encode(mel), options)
        texts.append(result.text)
        history += result.tokens
    return score_text(reference, " ".join(texts))["wer"], time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stream", default="en_prompts")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    configure_threads(args.threads)
    engine = Engine.load("tiny.en")
    audio, reference = load_stream(args.stream)
    print(f"# per-clip decoding of {args.stream}, tiny.en, {args.threads} threads, {machine()}")
    print(f"{'context':<22} {'beam':>4} {'prompt':>6} {'WER %':>6} {'seconds':>8}")
    for pad, beam, prompt in CONFIGS:
        wer, seconds = run(engine, audio, reference, pad, beam, prompt)
        context = "full 30 s" if pad is None else f"clip + {pad} s silence"
        print(f"{context:<22} {beam:>4} {str(prompt):>6} {100 * wer:6.2f} {seconds:8.1f}", flush=True)


if __name__ == "__main__":
    main()
