"""The ``whisper-stream`` command: offline transcription and the streaming server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

from .core.events import word_dict
from .core.languages import TASKS
from .core.messages import WordTiming
from .core.speakers import SPEAKER_ENCODER_INSTALL
from .formats import FORMATS, Cue, render

if TYPE_CHECKING:
    from .scheduler import Runner
    from .server import ServerConfig

log = logging.getLogger(__name__)


def _word(w: WordTiming) -> dict:
    return word_dict(w.word, w.start, w.end, w.probability)


def _speaker_cues(segments: list, labels: list[int], words: bool) -> list[Cue]:
    """Cues from segments whose words carry ``labels`` (one per word, or one per segment without words): a
    segment is cut where the speaker changes. ``words`` keeps the words in the cues."""
    cues, labels = [], iter(labels)
    for segment in segments:
        if not segment.words:
            cues.append(Cue(segment.start, segment.end, segment.text, speaker=next(labels)))
            continue
        run: list = []
        for word, label in zip(segment.words, labels):
            if run and label != run[-1][1]:
                cues.append(_cue(run, words))
                run = []
            run.append((word, label))
        cues.append(_cue(run, words))
    return cues


def _cue(run: list, words: bool) -> Cue:
    return Cue(run[0][0].start, run[-1][0].end, "".join(w.word for w, _ in run),
               [{**_word(w), "speaker": label} for w, label in run] if words else [], speaker=run[0][1])


def _transcribe(args: argparse.Namespace) -> int:
    from .audiofile import read_audio
    from .core.audio import AudioFormatError
    from .engine import Engine, configure_threads
    from .engine.speaker import SpeakerModelMissing
    from .engine.transcribe import TranscribeOptions, speaker_labels, transcribe
    from .engine.weights import ModelLoadError

    configure_threads(args.threads)
    try:
        audio = read_audio(args.file)
    except (OSError, AudioFormatError) as exc:
        print(f"whisper-stream: cannot read {args.file}: {exc}", file=sys.stderr)
        return 2
    try:
        engine = Engine.load(args.model, device=args.device, dtype=args.dtype)
    except (ModelLoadError, OSError, ValueError) as exc:  # OSError/ValueError: the tokenizer's vocabulary
        print(f"whisper-stream: {exc}", file=sys.stderr)
        return 2
    if args.diarize:
        try:
            engine.speakers  # noqa: B018 - loads it now, before the long part
        except SpeakerModelMissing as exc:
            print(f"whisper-stream: --diarize: {exc}", file=sys.stderr)
            return 2
    options = TranscribeOptions(language=args.language, task=args.task, beam_size=args.beam_size,
                                best_of=args.beam_size, word_timestamps=args.word_timestamps or args.diarize,
                                initial_prompt=args.prompt)
    started = time.monotonic()
    long_input = len(audio) > 60 * 16000

    def progress(done: float, total: float) -> None:
        if long_input:
            print(f"\r{done:7.1f}/{total:.1f} s ({100 * done / total:3.0f}%)", end="", file=sys.stderr)

    try:
        result = transcribe(engine, audio, options, progress)
    except ValueError as exc:
        print(f"whisper-stream: {exc}", file=sys.stderr)
        return 2
    if long_input:
        elapsed = time.monotonic() - started
        print(f"\rdone: {result.duration:.1f} s of audio in {elapsed:.1f} s", file=sys.stderr)
    if args.diarize:
        spans = [(w.start, w.end) for s in result.segments for w in s.words or [s]]
        cues = _speaker_cues(result.segments, speaker_labels(engine, audio, spans), args.word_timestamps)
    else:
        cues = [Cue(s.start, s.end, s.text, [_word(w) for w in s.words]) for s in result.segments]
    output = render(cues, args.format, result.language)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(output)
    else:
        sys.stdout.write(output)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="whisper-stream", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("transcribe", help="transcribe an audio file offline")
    t.add_argument("file", help="audio file: WAV, FLAC, MP3, M4A, OGG, WebM... (decoded with PyAV)")
    t.add_argument("--model", default="tiny.en", help="tiny.en (default), base, or a local model path")
    t.add_argument("--language", default=None, help="language code; default: detect (multilingual models)")
    t.add_argument("--task", default="transcribe", choices=TASKS)
    t.add_argument("--beam-size", type=int, default=5)
    t.add_argument("--word-timestamps", action="store_true", help="add word timings (json, srt, vtt)")
    t.add_argument("--prompt", default=None, help="initial prompt: names, jargon, spelling")
    t.add_argument("--diarize", action="store_true",
                   help="label who speaks: [SPEAKER 1] in txt and srt, <v Speaker 1> in vtt, speaker (from 0) in "
                        f"json; needs: {SPEAKER_ENCODER_INSTALL}")
    t.add_argument("--format", default="txt", choices=FORMATS)
    t.add_argument("--output", "-o", default=None, help="write here instead of stdout")
    t.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    t.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16", "int8"),
                   help="weights and activations (default: float32 on CPU, float16 on CUDA); int8: CPU only, "
                        "float32 weights whose products run quantized to int8")
    t.add_argument("--threads", type=int, default=None, help="torch threads (default: CPU count, max 4)")
    t.set_defaults(run=_transcribe)
    s = sub.add_parser("serve", help="run the streaming WebSocket server (protocol: docs/protocol.md)")
    s.add_argument("--model", default="tiny.en", help="tiny.en (default), base, or a local model path")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=8765, help="port (default: 8765; 0 picks a free one)")
    s.add_argument("--max-streams", type=int, default=8, help="concurrent streams (default: 8)")
    s.add_argument("--max-message-bytes", type=int, default=1 << 20, help="largest message (default: 1 MiB)")
    s.add_argument("--idle-timeout", type=float, default=30.0, help="seconds without a message (0: never)")
    s.add_argument("--token", default=None, help="require this bearer token (header or ?token=)")
    s.add_argument("--allow-origin", action="append", help="allowed browser Origin (repeatable; default: any)")
    s.add_argument("--max-utilization", type=float, default=0.8,
                   help="refuse new streams (overloaded) when the measured inference load with one more would "
                        "exceed this share of the workers' time (default: 0.8; 0: off)")
    s.add_argument("--max-upload-mb", type=float, default=25.0,
                   help="largest file the REST APIs accept, in MB (default: 25, as OpenAI's); larger ones get 413")
    s.add_argument("--drain-seconds", type=float, default=10.0, help="on SIGTERM, time to finish open streams")
    s.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="inference worker threads (default: 2, or 1 on a single CPU)")
    s.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker (default: CPU count / workers, at most 4)")
    s.add_argument("--max-batch", type=int, default=8, help="window decodes per batched pass (default: 8)")
    s.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="wait this long for more requests to batch (default: 5)")
    s.add_argument("--shed-after-ms", type=float, default=100.0,
                   help="a final decode that waited longer than this for a worker (overload) runs with the short "
                        "audio context of interim decodes, about a third of the encoder's work (default: 100; "
                        "0: never)")
    s.add_argument("--heap-trim-seconds", type=float, default=1.0,
                   help="while inference runs, return freed memory to the system this often (default: 1; 0: off)")
    s.add_argument("--worker-processes", action=argparse.BooleanOptionalAction, default=False,
                   help="run each inference worker in a child process of its own, with its own copy of the model, "
                        "so that decodes do not share Python's interpreter lock with each other or with the "
                        "network code (CPU only; default: off, workers are threads)")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    s.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16", "int8"),
                   help="weights and activations (default auto: float16 on CUDA; on CPU bfloat16 where the CPU has "
                        "AMX or AVX-512 BF16, about 40%% less CPU per stream, else float32; int8: CPU only, the "
                        "products quantized to int8)")
    s.add_argument("--wyoming-uri", default=None, metavar="tcp://HOST:PORT",
                   help="also serve speech-to-text over the Wyoming protocol (Home Assistant, Rhasspy) here, "
                        "e.g. tcp://0.0.0.0:10300; shares the model and the stream limits (docs/wyoming.md)")
    s.add_argument("--wyoming-zeroconf", nargs="?", const="", default=None, metavar="NAME",
                   help="announce the Wyoming service over mDNS (zeroconf) for Home Assistant to discover, as NAME "
                        "(default: whisper-stream-HOSTNAME); needs: pip install zeroconf")
    s.add_argument("--port-file", default=None, metavar="PATH",
                   help="once listening, write the bound addresses here as JSON (host, port, url, wyoming_port): "
                        "for scripts and tests that start the server on port 0")
    s.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    s.set_defaults(run=_serve)
    return parser


async def run_server(engine: Any, config: ServerConfig, stop: asyncio.Event | None = None,
                     runner: Runner | None = None, wyoming_uri: str | None = None,
                     wyoming_zeroconf: str | None = None, port_file: str | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set), then drain for ``config.drain_seconds``; returns 0.
    ``wyoming_uri`` also serves the Wyoming protocol there (:mod:`streaming.wyoming`), ``wyoming_zeroconf``
    announces it under that name (``""``: the default); ``port_file`` receives the bound addresses as JSON."""
    from .server import Server

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        async with Server(engine, config, runner) as server, contextlib.AsyncExitStack() as services:
            wyoming = None
            if wyoming_uri is not None:
                from .wyoming import WyomingService

                wyoming = await services.enter_async_context(WyomingService(server, wyoming_uri, wyoming_zeroconf))
            if port_file:
                _write_json(port_file, {"host": config.host, "port": server.port, "url": server.url,
                                        "wyoming_port": wyoming.port if wyoming else None})
            await stop.wait()
            log.info("shutting down: draining %d open stream(s) (up to %g s)", server.active_streams,
                     config.drain_seconds)
            await server.drain(config.drain_seconds)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    log.info("stopped")
    return 0


