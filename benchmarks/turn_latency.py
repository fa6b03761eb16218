"""Voice-command turn latency: the time from the end of a command to its whole transcript, as a voice assistant
waits for it.

N short commands (1.5 to 6 s clips of the public eval streams, each with 0.3 s of silence before and after)
are sent one at a time at real-time pace in 100 ms chunks, each over a new connection as Home Assistant opens
one: through the ``wyoming`` client to our server (``whisper-stream serve --wyoming-uri``), through our
WebSocket protocol to the same server (``stop``, timed to ``done``, which follows the last final), and, when
it is installed (``pip install wyoming-faster-whisper``), through the ``wyoming`` client to
wyoming-faster-whisper on the same tiny.en CTranslate2 files (offline: no download). Each command goes to
every system in turn before the next, so that the machine's other load hits them alike. Reports the
audio-stop -> transcript latency (p50, p90, mean) and the WER (eval scorer, all commands pooled) per system;
per-command results go to ``--out``/commands.jsonl.

Usage: python benchmarks/turn_latency.py [--commands 50] [--streams en_prompts en_mixed]
                                         [--systems wyoming websocket faster-whisper]
                                         [--server-args '--workers 1 --threads 2'] [--fw-compute-type int8]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.resources
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
from evalkit import ROOT, load_stream, machine, scorer
from load import serve_args
from websockets.asyncio.client import connect
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.info import Describe

from streaming.engine.weights import NAMED_MODELS
from streaming.testing import ServerProcess

SR = 16000
MIN_SECONDS, MAX_SECONDS = 1.5, 6.0
MARGIN = 0.3  # seconds of silence before and after each clip
CHUNK = SR // 10  # samples per chunk: 100 ms

Command = tuple[bytes, dict]  # 16 kHz mono s16 PCM, and its reference (one segment)


def commands(streams: list[str], n: int) -> list[Command]:
    """``n`` clips of 1.5 to 6 s, spread evenly over those of ``streams`` (repeated when there are fewer)."""
    pool = []
    for name in streams:
        audio, reference = load_stream(name)
        for segment in reference["segments"]:
            if MIN_SECONDS <= segment["end"] - segment["start"] <= MAX_SECONDS:
                clip = audio[round(segment["start"] * SR): round(segment["end"] * SR)]
                silence = np.zeros(round(MARGIN * SR), np.float32)
                pcm = (np.clip(np.concatenate([silence, clip, silence]), -1, 1) * 32767).astype("<i2").tobytes()
                pool.append((pcm, {"language": reference.get("language", "en"), "segments": [segment]}))
    if not pool:
        sys.exit(f"no clips of {MIN_SECONDS} to {MAX_SECONDS} s in {' '.join(streams)}")
    if n > len(pool):
        return [pool[i % len(pool)] for i in range(n)]
    return [pool[i * len(pool) // n] for i in range(n)]


async def paced(pcm: bytes, send: Callable[[bytes], Awaitable[None]]) -> None:
    """Send ``pcm`` in 100 ms chunks at real-time pace (on an absolute schedule: no drift)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    for k, at in enumerate(range(0, len(pcm), 2 * CHUNK)):
        await asyncio.sleep(max(0.0, started + k * CHUNK / SR - loop.time()))
        await send(pcm[at: at + 2 * CHUNK])


async def over_wyoming(port: int, pcm: bytes) -> tuple[float, str]:
    """One command through the wyoming client: audio-stop -> transcript seconds, and the transcript."""
    async with AsyncTcpClient("127.0.0.1", port, connect_timeout=30, read_timeout=120) as client:
        await client.write_event(Transcribe(language="en").event())
        await client.write_event(AudioStart(SR, 2, 1).event())
        await paced(pcm, lambda chunk: client.write_event(AudioChunk(SR, 2, 1, chunk).event()))
        await client.write_event(AudioStop().event())
        stopped = time.perf_counter()
        while (event := await client.read_event()) is not None:
            if Transcript.is_type(event.type):
                return time.perf_counter() - stopped, Transcript.from_event(event).text
    raise RuntimeError("the Wyoming service closed the connection without a transcript")


