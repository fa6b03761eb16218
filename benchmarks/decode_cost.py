"""Where a stream's inference time goes: encoder, prefill, decoding steps and word alignment.

Runs the embeddable recogniser over the first ``--seconds`` of an eval stream as fast as possible, one torch
thread per recogniser, and prints the seconds spent in each stage of the interim and the final window
decodes, and how many decoder passes (prefills, token steps, draft checks, alignments) they made. ``--copies 2``
runs two recognisers at once on two threads (both cores busy, as in the server with two workers; each
takes a different part of the stream). ``--no-pack`` leaves the decoder's weights in their plain layout
(see ``streaming.engine.model.pack_weight``) and ``--no-draft`` decodes greedily without the previous partial
as a draft (see ``streaming.engine.decoding.DecodingOptions.draft``), for comparison.

Usage: python benchmarks/decode_cost.py [--stream en_prompts] [--seconds 90] [--dtype bfloat16]
                                        [--copies 2] [--no-pack] [--no-draft]
"""

from __future__ import annotations

import argparse
import threading
import time
from collections import defaultdict
from dataclasses import replace

from evalkit import load_stream, machine

from streaming.engine import Engine, configure_threads, inference, recognizer
from streaming.engine.model import BucketedLinear

STAGES = {"encode_window": "encode", "_prepare": "prefill", "_decode": "decode", "_finish": "align"}


def time_stages(engine: Engine, totals: dict[tuple[str, str], float], counts: dict[str, int],
                lock: threading.Lock, drafts: bool = True) -> None:
    """Wrap :func:`streaming.engine.inference.run_window` (which the recogniser runs for each request) and its
    stages so that each stage adds its time to
    ``totals[(kind, stage)]``, kind "interim" or "final"; each decode counts in ``counts[kind]`` and each
    decoder pass in ``counts[kind + " passes"]``. ``drafts=False`` runs every request without its draft."""
    kind = threading.local()
    run_window, forward = inference.run_window, engine.model.decoder.forward

    def counted(engine, request, *args, **kwargs):
        kind.name = "final" if request.final else "interim"
        with lock:
            counts[kind.name] += 1
        return run_window(engine, request if drafts else replace(request, draft=()), *args, **kwargs)

    def passes(*args, **kwargs):
        with lock:
            counts[kind.name + " passes"] += 1
        return forward(*args, **kwargs)

    inference.run_window = counted  # run_request calls it by this name
    engine.model.decoder.forward = passes
    for name, label in STAGES.items():
        original = getattr(inference, name)

        def timed(*args, _original=original, _label=label, **kwargs):
            started = time.thread_time()
            try:
                return _original(*args, **kwargs)
            finally:
                with lock:
                    totals[(kind.name, _label)] += time.thread_time() - started

        setattr(inference, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stream", default="en_prompts")
    parser.add_argument("--seconds", type=float, default=90.0, help="audio per recogniser")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--copies", type=int, default=1, help="recognisers running at once, one thread each")
    parser.add_argument("--no-pack", action="store_true", help="decoder weights in their plain layout")
    parser.add_argument("--no-draft", action="store_true", help="greedy decodes without the previous partial as draft")
    args = parser.parse_args()
    configure_threads(1)
    engine = Engine.load("tiny.en", dtype=args.dtype)
    if args.no_pack:
        for module in engine.model.decoder.modules():
            if isinstance(module, BucketedLinear):
                module.packed = None
        engine.model.decoder.packed_logits = None
    audio, _ = load_stream(args.stream)
    totals: dict[tuple[str, str], float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    lock = threading.Lock()
    time_stages(engine, totals, counts, lock, drafts=not args.no_draft)
    samples = round(args.seconds * 16000)

    def run(copy: int) -> None:
        configure_threads(1)
        part = audio[copy * samples: (copy + 1) * samples]
        stream = recognizer.Recognizer(engine)
        for offset in range(0, part.size, 320):
            stream.feed(part[offset: offset + 320])
        stream.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=run, args=(k,)) for k in range(args.copies)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    heard = args.copies * args.seconds
    print(f"# decode cost, tiny.en {engine.dtype_name}, {args.stream}, {args.copies} x {args.seconds:g} s, "
          f"{'plain' if args.no_pack else 'packed'} decoder weights, {machine()}")
    for kind in ("interim", "final"):
        print(f"{kind:8s} {counts[kind]:4d} decodes {counts[kind + ' passes']:5d} decoder passes  "
              + "  ".join(f"{label} {totals[(kind, label)]:.1f} s" for label in STAGES.values()))
    print(f"inference CPU s per audio s {sum(totals.values()) / heard:.3f}  wall {wall:.1f} s")


if __name__ == "__main__":
    main()
