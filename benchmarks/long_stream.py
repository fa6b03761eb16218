"""Long-stream stability: the eval streams concatenated to N minutes, played through one recogniser.

Reports, for the first and the last five minutes, the latency of each final after its last word's aligned
end, the decode time per window and the process memory: they must stay flat (no growing window, prompt or
cache). The stream runs as fast as possible, so latency here is algorithmic (audio time fed when the final
is produced); stream_eval.py measures latency in real time.

Usage: python benchmarks/long_stream.py [--minutes 30] [--streams en_continuous] [--threads 1] [--dtype auto]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from evalkit import load_stream, machine

from streaming.core.stream import StreamCore, StreamOptions
from streaming.engine import Engine, configure_threads
from streaming.engine.inference import run_window

CHUNK = 320


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report-minutes", type=float, default=5.0)
    parser.add_argument("--streams", nargs="+", default=["en_prompts", "en_mixed", "noise_only"],
                        help="eval streams concatenated, in turn, to --minutes (e.g. en_continuous)")
    parser.add_argument("--dtype", default="auto", help="auto (default, what serve uses), float32 or bfloat16")
    args = parser.parse_args()
    configure_threads(args.threads)
    engine = Engine.load("tiny.en", dtype=args.dtype)
    pieces = [load_stream(name) for name in args.streams]
    total = int(args.minutes * 60 * 16000)
    chunks: list[np.ndarray] = []
    while sum(len(c) for c in chunks) < total:
        chunks += [audio for audio, _ in pieces]
    audio = np.concatenate(chunks)[:total]
    core = StreamCore(StreamOptions(language="en"), engine.multilingual)
    rows = []  # (audio time of the event, its latency after its last word's aligned end, RSS)
    sent = 0
    decode_times: list[tuple[float, float]] = []
    started = time.perf_counter()
    while sent < len(audio):
        events = core.feed(audio[sent: sent + CHUNK])
        sent += CHUNK
        while (request := core.next_request()) is not None:
            t0 = time.perf_counter()
            reply = run_window(engine, request)
            decode_times.append((sent / 16000, time.perf_counter() - t0))
            events += core.complete(request, reply)
        now = sent / 16000
        for event in events:
            if event.to_dict()["type"] == "final":
                rows.append((now, now - event.end, rss_mb()))
        if sent % (16000 * 60) < CHUNK:
            print(f"\r{now / 60:5.1f}/{args.minutes:.0f} min", end="", flush=True)
    print(f"\r{len(audio) / 16000 / 60:.1f} min of audio in {time.perf_counter() - started:.0f} s; "
          f"{engine.dtype_name}; {machine()}")
    span = args.report_minutes * 60
    end = len(audio) / 16000
    print(f"{'window':<14} {'finals':>6} {'lat p50':>8} {'lat p90':>8} {'decode ms p50':>14} {'RSS MB':>8}")
    for label, lo, hi in (("first", 0, span), ("last", end - span, end)):
        lat = sorted(r[1] for r in rows if lo <= r[0] < hi)
        dec = sorted(d for t, d in decode_times if lo <= t < hi)
        mem = [r[2] for r in rows if lo <= r[0] < hi]
        pick = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")  # noqa: E731
        print(f"{label + ' ' + str(int(args.report_minutes)) + ' min':<14} {len(lat):>6} {pick(lat, .5):8.2f} "
              f"{pick(lat, .9):8.2f} {1000 * pick(dec, .5):14.0f} {max(mem, default=float('nan')):8.0f}")


if __name__ == "__main__":
    main()
