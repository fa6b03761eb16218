"""Wyoming speech-to-text service beside the WebSocket API, for Home Assistant Assist and Rhasspy.

Wyoming carries JSON-line events with optional binary payloads over TCP (docs/wyoming.md). This module is
a thin adapter: each command (``audio-start`` .. ``audio-stop``) runs a :class:`streaming.core.session.Session`
on the server's scheduler and counts as one stream for the server's admission, metrics and draining. Its
finals go out as ``transcript-chunk`` events as they commit; ``audio-stop`` ends the session, so the last
utterance's final decode starts at once (or is already running, when the voice-activity detector ended it
earlier), and ``transcript-stop`` and ``transcript`` (all finals) follow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any
from urllib.parse import urlsplit

from wyoming.asr import Transcribe, Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event, async_write_event
from wyoming.info import AsrModel, AsrProgram, Attribution, Describe, Info
from wyoming.ping import Ping, Pong

from . import __version__
from .core.audio import INTEGER_ENCODINGS
from .core.languages import LANGUAGES
from .core.session import NORMAL, Action, Close, Run, Send, Session, load_json
from .server import Server

log = logging.getLogger(__name__)

DEFAULT_PORT = 10300  # the Wyoming convention for speech-to-text
PROGRAM = "whisper-stream"
MAX_HEADER_BYTES = 64 * 1024  # an event's JSON header line
LINGER_SECONDS = 1.0
# A voice command ends at a pause: its final decode starts after this much non-speech, before audio-stop
# (VadConfig.pause_ms), so that the transcript is ready when the client says the command is over.
COMMAND_PAUSE_MS = 90
# ... and encodes the command with silence up to 10 s rather than Whisper's 30 s window: half the time to the
# transcript, for no measured loss on commands (a command's final decode has no previous text to copy).
COMMAND_FINAL_CONTEXT = 10.0
ZEROCONF_TYPE = "_wyoming._tcp.local."
ZEROCONF_INSTALL = "pip install zeroconf (or: pip install 'whisper-stream[wyoming]')"
# Session end reasons after which the audio received is transcribed and answered with a transcript.
_ANSWERED = ("stop", "shutdown", "idle_timeout")


class _BadEvent(Exception):
    """Input that breaks the event framing: reported with ``code``, then the connection is closed."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def parse_uri(uri: str) -> tuple[str, int]:
    """``tcp://HOST:PORT`` as (host, port); ValueError naming the expected form otherwise."""
    example = f"e.g. tcp://0.0.0.0:{DEFAULT_PORT} (all interfaces) or tcp://127.0.0.1:{DEFAULT_PORT}"
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"Wyoming URI {uri!r} is invalid ({exc}); use tcp://HOST:PORT, {example}") from None
    if parts.scheme != "tcp" or not parts.hostname or port is None or parts.path not in ("", "/"):
        raise ValueError(f"Wyoming URI {uri!r} is not tcp://HOST:PORT; use {example}")
    return parts.hostname, port


def check_zeroconf() -> None:
    """Raise RuntimeError naming the install command when the ``zeroconf`` package is missing."""
    try:
        import zeroconf  # noqa: F401
    except ImportError:
        raise RuntimeError(f"--wyoming-zeroconf needs the zeroconf package: {ZEROCONF_INSTALL}") from None


