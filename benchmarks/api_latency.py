"""Latency through each wire API: the same streams, at real-time pace, to one server through our own protocol
(``/v1/stream``), Deepgram's live API (``/v1/listen``) and OpenAI's Realtime transcription
(``/v1/realtime?intent=transcription``, 24 kHz PCM as that API requires).

Each stream goes through every API in turn, one at a time, so that the machine's drift hits them alike.
Reported per API:
- final-word latency: the arrival of each final (own: ``final``; Deepgram: ``Results`` with ``is_final``) after
  its last word was spoken (stream start + the word's end time), as stream_eval measures it; OpenAI's deltas
  carry no times, so none for it;
- utterance-end latency: the arrival of the message that closes an utterance after the utterance's end as that
  message states it (own: ``utterance_end``.end; Deepgram: ``UtteranceEnd``.last_word_end; OpenAI: ``...
  transcription.completed`` after ``speech_stopped``.audio_end_ms);
- WER of the transcript each API delivered (eval scorer).

Usage: python benchmarks/api_latency.py [--streams en_prompts benchmarks/out/heldout/heldout_clean.json]
                                        [--seconds 90] [--rounds 1] [--server-args '--threads 2']
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shlex
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import soxr
from evalkit import ROOT, load_stream, machine, scorer
from load import serve_args
from websockets.asyncio.client import connect

from streaming.testing import ServerProcess

SR = 16000
OPENAI_RATE = 24000
CHUNK_SECONDS = 0.1


class Run:
    """One stream through one API: arrival times, latencies and the transcript."""

    def __init__(self) -> None:
        self.t0 = 0.0
        self.final_latency: list[float] = []
        self.end_latency: list[float] = []
        self.texts: list[str] = []


async def paced(chunks: list, send: Callable[[bytes], Awaitable[None]], run: Run, receiving: asyncio.Task) -> None:
    """Send ``chunks`` (one per 100 ms) at real-time pace on an absolute schedule; ``run.t0`` is the first's
    wall time (stream time 0). A receiver that failed stops the sending with its exception."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    run.t0 = time.perf_counter()
    for k, chunk in enumerate(chunks):
        await asyncio.sleep(max(0.0, started + k * CHUNK_SECONDS - loop.time()))
        if receiving.done():
            receiving.result()
            raise RuntimeError("the server ended the stream before the audio did")
        await send(chunk)


def pcm_chunks(audio: np.ndarray, rate: int) -> list[bytes]:
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    step = 2 * round(rate * CHUNK_SECONDS)
    return [pcm[i: i + step] for i in range(0, len(pcm), step)]


async def own(port: int, audio: np.ndarray) -> Run:
    run = Run()
    async with connect(f"ws://127.0.0.1:{port}/v1/stream", max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", "language": "en"}))

        async def receive() -> None:
            async for raw in ws:
                now, message = time.perf_counter(), json.loads(raw)
                kind = message["type"]
                if kind == "final":
                    run.texts.append(message["text"])
                    run.final_latency.append(now - run.t0 - message["words"][-1]["end"])
                elif kind == "utterance_end":
                    run.end_latency.append(now - run.t0 - message["end"])
                elif kind == "done":
                    return
                elif kind == "error":
                    raise RuntimeError(f"own protocol error {message['code']}: {message['message']}")

        receiving = asyncio.create_task(receive())
        await paced(pcm_chunks(audio, SR), ws.send, run, receiving)
        await ws.send(json.dumps({"type": "stop"}))
        await receiving
    return run


async def deepgram(port: int, audio: np.ndarray) -> Run:
    run = Run()
    query = "encoding=linear16&sample_rate=16000&channels=1&language=en&interim_results=true&utterance_end_ms=1000"
    async with connect(f"ws://127.0.0.1:{port}/v1/listen?{query}", max_size=None) as ws:

        async def receive() -> None:
            async for raw in ws:
                now, message = time.perf_counter(), json.loads(raw)
                kind = message.get("type")
                if kind == "Results" and message["is_final"]:
                    alternative = message["channel"]["alternatives"][0]
                    if alternative["words"]:
                        run.texts.append(alternative["transcript"])
                        run.final_latency.append(now - run.t0 - alternative["words"][-1]["end"])
                elif kind == "UtteranceEnd":
                    run.end_latency.append(now - run.t0 - message["last_word_end"])
                elif kind == "Metadata":
                    return
                elif kind == "Error":
                    raise RuntimeError(f"Deepgram API error {message['variant']}: {message['description']}")

        receiving = asyncio.create_task(receive())
        await paced(pcm_chunks(audio, SR), ws.send, run, receiving)
        await ws.send(json.dumps({"type": "CloseStream"}))
        await receiving
    return run


async def openai(port: int, audio: np.ndarray) -> Run:
    run = Run()
    chunks = pcm_chunks(soxr.resample(audio, SR, OPENAI_RATE, quality="VHQ"), OPENAI_RATE)
    session = {"type": "transcription", "audio": {"input": {
        "format": {"type": "audio/pcm", "rate": OPENAI_RATE},
        "transcription": {"model": "whisper-1", "language": "en"}}}}
    async with connect(f"ws://127.0.0.1:{port}/v1/realtime?intent=transcription", max_size=None) as ws:
        await ws.send(json.dumps({"type": "session.update", "session": session}))
        stopped: dict[str, float] = {}
        heard_all = asyncio.Event()

        async def receive() -> None:
            async for raw in ws:
                now, message = time.perf_counter(), json.loads(raw)
                kind = message["type"]
                if kind == "input_audio_buffer.speech_stopped":
                    stopped[message["item_id"]] = message["audio_end_ms"] / 1000
                elif kind == "conversation.item.input_audio_transcription.completed":
                    run.texts.append(message["transcript"])
                    if message["item_id"] in stopped:
                        run.end_latency.append(now - run.t0 - stopped[message["item_id"]])
                    if heard_all.is_set():
                        return
                elif kind == "error":
                    raise RuntimeError(f"OpenAI Realtime error: {message['error']}")

        receiving = asyncio.create_task(receive())

        async def send(chunk: bytes) -> None:
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(chunk).decode()}))

        await paced(chunks, send, run, receiving)
        heard_all.set()
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        try:
            await asyncio.wait_for(receiving, 30)  # the commit's item, if speech was still open
        except TimeoutError:
            receiving.cancel()
    return run


