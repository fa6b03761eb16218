"""Stream an audio file to a whisper-stream server, show live captions, write the transcript.

Captions go to stderr; the transcript goes to stdout or --output. Exit status: 0 done, 1 server or
connection error, 2 bad usage or unreadable file.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from streaming.audiofile import read_audio
from streaming.client import DEFAULT_URL, stream_audio
from streaming.core.audio import AudioFormatError
from streaming.formats import FORMATS

from .captions import Captions

PROG = "whisper-stream-file"


def _speed(value: str) -> float:
    try:
        speed = float(value)
    except ValueError:
        speed = -1.0
    if not speed >= 0 or speed == float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} is not a speed: use 1 for real time, N for N times faster, "
                                         "0 for as fast as possible")
    return speed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="audio file: WAV, FLAC, MP3, M4A, OGG, WebM... (decoded with PyAV)")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server stream endpoint (default: {DEFAULT_URL})")
    parser.add_argument("--speed", type=_speed, default=1.0,
                        help="1 = real time (default), N = N times faster, 0 = as fast as possible")
    parser.add_argument("--token", default=os.environ.get("WHISPER_STREAM_TOKEN"),
                        help="access token, if the server needs one (default: $WHISPER_STREAM_TOKEN)")
    parser.add_argument("--language", default=None, help="language code such as 'en' (default: server decides)")
    parser.add_argument("--format", default="txt", choices=FORMATS, help="transcript format (default: txt)")
    parser.add_argument("--output", "-o", default=None, help="write the transcript here instead of stdout")
    parser.add_argument("--no-interim", action="store_true", help="ask for final results only (no partials)")
    return parser


def start_options(args: argparse.Namespace) -> dict:
    """The ``start`` message fields the arguments ask for."""
    options: dict = {"word_timestamps": args.format == "json"}
    if args.language:
        options["language"] = args.language
    if args.no_interim:
        options["interim_results"] = False
    return options


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.output and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        print(f"{PROG}: cannot write {args.output}: its directory does not exist", file=sys.stderr)
        return 2
    try:
        audio = read_audio(args.file)
    except (OSError, AudioFormatError) as exc:
        print(f"{PROG}: cannot read {args.file}: {exc}", file=sys.stderr)
        return 2
    captions = Captions()
    status, transcript = captions.run(PROG, lambda: asyncio.run(stream_audio(
        args.url, audio, speed=args.speed, token=args.token, start_options=start_options(args), on_event=captions)))
    if transcript is None:
        return status
    output = transcript.render(args.format)
    if args.output is None:
        sys.stdout.write(output)
        return 0
    try:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(output)
    except OSError as exc:
        print(f"{PROG}: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