async def _read_event(reader: asyncio.StreamReader, max_bytes: int) -> Event | None:
    """The next event, or None when the client has gone. :func:`wyoming.event.async_read_event` takes any
    length a client declares and reads malformed input as the end of the stream; this bounds the data and
    the payload by ``max_bytes`` and raises :class:`_BadEvent` for what it cannot frame."""
    try:
        line = await reader.readline()
    except ValueError:  # asyncio's LimitOverrunError: no newline within the reader's limit
        raise _BadEvent("bad_event", f"event header longer than {MAX_HEADER_BYTES} bytes; send one JSON object "
                                     "per line, with audio in the payload") from None
    if not line.endswith(b"\n"):
        return None  # the connection closed, possibly within a line
    try:
        header = load_json(line)
    except ValueError:
        raise _BadEvent("bad_event", 'event header is not JSON; send one JSON object per line, e.g. '
                                     '{"type": "describe"}') from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise _BadEvent("bad_event", 'event header must be a JSON object with a string "type"')
    data = header.get("data") or {}
    lengths = [header.get("data_length") or 0, header.get("payload_length") or 0]
    if not isinstance(data, dict) or not all(isinstance(n, int) and n >= 0 for n in lengths):
        raise _BadEvent("bad_event", '"data" must be an object, "data_length" and "payload_length" counts of bytes')
    if max(lengths) > max_bytes:
        raise _BadEvent("frame_too_large", f"event of {max(lengths)} bytes exceeds the {max_bytes}-byte limit; send "
                                           "smaller audio chunks (e.g. 100 ms each)")
    try:
        if lengths[0]:
            extra = load_json(await reader.readexactly(lengths[0]))
            if not isinstance(extra, dict):
                raise _BadEvent("bad_event", "event data after the header must be a JSON object")
            data = {**data, **extra}
        payload = await reader.readexactly(lengths[1]) if lengths[1] else None
    except asyncio.IncompleteReadError:
        return None
    except ValueError:
        raise _BadEvent("bad_event", "event data after the header is not JSON") from None
    return Event(header["type"], data, payload)


def describe(server: Server) -> Info:
    """The ``info`` answer: one speech-to-text program with the server's model and its languages."""
    model = server.info.model
    languages = list(LANGUAGES) if server.info.multilingual else ["en"]
    whisper = Attribution(name="OpenAI", url="https://github.com/openai/whisper")
    return Info(asr=[AsrProgram(
        name=PROGRAM, attribution=Attribution(name=PROGRAM, url=""), installed=True, version=__version__,
        description="Real-time streaming Whisper speech recognition", supports_transcript_streaming=True,
        models=[AsrModel(name=model, attribution=whisper, installed=True, description=f"Whisper {model}",
                         version=None, languages=languages)])])


def _audio_format(data: dict[str, Any], default: tuple = (None, None, None)) -> tuple:
    """An audio event's (rate, width, channels), ``default`` where a field is missing."""
    return tuple(data.get(key, fallback) for key, fallback in zip(("rate", "width", "channels"), default))


def _language(value: object) -> object:
    """A language tag as Whisper knows it: ``en-US`` -> ``en``; anything else is left for the session to judge."""
    return value.replace("_", "-").split("-")[0].lower() if isinstance(value, str) else value


class _Command:
    """One command, ``audio-start`` to ``transcript``: a session on the server's scheduler."""

    def __init__(self, connection: _Connection, session: Session, audio_format: tuple):
        self.connection, self.session, self.format = connection, session, audio_format
        self.finals: list[str] = []
        self.decodes: set[asyncio.Task] = set()
        self.streaming = False  # transcript-start sent
        self.over = False  # the session closed, or the client left

    def drain(self) -> None:
        self.apply(self.session.drain())

    def apply(self, actions: list[Action]) -> None:
        """Start decodes and send the session's messages as Wyoming events, in order (never blocks)."""
        for action in actions:
            if self.over:
                return
            if isinstance(action, Run):
                task = asyncio.create_task(self._decode(action))
                self.decodes.add(task)
                task.add_done_callback(self.decodes.discard)
            elif isinstance(action, Send):
                self._send(action.message)
            else:
                self.connection.command_ended(self, action)

    def _send(self, message: dict[str, Any]) -> None:
        kind, send = message["type"], self.connection.send
        if kind == "final":
            self._start_transcript()
            self.finals.append(message["text"])
            send(TranscriptChunk(text=message["text"]).event())
        elif kind == "error":
            self.connection.error(message["code"], message["message"])
        elif kind == "done" and message["reason"] in _ANSWERED:
            self._start_transcript()
            send(TranscriptStop().event())
            send(Transcript(text="".join(self.finals).strip(), language=message["language"]).event())

    def _start_transcript(self) -> None:
        if not self.streaming:
            self.streaming = True
            self.connection.send(TranscriptStart(language=self.session.language).event())

    async def _decode(self, run: Run) -> None:
        try:
            result: Any = await self.connection.service.server.scheduler.submit(run.request)
        except Exception as exc:  # noqa: BLE001 - the session reports it to the client
            result = exc
        try:
            self.apply(self.session.complete(run.request, result))
        except Exception:
            self.connection.crash()
        self.connection.progress.set()

    def abandon(self) -> None:
        """The client left: drop the queued decodes."""
        self.over = True
        for task in self.decodes:
            task.cancel()


