"""Live captions from a microphone through a whisper-stream server.

Records at the input device's native rate (the server resamples), shows captions on stderr and, after
Ctrl-C, prints the transcript to stdout. Exit status: 0 done, 1 server or connection error, 2 bad usage
or no usable audio input.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any

from streaming.client import DEFAULT_URL, stream_audio
from streaming.formats import FORMATS

from .captions import Captions

PROG = "whisper-stream-mic"
BLOCK_SECONDS = 0.02
INSTALL_HINT = ("install the microphone extra: pip install 'whisper-stream[mic]' "
                "(and the PortAudio library, e.g. apt install libportaudio2)")


class AudioInputError(Exception):
    """No usable audio input; the message names the cause and the fix."""


def load_sounddevice() -> ModuleType:
    """Import ``sounddevice`` (optional dependency), or explain how to install it."""
    try:
        return importlib.import_module("sounddevice")
    except (ImportError, OSError) as exc:  # OSError: sounddevice is there, the PortAudio library is not
        raise AudioInputError(f"cannot use the microphone ({exc}): {INSTALL_HINT}") from None


def _device(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list-devices", action="store_true", help="list audio devices and exit")
    parser.add_argument("--device", type=_device, default=None,
                        help="input device: index or part of its name (default: the system default input)")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server stream endpoint (default: {DEFAULT_URL})")
    parser.add_argument("--token", default=os.environ.get("WHISPER_STREAM_TOKEN"),
                        help="access token, if the server needs one (default: $WHISPER_STREAM_TOKEN)")
    parser.add_argument("--language", default=None, help="language code such as 'en' (default: server decides)")
    parser.add_argument("--format", default="txt", choices=FORMATS, help="transcript format (default: txt)")
    return parser


def input_rate(sd: ModuleType, device: int | str | None) -> int:
    """The native sample rate of the input ``device`` (None: the default input)."""
    try:
        info = sd.query_devices(device, "input")
    except (ValueError, sd.PortAudioError) as exc:
        which = f"input device {device!r}" if device is not None else "a default input device"
        raise AudioInputError(f"cannot find {which} ({exc}); connect a microphone, list devices with "
                              "--list-devices and pick one with --device") from None
    return int(info["default_samplerate"])


async def microphone(sd: ModuleType, device: int | str | None, rate: int, stop: asyncio.Event) -> AsyncIterator[bytes]:
    """float32 mono PCM blocks from the input device until ``stop`` is set."""
    loop = asyncio.get_running_loop()
    blocks: asyncio.Queue[bytes] = asyncio.Queue()

    def callback(indata: Any, frames: int, time: Any, status: Any) -> None:
        loop.call_soon_threadsafe(blocks.put_nowait, indata.astype("<f4").tobytes())

    try:
        stream = sd.InputStream(samplerate=rate, blocksize=round(rate * BLOCK_SECONDS), device=device, channels=1,
                                dtype="float32", callback=callback)
        stream.start()
    except (ValueError, sd.PortAudioError) as exc:
        raise AudioInputError(f"cannot open the input device ({exc}); list devices with --list-devices and pick "
                              "one with --device") from None
    stopped = asyncio.create_task(stop.wait())
    try:
        while True:
            block = asyncio.create_task(blocks.get())
            await asyncio.wait({block, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not block.done():
                block.cancel()
                break
            yield block.result()
    finally:
        stopped.cancel()
        stream.stop()
        stream.close()
    while not blocks.empty():  # what the device delivered before it stopped
        yield blocks.get_nowait()


async def listen(args: argparse.Namespace, sd: ModuleType, captions: Captions, stop: asyncio.Event) -> str:
    """Caption the microphone until ``stop`` is set; returns the transcript in ``args.format``."""
    rate = input_rate(sd, args.device)
    options: dict[str, Any] = {"sample_rate": rate, "encoding": "pcm_f32le", "channels": 1,
                               "word_timestamps": args.format == "json"}
    if args.language:
        options["language"] = args.language
    captions.notice(f"listening at {rate} Hz; press Ctrl-C to stop")
    transcript = await stream_audio(args.url, microphone(sd, args.device, rate, stop), speed=0, token=args.token,
                                    start_options=options, on_event=captions)
    return transcript.render(args.format)


async def _run(args: argparse.Namespace, sd: ModuleType, captions: Captions) -> str:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def stopping() -> None:
        captions.notice("stopping: finishing the transcript (Ctrl-C again to quit now)")
        stop.set()

    def first_interrupt(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, previous)  # a second Ctrl-C interrupts as usual
        loop.call_soon_threadsafe(stopping)

    previous = signal.signal(signal.SIGINT, first_interrupt)
    try:
        return await listen(args, sd, captions, stop)
    finally:
        signal.signal(signal.SIGINT, previous)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    captions = Captions()
    try:
        sd = load_sounddevice()
        if args.list_devices:
            print(sd.query_devices())
            return 0
        status, output = captions.run(PROG, lambda: asyncio.run(_run(args, sd, captions)),
                                      interrupted="interrupted before the transcript was complete")
    except AudioInputError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    if output is not None:
        sys.stdout.write(output)
    return status

if __name__ == "__main__":
    sys.exit(main())