async def over_websocket(port: int, pcm: bytes) -> tuple[float, str]:
    """One command through our WebSocket protocol: stop -> done seconds, and the finals' text."""
    async with connect(f"ws://127.0.0.1:{port}/v1/stream") as ws:
        await ws.send(json.dumps({"type": "start", "language": "en"}))
        finals: list[str] = []

        async def receive() -> float:
            async for raw in ws:
                message = json.loads(raw)
                if message["type"] == "final":
                    finals.append(message["text"])
                elif message["type"] == "done":
                    return time.perf_counter()
                elif message["type"] == "error":
                    raise RuntimeError(f"server error {message['code']}: {message['message']}")
            raise RuntimeError("the server closed the stream without 'done'")

        receiving = asyncio.create_task(receive())
        await paced(pcm, ws.send)
        await ws.send(json.dumps({"type": "stop"}))
        stopped = time.perf_counter()
        return await receiving - stopped, "".join(finals)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def wait_for_wyoming(port: int, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            sys.exit(f"wyoming-faster-whisper did not start; its log:\n{log.read_text()}")
        try:
            async with AsyncTcpClient("127.0.0.1", port, connect_timeout=1, read_timeout=5) as client:
                await client.write_event(Describe().event())
                if await client.read_event() is not None:
                    return
        except (OSError, asyncio.TimeoutError):
            await asyncio.sleep(0.5)


def start_faster_whisper(compute_type: str, beam_size: int, threads: int, out: Path) -> tuple[subprocess.Popen, int]:
    """wyoming-faster-whisper on the bundled tiny.en CTranslate2 files, offline, on a free port."""
    package, folder, _, _ = NAMED_MODELS["tiny.en"]
    model = importlib.resources.files(package) / folder
    port, data = free_port(), tempfile.mkdtemp(prefix="wyoming-fw-")
    command = [sys.executable, "-m", "wyoming_faster_whisper", "--uri", f"tcp://127.0.0.1:{port}",
               "--model", str(model), "--data-dir", data, "--local-files-only", "--stt-library", "faster-whisper",
               "--language", "en", "--beam-size", str(beam_size), "--compute-type", compute_type,
               "--cpu-threads", str(threads)]
    log = out / "faster-whisper.log"
    with open(log, "w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    asyncio.run(wait_for_wyoming(port, process, log))
    return process, port


def summary(name: str, rows: list[dict]) -> str:
    score = scorer()
    latencies = [r["latency"] for r in rows]
    errors = words = 0
    for r in rows:
        result = score.score(r["reference"], [{"t": 0.0, "type": "final", "text": r["text"]}])
        errors, words = errors + result["errors"], words + result["words"]
    return (f"{name:<30} {len(rows):>8} {100 * errors / max(words, 1):6.1f} {score.pct(latencies, 0.5):6.2f} "
            f"{score.pct(latencies, 0.9):6.2f} {statistics.mean(latencies):6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commands", type=int, default=50)
    parser.add_argument("--streams", nargs="+", default=["en_prompts", "en_mixed"])
    parser.add_argument("--systems", nargs="+", default=["wyoming", "websocket", "faster-whisper"],
                        choices=["wyoming", "websocket", "faster-whisper"])
    parser.add_argument("--server-args", default="", help="more flags for our `serve`, e.g. '--workers 1 --threads 2'")
    parser.add_argument("--fw-compute-type", default="int8", help="wyoming-faster-whisper's --compute-type")
    parser.add_argument("--fw-beam-size", type=int, default=5, help="wyoming-faster-whisper's --beam-size")
    parser.add_argument("--fw-threads", type=int, default=min(4, os.cpu_count() or 1),
                        help="wyoming-faster-whisper's --cpu-threads (default: its own 4, at most the CPU count)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "turn_latency"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    systems = list(args.systems)
    if "faster-whisper" in systems:
        try:
            import wyoming_faster_whisper  # noqa: F401
        except ImportError:
            print("wyoming-faster-whisper is not installed (pip install wyoming-faster-whisper): measuring ours only",
                  file=sys.stderr)
            systems.remove("faster-whisper")
    work = commands(args.streams, args.commands)
    audio = sum(len(pcm) for pcm, _ in work) / (2 * SR)
    print(f"# turn latency, {len(work)} commands ({audio:.0f} s: {MIN_SECONDS:g} to {MAX_SECONDS:g} s clips of "
          f"{' '.join(args.streams)}, {MARGIN:g} s silence each side), real time, tiny.en; ours: "
          f"{args.server_args or 'serve defaults'}; faster-whisper: {args.fw_compute_type}, beam {args.fw_beam_size}, "
          f"{args.fw_threads} threads; {machine()}", flush=True)
    ours = faster = None
    runners: dict[str, Callable[[bytes], Awaitable[tuple[float, str]]]] = {}
    try:
        if {"wyoming", "websocket"} & set(systems):
            extra = ("--wyoming-uri", "tcp://127.0.0.1:0", *shlex.split(args.server_args))
            ours = ServerProcess(serve_args("tiny.en", None, None, 8, 0.0, None, extra), out / "server.log", cwd=ROOT)
            our_wyoming = ours.address["wyoming_port"]
            runners["wyoming"] = lambda pcm: over_wyoming(our_wyoming, pcm)
            runners["websocket"] = lambda pcm: over_websocket(ours.port, pcm)
        if "faster-whisper" in systems:
            faster, fw_port = start_faster_whisper(args.fw_compute_type, args.fw_beam_size, args.fw_threads, out)
            runners["faster-whisper"] = lambda pcm: over_wyoming(fw_port, pcm)
        rows: dict[str, list[dict]] = {name: [] for name in systems}
        with open(out / "commands.jsonl", "w") as log:
            for i, (pcm, reference) in enumerate(work):
                for name in systems:
                    latency, text = asyncio.run(runners[name](pcm))
                    row = {"command": i, "system": name, "latency": round(latency, 4), "text": text,
                           "reference": reference}
                    rows[name].append(row)
                    log.write(json.dumps(row) + "\n")
                print(f"\r{i + 1}/{len(work)} commands", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    finally:
        if ours is not None:
            ours.stop()
        if faster is not None:
            faster.terminate()
            faster.wait(30)
    labels = {"wyoming": "whisper-stream (Wyoming)", "websocket": "whisper-stream (WebSocket)",
              "faster-whisper": f"wyoming-faster-whisper {args.fw_compute_type}"}
    print(f"{'system':<30} {'commands':>8} {'WER %':>6} {'p50 s':>6} {'p90 s':>6} {'mean s':>6}")
    for name in systems:
        print(summary(labels[name], rows[name]))


if __name__ == "__main__":
    main()
