"""Load benchmark: N concurrent real-time streams against the real server, with batching on and off.

The server (``whisper-stream serve``) runs in a child process so that its CPU time can be read from /proc
apart from the clients'. Each client streams an excerpt of a real eval stream (en_prompts,
en_mixed in turn, each client from a different utterance) at real-time pace over the protocol, stamps every
event with the wall-clock time since its first audio sample (the ../shared/eval event-log format) and is
scored with the reference scorer against the reference segments inside its excerpt. Per run it reports the
WER and final-word latency over all streams (p90 also apart for the last word of each clip, "last", which
the utterance's final decode commits, and the words before it, "inner", which LocalAgreement commits while
the speaker goes on), the server's CPU seconds per second of audio, and from /metrics the time its
inference workers were busy per second of audio (the rest of the CPU is the event loop: protocol, VAD,
resampling; the CPU column includes the server's inference processes), its mean inference batch size,
the mean time a decode waited in the queue, and the time per heap trim.

``--windows N`` instead times ``run_windows`` on N window requests captured from a recogniser on real audio:
one batched call against one call per request, in the same process.

Usage: python benchmarks/load.py [--streams 1 2 4 8 16] [--stream en_continuous] [--max-batch 8 1]
                                 [--seconds 60] [--workers 2]
                                 [--threads N] [--dtype bfloat16] [--max-utilization 0.8]
                                 [--start-options '{"min_chunk": 1.0}']
       python benchmarks/load.py --windows 8 [--repeats 5]
       python benchmarks/load.py --offline --streams 4 8 16 --seconds 30   (offline WER of the same audio)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import torch
from evalkit import ROOT, child_pids, cpu_seconds, load_stream, machine, scorer

from streaming.client import ClientError, pcm_chunks, stream_audio
from streaming.core.stream import StreamCore, StreamOptions
from streaming.engine import Engine, configure_threads
from streaming.engine.inference import WindowRequest, run_window, run_windows
from streaming.testing import ServerProcess

SR = 16000
CHUNK = 320  # 20 ms, as a live client sends
STREAMS = ["en_prompts", "en_mixed"]  # the eval streams the clients take excerpts of, in turn (--stream)
LEAD_IN = 0.2  # seconds of the silence before an utterance that an excerpt starts with (gaps are >= 0.2 s)


def source(client: int) -> tuple[str, int]:
    """The stream client number ``client`` takes its excerpt of, and its turn on that stream."""
    return STREAMS[client % len(STREAMS)], client // len(STREAMS)


def excerpt(name: str, client: int, seconds: float) -> tuple[np.ndarray, dict]:
    """``seconds`` of stream ``name`` (looped) from an utterance chosen by ``client``, cut in the silence
    before the first utterance that does not end in time; the reference keeps the utterances inside."""
    audio, reference = load_stream(name)
    duration = len(audio) / SR
    segments = reference["segments"]
    begin = max(0.0, segments[(5 * client) % len(segments)]["start"] - LEAD_IN)
    loops = int((begin + seconds) // duration) + 1
    looped = [dict(s, start=s["start"] + k * duration, end=s["end"] + k * duration)
              for k in range(loops) for s in segments]
    inside = [s for s in looped if s["start"] >= begin and s["end"] <= begin + seconds]
    after = [s["start"] for s in looped if s["start"] >= begin and s["end"] > begin + seconds]
    end = min([begin + seconds, *after[:1]])
    audio = np.tile(audio, loops)[round(begin * SR): round(end * SR)]
    shifted = [dict(s, start=round(s["start"] - begin, 3), end=round(s["end"] - begin, 3)) for s in inside]
    return audio, {**reference, "duration": round(end - begin, 3), "segments": shifted}


def word_latencies(score, reference: dict, events: list[dict]) -> list[tuple[float, bool]]:
    """Every correctly recognised word's final latency, as score.py defines it (with its own functions), and
    whether the word is the last of its clip (committed at the utterance's end, by its final decode)."""
    lang = reference.get("language", "en")
    ref, ref_end, ref_last = [], [], []
    for s in reference["segments"]:
        words = score.normalize(s["text"], lang)
        ref += words
        ref_end += [s["start"] + (s["end"] - s["start"]) * (k + 1) / len(words) for k in range(len(words))]
        ref_last += [k == len(words) - 1 for k in range(len(words))]
    hyp, hyp_t = [], []
    for e in events:
        if e["type"] == "final":
            words = score.normalize(e["text"], lang)
            hyp += words
            hyp_t += [e["t"]] * len(words)
    _, pairs = score.align(ref, hyp)
    return [(hyp_t[j] - ref_end[i], ref_last[i])
            for i, j in pairs if i is not None and j is not None and ref[i] == hyp[j]]


# ------------------------------------------------------------------------------------------- the server


def serve_args(model: str, threads: int | None, workers: int | None, max_batch: int, max_utilization: float,
               dtype: str | None, extra: tuple[str, ...] = ()) -> list[str]:
    """``serve`` flags for a load run: no stream limit below the load, the batching and admission asked for."""
    args = ["--model", model, "--max-streams", "64", "--max-batch", str(max_batch),
            "--max-utilization", str(max_utilization)]
    args += ["--workers", str(workers)] if workers else []
    args += ["--dtype", dtype] if dtype else []
    args += ["--threads", str(threads)] if threads else []
    return args + list(extra)


def server_cpu_seconds(server: ServerProcess) -> float:
    """User + system CPU time of the server process and its children (the inference processes)."""
    return cpu_seconds(server.pid) + sum(cpu_seconds(child) for child in child_pids(server.pid))


def server_metrics(server: ServerProcess) -> dict[str, float]:
    with urllib.request.urlopen(f"{server.http_url}/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    return {name: float(value) for name, value in (line.split() for line in lines if not line.startswith("#"))}


# ------------------------------------------------------------------------------------------- the clients


async def client(url: str, audio: np.ndarray, delay: float, options: dict) -> list[dict] | None:
    """Stream ``audio`` in real time after ``delay`` seconds; the final and partial events, stamped (None:
    the server refused the stream as overloaded or at capacity)."""
    await asyncio.sleep(delay)
    loop = asyncio.get_running_loop()
    events: list[dict] = []
    first_sample: list[float] = []

    async def chunks() -> AsyncIterator[bytes]:
        for chunk in pcm_chunks(audio):
            first_sample[:] = first_sample or [loop.time()]
            yield chunk

    def record(message: dict) -> None:
        if message["type"] in ("final", "partial") and first_sample:
            events.append({"t": round(loop.time() - first_sample[0], 3), "type": message["type"],
                           "text": message["text"]})

    try:
        await stream_audio(url, chunks(), speed=1.0, start_options=options, on_event=record)
    except ClientError as exc:
        if exc.code not in ("overloaded", "capacity"):
            raise
        return None
    return events


async def run_clients(url: str, excerpts: list[tuple[np.ndarray, dict]], options: dict) -> list[list[dict] | None]:
    delays = [(0.37 * i) % 1.0 for i in range(len(excerpts))]  # streams out of step, as real ones are
    return list(await asyncio.gather(*(client(url, a, d, options) for (a, _), d in zip(excerpts, delays))))


def load_run(server: ServerProcess, n: int, seconds: float, out: Path, options: dict) -> dict[str, float]:
    """N streams at once against ``server``; the pooled scores and the server's share of the work. The
    event logs go to ``out``/client-I.jsonl."""
    excerpts = [excerpt(*source(i), seconds) for i in range(n)]
    before, cpu = server_metrics(server), server_cpu_seconds(server)
    started = time.perf_counter()
    logs = asyncio.run(run_clients(server.url, excerpts, options))
    wall = time.perf_counter() - started
    cpu, after = server_cpu_seconds(server) - cpu, server_metrics(server)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    score = scorer()
    errors = words = 0
    latencies: list[tuple[float, bool]] = []
    out.mkdir(parents=True, exist_ok=True)
    admitted = [(excerpt, events) for excerpt, events in zip(excerpts, logs) if events is not None]
    for i, ((_, reference), events) in enumerate(admitted):
        (out / f"client-{i}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
        result = score.score(reference, events)
        errors, words = errors + result["errors"], words + result["words"]
        latencies += word_latencies(score, reference, events)
    audio_seconds = sum(len(a) for (a, _), _ in admitted) / SR
    every = [t for t, _ in latencies]
    return {"wer": errors / max(words, 1), "p50": score.pct(every, 0.5), "p90": score.pct(every, 0.9),
            "p90_last": score.pct([t for t, last in latencies if last], 0.9),
            "p90_inner": score.pct([t for t, last in latencies if not last], 0.9),
            "cpu_per_audio": cpu / audio_seconds,
            "busy_per_audio": delta["whisper_stream_inference_busy_seconds_total"] / audio_seconds,
            "decodes": delta["whisper_stream_inference_requests_total"],
            "mean_batch": delta["whisper_stream_batch_size_sum"] / max(delta["whisper_stream_batch_size_count"], 1),
            "queue_ms": 1000 * delta["whisper_stream_queue_delay_seconds_sum"]
            / max(delta["whisper_stream_queue_delay_seconds_count"], 1),
            "trim_ms": 1000 * delta["whisper_stream_heap_trim_seconds_total"]
            / max(delta["whisper_stream_heap_trims_total"], 1),
            "wall": wall, "audio": audio_seconds, "admitted": len(admitted)}


# ------------------------------------------------------------------------------- run_windows on its own


def captured_requests(engine: Engine, n: int, seconds: float = 20.0) -> list[WindowRequest]:
    """One window request from each of ``n`` streams: what the recogniser asks for halfway through an
    excerpt (a greedy interim decode or a final one, with its committed prefix and prompt)."""
    picked = []
    for i in range(n):
        audio, _ = excerpt(*source(i), seconds)
        core, requests = StreamCore(StreamOptions(language="en"), engine.multilingual), []
        for at in range(0, len(audio), CHUNK):
            core.feed(audio[at: at + CHUNK])
            while (request := core.next_request()) is not None:
                requests.append(request)
                core.complete(request, run_window(engine, request))
        picked.append(requests[len(requests) // 2])
    return picked


def time_windows(engine: Engine, n: int, repeats: int) -> None:
    requests = captured_requests(engine, n)
    for r in requests:
        print(f"  {len(r.audio) / SR:5.1f} s audio, prefix {len(r.prefix):3d}, prompt {len(r.prompt):3d} tokens, "
              f"beam {r.beam_size}, context {r.context:g} s")
    times: dict[str, list[float]] = {"one by one": [], "batched": []}
    for _ in range(repeats):  # alternating, so that the machine's other load hits both alike
        for name, run in (("one by one", lambda: [run_windows(engine, [r]) for r in requests]),
                          ("batched", lambda: run_windows(engine, requests))):
            torch.manual_seed(0)
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    one, batched = (statistics.median(t) for t in times.values())
    print(f"run_windows on {n} requests, median of {repeats}: one by one {one:.3f} s, batched {batched:.3f} s, "
          f"speedup {one / batched:.2f}x")


def offline_wers(model: str, counts: list[int], seconds: float) -> None:
    """Our offline WER (beam 5) on the very excerpts that N streams send: the streaming bound's reference."""
    from streaming.engine.transcribe import TranscribeOptions, transcribe

    engine, score = Engine.load(model), scorer()
    for n in counts:
        errors = words = 0
        for i in range(n):
            audio, reference = excerpt(*source(i), seconds)
            text = transcribe(engine, audio, TranscribeOptions(language="en")).text
            result = score.score(reference, [{"t": 0.0, "type": "final", "text": text}])
            errors, words = errors + result["errors"], words + result["words"]
        print(f"{n:>7} streams: offline WER of the same excerpts {100 * errors / max(words, 1):.2f} % "
              f"({words} words)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--stream", nargs="+", default=STREAMS, metavar="NAME",
                        help="eval streams the clients take excerpts of, in turn (e.g. en_continuous)")
    parser.add_argument("--max-batch", type=int, nargs="+", default=[8, 1], help="scheduler batch sizes to compare")
    parser.add_argument("--seconds", type=float, default=60.0, help="audio per stream")
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per server worker (default: the server's own default)")
    parser.add_argument("--workers", type=int, default=None,
                        help="the server's inference worker threads (default: the server's own default)")
    parser.add_argument("--dtype", default=None, help="the server's --dtype (default: its own default, auto)")
    parser.add_argument("--max-utilization", type=float, default=0.0,
                        help="the server's admission limit (default 0: off, every stream is admitted)")
    parser.add_argument("--server-args", default="", help="more `serve` flags, e.g. '--heap-trim-seconds 0'")
    parser.add_argument("--start-options", type=json.loads, default={},
                        help='fields for every client\'s start message, e.g. \'{"min_chunk": 1.0}\'')
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "load"))
    parser.add_argument("--windows", type=int, default=0, help="time run_windows on this many requests instead")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--offline", action="store_true",
                        help="print our offline WER on the same excerpts instead (the streaming bound)")
    args = parser.parse_args()
    STREAMS[:] = args.stream
    if args.offline:
        configure_threads(args.threads)
        offline_wers(args.model, args.streams, args.seconds)
        return
    if args.windows:
        configure_threads(args.threads)
        time_windows(Engine.load(args.model), args.windows, args.repeats)
        return
    print(f"# load, {args.model}, {args.seconds:g} s per stream, server workers {args.workers or 'default'}, threads "
          f"{args.threads or 'default'}, dtype {args.dtype or 'default'}, "
          f"max utilization {args.max_utilization or 'off'}, {args.server_args or 'no other flags'}, "
          f"start options {json.dumps(args.start_options) if args.start_options else 'none'}, "
          f"streams {' '.join(STREAMS)}, {machine()}")
    print(f"{'streams':>7} {'admitted':>8} {'batch':>5} {'WER %':>6} {'p50 s':>6} {'p90 s':>6} {'last':>5} "
          f"{'inner':>5} {'cpu s/audio s':>13} {'infer s/audio s':>15} "
          f"{'mean batch':>10} {'queue ms':>8} {'decodes':>7} {'wall s':>6} {'ms/heap trim':>12}")
    for max_batch in args.max_batch:
        server = ServerProcess(serve_args(args.model, args.threads, args.workers, max_batch, args.max_utilization,
                                          args.dtype, tuple(shlex.split(args.server_args))),
                               Path(args.out) / f"server-batch{max_batch}.log", cwd=ROOT)
        try:
            for n in args.streams:
                r = load_run(server, n, args.seconds, Path(args.out) / f"streams{n}-batch{max_batch}",
                             args.start_options)
                print(f"{n:>7} {r['admitted']:>8} {max_batch:>5} {100 * r['wer']:6.1f} {r['p50'] or 0:6.2f} "
                      f"{r['p90'] or 0:6.2f} {r['p90_last'] or 0:5.2f} {r['p90_inner'] or 0:5.2f} "
                      f"{r['cpu_per_audio']:13.3f} {r['busy_per_audio']:15.3f} {r['mean_batch']:10.2f} "
                      f"{r['queue_ms']:8.0f} {r['decodes']:7.0f} {r['wall']:6.0f} {r['trim_ms']:12.1f}",
                      flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