def _serve(args: argparse.Namespace) -> int:
    """``whisper-stream serve``: load the model once and run the server until a signal."""
    from .engine import Engine, configure_threads
    from .engine.weights import ModelLoadError, choose_device
    from .server import ServerConfig

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level.upper() != "DEBUG":
        logging.getLogger("websockets").setLevel(logging.WARNING)
    try:
        config = ServerConfig(host=args.host, port=args.port, max_streams=args.max_streams,
                              max_message_bytes=args.max_message_bytes, idle_timeout=args.idle_timeout,
                              token=args.token, allow_origins=tuple(args.allow_origin or ()),
                              drain_seconds=args.drain_seconds, max_batch=args.max_batch,
                              max_wait_ms=args.max_wait_ms, workers=args.workers,
                              max_utilization=args.max_utilization, heap_trim_seconds=args.heap_trim_seconds,
                              shed_after_ms=args.shed_after_ms, max_upload_mb=args.max_upload_mb)
        if args.wyoming_uri is not None:
            from .wyoming import check_zeroconf, parse_uri

            parse_uri(args.wyoming_uri)
            if args.wyoming_zeroconf is not None:
                check_zeroconf()
        elif args.wyoming_zeroconf is not None:
            raise ValueError("--wyoming-zeroconf announces the Wyoming service: add --wyoming-uri tcp://HOST:PORT")
    except (ValueError, RuntimeError) as exc:
        print(f"whisper-stream: {exc}", file=sys.stderr)
        return 2
    torch_threads = configure_threads(args.threads or max(1, min(os.cpu_count() or 1, 4) // config.workers))
    try:
        device = choose_device(args.device)
    except ModelLoadError as exc:
        print(f"whisper-stream: {exc}", file=sys.stderr)
        return 2
    if args.worker_processes and device.type != "cpu":
        print("whisper-stream: --worker-processes runs on CPU only; drop it or --device", file=sys.stderr)
        return 2
    runner = None
    try:
        if args.worker_processes:
            from .workers import ProcessRunner

            runner = ProcessRunner(args.model, args.dtype, config.workers,
                                   threads=torch_threads, heap_trim_seconds=config.heap_trim_seconds)
            log.info("model loaded in %d inference processes (pids %s)", config.workers,
                     " ".join(map(str, runner.pids)))
            engine = runner.engine
        else:
            engine = Engine.load(args.model, device=str(device), dtype=args.dtype)
    except (ModelLoadError, RuntimeError) as exc:
        print(f"whisper-stream: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(run_server(engine, config, runner=runner, wyoming_uri=args.wyoming_uri,
                                      wyoming_zeroconf=args.wyoming_zeroconf, port_file=args.port_file))
    except OSError as exc:
        print(f"whisper-stream: cannot listen: {exc}", file=sys.stderr)
        return 2


def _write_json(path: str, data: dict) -> None:
    """Write ``data`` to ``path`` whole or not at all: a reader polling for the file never sees half of it."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