APIS = {"own": own, "deepgram": deepgram, "openai": openai}


def pct(values: list[float], q: float) -> str:
    return f"{np.percentile(values, 100 * q):.2f}" if values else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", nargs="+", default=["en_prompts", "en_continuous"])
    parser.add_argument("--seconds", type=float, default=90, help="the first N seconds of each stream")
    parser.add_argument("--rounds", type=int, default=1, help="times through every stream and API")
    parser.add_argument("--apis", nargs="+", default=list(APIS), choices=list(APIS))
    parser.add_argument("--server-args", default="", help="more flags for `serve`, e.g. '--threads 2'")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "api_latency"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    score = scorer()
    print(f"# API latency, {' '.join(args.streams)} (first {args.seconds:g} s each), {args.rounds} round(s), real "
          f"time, tiny.en, serve {args.server_args or 'defaults'}; {machine()}", flush=True)
    rows: dict[str, dict] = {api: {"final": [], "end": [], "errors": 0, "words": 0} for api in args.apis}
    with ServerProcess(serve_args("tiny.en", None, None, 8, 0.0, None, tuple(shlex.split(args.server_args))),
                       out / "server.log", cwd=ROOT) as server:
        for _ in range(args.rounds):
            for name in args.streams:
                audio, reference = load_stream(name)
                audio = audio[: round(args.seconds * SR)]
                segments = [s for s in reference["segments"] if s["end"] <= args.seconds]
                cut = {**reference, "segments": segments, "duration": min(args.seconds, reference["duration"])}
                for api in args.apis:
                    run = asyncio.run(APIS[api](server.port, audio))
                    result = score.score(cut, [{"t": 0.0, "type": "final", "text": " ".join(run.texts)}])
                    row = rows[api]
                    row["final"] += run.final_latency
                    row["end"] += run.end_latency
                    row["errors"] += result["errors"]
                    row["words"] += result["words"]
                    print(f"  {name} via {api}: WER {100 * result['errors'] / max(result['words'], 1):.2f} %, "
                          f"final p50 {pct(run.final_latency, 0.5)} s, utterance end p50 {pct(run.end_latency, 0.5)} s",
                          flush=True)
    print(f"{'API':<10} {'WER %':>6} {'finals':>6} {'final p50':>9} {'final p90':>9} {'ends':>5} {'end p50':>8} "
          f"{'end p90':>8}")
    for api, row in rows.items():
        print(f"{api:<10} {100 * row['errors'] / max(row['words'], 1):6.2f} {len(row['final']):>6} "
              f"{pct(row['final'], 0.5):>9} {pct(row['final'], 0.9):>9} {len(row['end']):>5} "
              f"{pct(row['end'], 0.5):>8} {pct(row['end'], 0.9):>8}")


if __name__ == "__main__":
    main()
