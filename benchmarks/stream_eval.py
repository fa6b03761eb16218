"""Stream evaluator: plays eval streams through the recogniser and scores WER and final-word latency.

Real-time mode (default, ``--speed 1``) is computation-aware: audio becomes available only as wall-clock
time passes, inference runs on the same clock, and each event is stamped when it is produced.
``--speed 0`` runs as fast as possible and stamps events with the audio time fed so far (for tests).

Usage: python benchmarks/stream_eval.py [--streams en_prompts en_mixed noise_only] [--model tiny.en]
       [--speed 1] [--threads 1] [--min-chunk 0.5] [--agreement 2] [--out benchmarks/out]
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time
from pathlib import Path

import numpy as np
import soxr
from evalkit import ROOT, load_stream, machine, scorer

from streaming.core.audio import SAMPLE_RATE, PcmDecoder, to_pcm16
from streaming.core.messages import EmbedRequest
from streaming.core.stream import StreamCore, StreamOptions
from streaming.core.vad import VadConfig
from streaming.engine import Engine, configure_threads
from streaming.engine.inference import run_request

CHUNK = 320  # 20 ms, as a live client sends


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def play(engine: Engine, audio: np.ndarray, options: StreamOptions, speed: float = 1.0) -> tuple[list[dict], dict]:
    """Stream ``audio`` through a fresh recogniser; returns the event log and run statistics (``embed_cpu_seconds``:
    the CPU time of the speaker embeddings, ``embed_wall_seconds``: the wall-clock time of each embedding request)."""
    core = StreamCore(options, engine.multilingual)
    log: list[dict] = []
    sent = 0
    started, cpu_start = time.perf_counter(), cpu_seconds()
    decodes, embed_cpu, embed_wall = 0, 0.0, []

    def run(request):
        nonlocal decodes, embed_cpu
        before, wall = cpu_seconds(), time.perf_counter()
        reply = run_request(engine, request)
        if isinstance(request, EmbedRequest):
            embed_cpu += cpu_seconds() - before
            embed_wall.append(time.perf_counter() - wall)
        else:
            decodes += 1
        return reply

    def clock() -> float:
        return time.perf_counter() - started if speed > 0 else sent / 16000

    def record(events) -> None:
        t = clock()
        for event in events:
            log.append({"t": round(t, 3), **event.to_dict()})

    while True:
        available = len(audio) if speed <= 0 else min(len(audio), int(clock() * speed * 16000))
        if speed <= 0:
            available = min(len(audio), sent + CHUNK)
        while sent + CHUNK <= available or (available == len(audio) and sent < available):
            record(core.feed(audio[sent: sent + CHUNK]))
            sent = min(sent + CHUNK, len(audio))
        request = core.next_request()
        if request is not None:
            record(core.complete(request, run(request)))
            continue
        if sent >= len(audio):
            break
        if speed > 0:
            time.sleep(max(0.0, (sent + CHUNK) / 16000 / speed - clock()) + 0.001)
    record(core.flush())
    while (request := core.next_request()) is not None:
        record(core.complete(request, run(request)))
    stats = {"audio_seconds": len(audio) / 16000, "wall_seconds": time.perf_counter() - started,
             "cpu_seconds": cpu_seconds() - cpu_start, "decodes": decodes, "embed_cpu_seconds": embed_cpu,
             "embed_wall_seconds": embed_wall}
    return log, stats


def as_recorded(audio: np.ndarray, rate: int) -> np.ndarray:
    """``audio`` as a client recording at ``rate`` would send it (16-bit PCM), back through the server's decoder."""
    pcm = to_pcm16(soxr.resample(audio, SAMPLE_RATE, rate, quality="VHQ"))
    decoder = PcmDecoder(rate)
    return np.concatenate([decoder.decode(pcm), decoder.flush()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", nargs="+", default=["en_prompts", "en_mixed", "noise_only"])
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--dtype", default="auto",
                        help="auto (default, what serve uses: bfloat16 on CPUs with AMX or AVX-512 BF16, else "
                             "float32), float32, bfloat16 or float16")
    parser.add_argument("--language", default=None)
    parser.add_argument("--speed", type=float, default=1.0, help="1 = real time; 0 = as fast as possible")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-chunk", type=float, default=StreamOptions.min_chunk)
    parser.add_argument("--agreement", type=int, default=StreamOptions.agreement)
    parser.add_argument("--commit-margin", type=float, default=StreamOptions.commit_margin)
    parser.add_argument("--commit-probability", type=float, default=StreamOptions.commit_probability)
    parser.add_argument("--context", type=float, default=StreamOptions.context,
                        help="seconds of audio context for interim decodes (0: window + 4 s)")
    parser.add_argument("--silence", type=float, default=StreamOptions.silence,
                        help="seconds of silence appended to every interim window")
    parser.add_argument("--final-context", type=float, default=StreamOptions.final_context)
    parser.add_argument("--final-beam-size", type=int, default=StreamOptions.final_beam_size)
    parser.add_argument("--endpoint-ms", type=int, default=VadConfig.endpoint_ms)
    parser.add_argument("--hangover-ms", type=int, default=VadConfig.hangover_ms)
    parser.add_argument("--short-utterance-ms", type=int, default=VadConfig.short_utterance_ms,
                        help="utterances shorter than this need twice the endpoint pause (0: off)")
    parser.add_argument("--noise-margin-db", type=float, default=VadConfig.noise_margin_db,
                        help="voiced frames are this far above the tracked noise floor (0: no noise gate)")
    parser.add_argument("--long-utterance-ms", type=int, default=VadConfig.long_utterance_ms,
                        help="past this, a pause of --long-endpoint-ms ends an utterance")
    parser.add_argument("--long-endpoint-ms", type=int, default=VadConfig.long_endpoint_ms)
    parser.add_argument("--pause-ms", type=int, default=VadConfig.pause_ms,
                        help="the final decode starts after this pause, before the endpoint (0: off)")
    parser.add_argument("--max-pending", type=float, default=StreamOptions.max_pending,
                        help="seconds of uncommitted speech after which an endpoint is forced")
    parser.add_argument("--beam-size", type=int, default=StreamOptions.beam_size)
    parser.add_argument("--rate", type=int, default=SAMPLE_RATE,
                        help="send the stream as 16-bit PCM at this rate (resampled offline with soxr VHQ), decoded "
                             "by the server's PcmDecoder: the input resampler's effect on WER")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    parser.add_argument("--debug-log", default=None, help="write the recogniser's debug log here")
    args = parser.parse_args()
    if args.debug_log:
        Path(args.debug_log).parent.mkdir(parents=True, exist_ok=True)
        logging.basicConfig(filename=args.debug_log, level=logging.DEBUG, filemode="w")
    configure_threads(args.threads)
    engine = Engine.load(args.model, dtype=args.dtype)
    options = StreamOptions(language=args.language, min_chunk=args.min_chunk, agreement=args.agreement,
                            commit_margin=args.commit_margin, commit_probability=args.commit_probability,
                            beam_size=args.beam_size, context=args.context,
                            final_context=args.final_context, silence=args.silence,
                            final_beam_size=args.final_beam_size, max_pending=args.max_pending,
                            vad=VadConfig(endpoint_ms=args.endpoint_ms, hangover_ms=args.hangover_ms,
                                          short_utterance_ms=args.short_utterance_ms,
                                          noise_margin_db=args.noise_margin_db,
                                          long_utterance_ms=args.long_utterance_ms,
                                          long_endpoint_ms=args.long_endpoint_ms, pause_ms=args.pause_ms))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    score = scorer().score
    print(f"# streaming, {args.model} {engine.dtype_name}, speed {args.speed or 'max'}, {args.threads} thread(s), "
          f"min_chunk "
          f"{args.min_chunk}, LocalAgreement-{args.agreement}, margin {args.commit_margin} s, "
          f"min p {args.commit_probability}, "
          f"beam {args.beam_size}, endpoint "
          f"{args.endpoint_ms} ms, hangover {args.hangover_ms} ms, "
          f"context {args.context or 'window'} + {args.silence:g} s, "
          f"final context {args.final_context} s, "
          f"final beam {args.final_beam_size}, noise margin {args.noise_margin_db:g} dB, long utterance "
          f"{args.long_utterance_ms} ms / {args.long_endpoint_ms} ms, pause {args.pause_ms} ms, "
          f"max pending {args.max_pending:g} s, "
          f"{machine()}")
    print(f"{'stream':<18} {'WER %':>6} {'p50 s':>6} {'p90 s':>6} {'words':>6} {'cpu s/audio s':>14} {'decodes':>8}")
    for name in args.streams:
        audio, reference = load_stream(name)
        if args.rate != SAMPLE_RATE:
            audio = as_recorded(audio, args.rate)
        log, stats = play(engine, audio, options, args.speed)
        name = Path(name).stem
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(e) + "\n" for e in log))
        result = score(reference, log)
        wer = "-" if result["wer"] is None else f"{100 * result['wer']:6.2f}"
        fmt = lambda v: "-" if v is None else f"{v:6.2f}"  # noqa: E731
        print(f"{name:<18} {wer:>6} {fmt(result['latency_p50']):>6} {fmt(result['latency_p90']):>6} "
              f"{result['hyp_words']:>6} {stats['cpu_seconds'] / stats['audio_seconds']:14.3f} "
              f"{stats['decodes']:>8}", flush=True)


if __name__ == "__main__":
    main()
