"""Cost of the input resampler against soxr's: CPU time per second of audio and the audio held back, as a live
stream uses them.

Feeds 60 s of 16-bit PCM (en_prompts, resampled offline with soxr VHQ as a recording at that rate would be)
in 20 ms chunks, one thread, at each rate, through ``PcmDecoder`` (our windowed-sinc kernel) and through
soxr's ``ResampleStream`` at its default "HQ" quality. Held back: input received minus output emitted after
each chunk, in milliseconds (median and maximum; the first second excluded).

Usage: python benchmarks/resample_cost.py [--rates 8000 22050 24000 44100 48000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import soxr
from evalkit import load_stream, machine

from streaming.core.audio import SAMPLE_RATE, PcmDecoder, to_pcm16
from streaming.engine import configure_threads

SECONDS = 60
CHUNK_MS = 20


def soxr_decoder(rate: int) -> Callable[[bytes], np.ndarray]:
    stream = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
    return lambda chunk: stream.resample_chunk(np.frombuffer(chunk, "<i2").astype(np.float32) / 32768.0)


DECODERS = {"ours": lambda rate: PcmDecoder(rate).decode, "soxr HQ": soxr_decoder}


def measure(pcm: bytes, rate: int, decoder: Callable[[bytes], np.ndarray]) -> tuple[float, float, float]:
    """(CPU ms per audio second, median held-back ms, maximum held-back ms) of one pass."""
    step = 2 * rate * CHUNK_MS // 1000
    held: list[float] = []
    received = emitted = 0
    started = time.process_time()
    for i in range(0, len(pcm), step):
        chunk = pcm[i: i + step]
        emitted += decoder(chunk).size
        received += len(chunk) // 2
        if received > rate:
            held.append(1000 * (received / rate - emitted / SAMPLE_RATE))
    cpu = time.process_time() - started
    return 1000 * cpu / (len(pcm) / 2 / rate), float(np.median(held)), max(held)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=int, nargs="+", default=[8000, 22050, 24000, 44100, 48000])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    configure_threads(1)
    audio = load_stream("en_prompts")[0][: SECONDS * SAMPLE_RATE]
    print(f"# PcmDecoder, {SECONDS} s of en_prompts in {CHUNK_MS} ms chunks, best of {args.repeat}, {machine()}")
    print(f"{'rate Hz':>8} {'resampler':>10} {'CPU ms/audio s':>15} {'held p50 ms':>12} {'held max ms':>12}")
    for rate in args.rates:
        pcm = to_pcm16(soxr.resample(audio, SAMPLE_RATE, rate, quality="VHQ"))
        runs: dict[str, list] = {name: [] for name in DECODERS}
        for _ in range(args.repeat):  # alternated, so that drift in the machine's speed hits both alike
            for name, make in DECODERS.items():
                runs[name].append(measure(pcm, rate, make(rate)))
        for name, found in runs.items():
            cpu = min(r[0] for r in found)
            print(f"{rate:>8} {name:>10} {cpu:>15.2f} {found[0][1]:>12.1f} {found[0][2]:>12.1f}", flush=True)


if __name__ == "__main__":
    main()