class _Connection:
    """One Wyoming client: reads events, runs its commands one after another, writes events in order."""

    def __init__(self, service: WyomingService, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.service, self.reader, self.writer = service, reader, writer
        address = writer.get_extra_info("peername")
        self.peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
        self.task = asyncio.current_task()
        self.outbox: asyncio.Queue[Event | None] = asyncio.Queue()
        self.closing = asyncio.Event()  # stop reading: the connection closes once the outbox is sent
        self.progress = asyncio.Event()  # a decode finished: a reader paused by the backlog may go on
        self.command: _Command | None = None
        self.language: object = None  # from the last transcribe, for the next command

    def send(self, event: Event) -> None:
        self.outbox.put_nowait(event)

    def error(self, code: str, message: str) -> None:
        self.service.server.metrics.count_error(code)
        log.debug("wyoming %s: error %s: %s", self.peer, code, message)
        self.send(Error(text=message, code=code).event())

    def crash(self) -> None:
        """An internal error: report it without details and close the connection (other clients go on)."""
        log.exception("wyoming %s: internal error", self.peer)
        self.error("internal", "internal server error (logged on the server); reconnect to try again")
        self.closing.set()

    async def run(self) -> None:
        writing = asyncio.create_task(self._write())
        reading = asyncio.create_task(self._read())
        closing = asyncio.create_task(self.closing.wait())
        try:
            await asyncio.wait({reading, closing}, return_when=asyncio.FIRST_COMPLETED)
            if reading.done() and reading.exception() is not None:
                raise reading.exception()
            command = self.command
            if reading.done() and command is not None and command.session.state == "ending":
                await closing  # audio-stop came before the client stopped sending: answer it
        finally:
            reading.cancel()
            closing.cancel()
            if self.command is not None:
                self.command.abandon()
                self._end(self.command, "client left")
            self.outbox.put_nowait(None)
            try:  # a client that does not read gets drain_seconds to take what is queued for it
                await asyncio.wait_for(writing, self.service.server.config.drain_seconds or None)
            except asyncio.TimeoutError:
                self.writer.transport.abort()
            else:
                await self._linger()
                self.writer.close()

    async def _linger(self) -> None:
        """Say goodbye (FIN) and read what the client still sends for up to ``LINGER_SECONDS``: closing with
        unread input resets the connection, which can cost the client the last events sent to it."""
        with contextlib.suppress(OSError, ValueError, asyncio.TimeoutError):
            if self.writer.can_write_eof():
                self.writer.write_eof()
            async with asyncio.timeout(LINGER_SECONDS):
                while await self.reader.read(1 << 16):
                    pass

    async def _write(self) -> None:
        with contextlib.suppress(ConnectionError):
            while (event := await self.outbox.get()) is not None:
                await async_write_event(event, self.writer)

    async def _read(self) -> None:
        config = self.service.server.config
        while not self.closing.is_set():
            while self.command is not None and self.command.session.backlogged()[0]:
                self.progress.clear()
                await self.progress.wait()  # TCP holds the client back until the decode catches up
            try:
                event = await asyncio.wait_for(_read_event(self.reader, config.max_message_bytes),
                                               config.idle_timeout or None)
            except asyncio.TimeoutError:
                if self.command is not None and self.command.session.state == "streaming":
                    self.command.apply(self.command.session.timed_out(config.idle_timeout))
                return
            except _BadEvent as bad:
                self.error(bad.code, str(bad))
                return
            except ConnectionError:
                return
            if event is None or self.closing.is_set():  # closing while the read waited: the rest is unread
                return
            try:
                self._dispatch(event)
            except Exception:
                self.crash()

    def _dispatch(self, event: Event) -> None:
        kind, command = event.type, self.command
        if AudioChunk.is_type(kind):
            if command is None:
                self.error("audio_before_start", "audio-chunk outside a command: send audio-start first")
                return
            audio_format = _audio_format(event.data, command.format)
            if audio_format != command.format:
                self.error("format_changed", f"audio-chunk format (rate, width, channels) {audio_format} differs "
                                             f"from audio-start's {command.format}: chunk dropped; keep one format "
                                             "per command")
                return
            before = command.session.audio_seconds
            command.apply(command.session.receive_bytes(event.payload or b""))
            self.service.server.metrics.add_audio(command.session.audio_seconds - before)
        elif AudioStop.is_type(kind):
            if command is None:
                self.error("audio_before_start", "audio-stop outside a command: send audio-start first")
            elif command.session.state != "streaming":
                self.error("command_ending", "audio-stop again: the command is ending; wait for its transcript")
            else:
                command.apply(command.session.receive({"type": "stop"}))
        elif AudioStart.is_type(kind):
            self._audio_start(event.data)
        elif Transcribe.is_type(kind):
            request = Transcribe.from_event(event)
            if request.name not in (None, PROGRAM, self.service.server.info.model):
                log.info("wyoming %s: transcribe asks for model %r; serving %s", self.peer, request.name,
                         self.service.server.info.model)
            self.language = _language(request.language)
        elif Describe.is_type(kind):
            self.send(self.service.info.event())
        elif Ping.is_type(kind):
            self.send(Pong(text=Ping.from_event(event).text).event())
        else:
            self.error("unknown_event", f"event type {kind!r} is not handled here; a speech-to-text client sends "
                                        "describe, transcribe, audio-start, audio-chunk and audio-stop")

    def _audio_start(self, data: dict[str, Any]) -> None:
        if self.command is not None:
            self.error("command_open", "audio-start while a command is open; send audio-stop and wait for its "
                                       "transcript first")
            return
        rate, width, channels = _audio_format(data)
        encoding = INTEGER_ENCODINGS.get(width) if isinstance(width, int) else None
        if encoding is None:
            self.error("unsupported_format", f"unsupported sample width {width!r}: use 1, 2, 3 or 4 bytes "
                                             "(8- to 32-bit integer PCM; 2 is usual)")
            self.closing.set()
            return
        server = self.service.server
        refusal = server.admit(self.peer)
        if refusal is not None:
            self.send(Error(text=refusal[1], code=refusal[0]).event())
            self.closing.set()
            return
        session = Session(server.info, max_message_bytes=server.config.max_message_bytes)
        self.command = _Command(self, session, (rate, width, channels))
        assert self.task is not None
        server.open_stream(self.task, self.command)
        log.info("wyoming %s: command %s started", self.peer, session.id)
        start = {"type": "start", "sample_rate": rate, "encoding": encoding, "channels": channels,
                 "language": self.language, "word_timestamps": False, "vad": {"pause_ms": COMMAND_PAUSE_MS},
                 "final_context": COMMAND_FINAL_CONTEXT}
        self.command.apply(session.receive(start))

    def command_ended(self, command: _Command, close: Close) -> None:
        """The command's session closed: free its stream; close the connection unless it ended normally."""
        command.over = True
        self._end(command, "ended" if close.code == NORMAL else f"ended ({close.reason})")
        if close.code != NORMAL:
            self.closing.set()

    def _end(self, command: _Command, outcome: str) -> None:
        if self.command is not command:
            return
        self.command = None
        assert self.task is not None
        self.service.server.close_stream(self.task)
        session = command.session
        log.info("wyoming %s: command %s %s after %.1f s of audio, %d finals", self.peer, session.id, outcome,
                 session.audio_seconds, session.stats["finals"])


class WyomingService:
    """Wyoming speech-to-text on ``tcp://HOST:PORT`` for a started :class:`Server`, sharing its model,
    scheduler, admission and metrics: ``async with WyomingService(server, uri) as service: service.port``.
    ``zeroconf_name`` announces it over mDNS (``""``: the default name) for Home Assistant to discover."""

    def __init__(self, server: Server, uri: str, zeroconf_name: str | None = None):
        self.server = server
        self.host, self._port = parse_uri(uri)
        self.zeroconf_name = zeroconf_name
        self.info = describe(server)
        self._listener: asyncio.Server | None = None
        self._connections: dict[asyncio.Task, _Connection] = {}
        self._zeroconf: Any = None

    @property
    def port(self) -> int:
        """The bound port (URI port 0: a free one)."""
        if self._listener is None:
            raise RuntimeError("the Wyoming service is not started; call start() first")
        return self._listener.sockets[0].getsockname()[1]

    async def start(self) -> None:
        """Listen, and announce the service when asked to."""
        try:
            self._listener = await asyncio.start_server(self._accept, self.host, self._port,
                                                        limit=MAX_HEADER_BYTES)
        except OSError as exc:
            raise OSError(f"Wyoming on tcp://{self.host}:{self._port}: {exc.strerror or exc}; free the port or "
                          "choose another with --wyoming-uri") from None
        log.info("Wyoming speech-to-text on tcp://%s:%d (model %s)", self.host, self.port, self.server.info.model)
        if self.zeroconf_name is not None:
            await self._announce()

    async def close(self) -> None:
        """Stop announcing and listening; close every connection."""
        if self._zeroconf is not None:
            await self._zeroconf.async_unregister_all_services()
            await self._zeroconf.async_close()
        if self._listener is not None:
            self._listener.close()
        for connection in self._connections.values():
            connection.closing.set()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def __aenter__(self) -> WyomingService:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        connection = self._connections[task] = _Connection(self, reader, writer)
        try:
            await connection.run()
        except Exception:
            log.exception("Wyoming connection handler failed")
            writer.transport.abort()
        finally:
            del self._connections[task]

    async def _announce(self) -> None:
        check_zeroconf()
        from zeroconf import ServiceInfo
        from zeroconf.asyncio import AsyncZeroconf

        name = self.zeroconf_name or f"{PROGRAM}-{socket.gethostname()}"
        address = _lan_address(self.host)
        info = ServiceInfo(ZEROCONF_TYPE, f"{name}.{ZEROCONF_TYPE}", addresses=[socket.inet_aton(address)],
                           port=self.port)
        self._zeroconf = AsyncZeroconf()
        await self._zeroconf.async_register_service(info, allow_name_change=True)
        log.info("announced over mDNS as %r (%s:%d)", info.name, address, self.port)


def _lan_address(host: str) -> str:
    """The IPv4 address to announce: ``host``'s, or for a wildcard host the one that reaches the mDNS group."""
    try:
        if host not in ("0.0.0.0", "::"):
            return socket.gethostbyname(host)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("224.0.0.251", 5353))  # the mDNS group; connecting a UDP socket sends nothing
            return probe.getsockname()[0]
    except OSError as exc:
        raise OSError(f"cannot find the IPv4 address of {host!r} to announce over mDNS ({exc}); listen on the "
                      "address Home Assistant should use: --wyoming-uri tcp://ADDRESS:PORT") from None
