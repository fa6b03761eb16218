"""The WebSocket server: adapts protocol sessions to websockets, shares one model through the scheduler.

One port serves the stream endpoint (``/v1/listen``) and plain HTTP: ``/healthz`` (readiness: 503 while
draining or full), ``/livez`` (liveness), ``/metrics`` and the browser client at ``/``. ``Server`` is the
embeddable object (tests start it on port 0); ``run_server`` adds signal handling and draining for the
``whisper-stream serve`` command.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import http
import json
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from . import __version__
from .admission import Admission
from .core.session import (
    DEFAULT_MAX_MESSAGE_BYTES,
    INTERNAL_ERROR,
    PATH,
    TRY_AGAIN_LATER,
    Action,
    Close,
    EngineInfo,
    Run,
    Send,
    Session,
    error_message,
    refusal,
    warning_message,
)
from .engine import speaker
from .heap import HeapTrimmer
from .metrics import Metrics
from .scheduler import Runner, Scheduler

log = logging.getLogger(__name__)

# Stop reading a client's audio while this much has arrived during one decode (TCP backpressure).
MAX_BACKLOG_SECONDS = 10.0
# Messages queued for a client that does not read them: past LAG_MESSAGES partials are dropped (finals
# never); past MAX_OUTBOX the server also stops reading the client's audio until the queue drains.
LAG_MESSAGES = 16
MAX_OUTBOX = 256
# The browser client ships in the sibling `clients` package (installed beside `streaming`).
INDEX_PATHS = (Path(__file__).resolve().parent.parent / "clients" / "web" / "index.html",)
PLACEHOLDER_PAGE = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>whisper-stream</title></head>
<body><h1>whisper-stream {__version__}</h1>
<p>The browser client is not installed. Stream audio over a WebSocket to <code>{PATH}</code>
(see docs/protocol.md); health at <a href="/healthz">/healthz</a>, metrics at <a href="/metrics">/metrics</a>.</p>
</body></html>
"""


@dataclass(frozen=True)
class ServerConfig:
    """Server settings; ``idle_timeout`` 0 disables it, ``allow_origins`` empty allows every origin."""

    host: str = "127.0.0.1"
    port: int = 8765
    max_streams: int = 8
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    idle_timeout: float = 30.0
    token: str | None = None
    allow_origins: tuple[str, ...] = ()
    drain_seconds: float = 10.0
    max_batch: int = 8
    max_wait_ms: float = 5.0
    workers: int = 1
    max_utilization: float = 0.8  # 0: no admission control beyond max_streams
    heap_trim_seconds: float = 1.0  # 0: never return freed C heap memory to the system (see streaming.heap)
    shed_after_ms: float = 100.0  # 0: final decodes always get the full context (see streaming.scheduler)

    def __post_init__(self) -> None:
        if self.max_streams < 1:
            raise ValueError(f"max_streams={self.max_streams} is invalid; use 1 or more")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes={self.max_message_bytes} is too small; use at least 1024")
        if self.idle_timeout < 0 or self.drain_seconds < 0:
            raise ValueError("idle_timeout and drain_seconds must be >= 0 seconds")
        if not 0 <= self.max_utilization <= 1:
            raise ValueError(f"max_utilization={self.max_utilization} is out of range; allowed: 0 (off) to 1")
        if not 1 <= self.workers <= 16:
            raise ValueError(f"workers={self.workers} is out of range; allowed: 1 to 16")
        if self.max_batch < 1 or not 0 <= self.max_wait_ms <= 1000:
            raise ValueError("max_batch must be >= 1 and max_wait_ms from 0 to 1000")
        if not 0 <= self.shed_after_ms <= 60_000:
            raise ValueError(f"shed_after_ms={self.shed_after_ms} is out of range; allowed: 0 (never) to 60000")
        if not 0 <= self.heap_trim_seconds <= 3600:
            raise ValueError(f"heap_trim_seconds={self.heap_trim_seconds} is out of range; allowed: 0 (off) to 3600")
        if self.token is not None and not self.token:
            raise ValueError("token is empty; pass a non-empty token or none to disable authentication")


class RefusalLog:
    """Logs refused streams without flooding: the first refusal of each code at once, later ones at most
    every ``interval`` seconds, each report counting those it held back. Behind a load balancer that
    retries, sustained overload would otherwise log a line per retry."""

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def refused(self, code: str, detail: str) -> None:
        now = self._clock()
        if code in self._last and now - self._last[code] < self.interval:
            self._held[code] = self._held.get(code, 0) + 1
            return
        held = self._held.pop(code, 0)
        more = f" ({held} more refused since the last report)" if held else ""
        self._last[code] = now
        log.warning("refused a stream (%s): %s%s", code, detail, more)


class Stream(Protocol):
    """An open stream of any wire protocol, as the server tracks it for admission and draining."""

    session: Session

    def apply(self, actions: list[Action]) -> None:
        """Carry out the session's actions (queue messages, start decodes) without blocking."""


class Server:
    """The streaming server on one engine: ``async with Server(engine, config) as server: server.port``.
    ``runner`` replaces the scheduler's (e.g. a :class:`streaming.workers.ProcessRunner`); the server
    closes it when it stops. Adapters of other wire protocols (:mod:`streaming.wyoming`) share its
    scheduler and count their streams with :meth:`admit`, :meth:`open_stream` and :meth:`close_stream`."""

    def __init__(self, engine: Any, config: ServerConfig = ServerConfig(), runner: Runner | None = None):
        self.engine = engine
        self._runner = runner
        self.config = config
        self.metrics = Metrics()
        self.info = EngineInfo(engine.name, engine.multilingual, speaker.available())
        self.draining = False
        self.admission = Admission(config.workers, config.max_utilization or 1.0, enabled=config.max_utilization > 0)
        self.refusals = RefusalLog()
        self._streams: dict[asyncio.Task, Stream] = {}  # by the task that runs each stream
        self._scheduler: Scheduler | None = None
        self._trimmer: HeapTrimmer | None = None
        self._server = None

    async def start(self) -> None:
        """Start the inference worker and listen; ``port`` tells the bound port (config port 0: any free)."""
        runner = {} if self._runner is None else {"runner": self._runner}
        self._scheduler = Scheduler(self.engine, self.config.max_batch, self.config.max_wait_ms, self.metrics,
                                    workers=self.config.workers, on_busy=self.admission.record_busy,
                                    shed_after_ms=self.config.shed_after_ms, **runner)
        # Messages up to twice the limit are read so that the session can answer frame_too_large;
        # larger ones are cut off by websockets with close code 1009.
        try:
            self._server = await serve(
                self._handle, self.config.host, self.config.port, process_request=self._process_request,
                max_size=2 * self.config.max_message_bytes, compression=None,
                server_header=f"whisper-stream/{__version__}")
        except BaseException:
            await asyncio.to_thread(self._scheduler.close)
            raise
        if self.config.heap_trim_seconds:
            self._trimmer = HeapTrimmer(lambda: self.metrics.busy_seconds, self.config.heap_trim_seconds,
                                        on_trim=self.metrics.observe_heap_trim)
            self._trimmer.start()
        log.info("listening on %s (model %s, %s, at most %d streams)", self.url, self.info.model,
                 getattr(self.engine, "dtype_name", "?"),
                 self.config.max_streams)

    @property
    def scheduler(self) -> Scheduler:
        """The inference scheduler all streams share."""
        if self._scheduler is None:
            raise RuntimeError("the server is not started; call start() first")
        return self._scheduler

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the server is not started; call start() first")
        return self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"ws://{self.config.host}:{self.port}{PATH}"

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    @property
    def readiness(self) -> str:
        """``ok`` while a new stream would be accepted, else why not: ``draining`` or ``full``."""
        reason = self._refusal()
        return "ok" if reason is None else "draining" if reason[0] == "draining" else "full"

    def _refusal(self) -> tuple[str, str] | None:
        """Why a new stream would be refused now, as (code, message), or None."""
        if self.draining:
            return "draining", "the server is shutting down; retry on another instance"
        if self.active_streams >= self.config.max_streams:
            return "capacity", (f"the server is at its limit of {self.config.max_streams} streams; retry later "
                                "or on another instance")
        if not self.admission.admits(self.active_streams):
            return "overloaded", "the server's inference capacity is in use; retry later or on another instance"
        return None

    def admit(self, peer: str) -> tuple[str, str] | None:
        """May a new stream from ``peer`` open now? None if so, else the refusal as (code, message), counted
        in the metrics and logged."""
        reason = self._refusal()
        if reason is not None:
            self.metrics.count_error(reason[0])
            if reason[0] != "draining":
                self.refusals.refused(reason[0], f"from {peer}: {self._load_detail(self.active_streams)}")
        return reason

    def open_stream(self, task: asyncio.Task, stream: Stream) -> None:
        """``task`` now runs ``stream``: it counts for admission and metrics, and :meth:`drain` ends it."""
        self._streams[task] = stream
        self.admission.set_streams(len(self._streams))
        self.metrics.stream_opened()

    def close_stream(self, task: asyncio.Task) -> None:
        """The stream that ``task`` ran has ended."""
        del self._streams[task]
        self.admission.set_streams(len(self._streams))
        self.metrics.stream_closed()

    async def drain(self, timeout: float) -> bool:
        """Refuse new streams, end open ones (their audio so far is decoded and sent) and wait up to
        ``timeout`` seconds for them; True when all finished in time."""
        self.draining = True
        streams = list(self._streams.items())  # a stream with no decode in flight may end at once
        for _, stream in streams:
            stream.apply(stream.session.drain())
        if not streams:
            return True
        _, pending = await asyncio.wait([task for task, _ in streams], timeout=timeout)
        if pending:
            log.warning("drain deadline: closing %d streams that did not finish in %g s", len(pending), timeout)
        return not pending

    async def close(self) -> None:
        """Close every connection (1001), stop listening and stop the inference worker."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._scheduler is not None:
            await asyncio.to_thread(self._scheduler.close)
        if self._trimmer is not None:
            await asyncio.to_thread(self._trimmer.close)

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- HTTP ----------------------------------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        if url.path == PATH:
            return self._check_stream_request(connection, request, parse_qs(url.query))
        if url.path == "/healthz":
            status = self.readiness
            body = {"status": status, "model": self.info.model, "active_streams": self.active_streams,
                    "capacity": self.config.max_streams}
            code = http.HTTPStatus.OK if status == "ok" else http.HTTPStatus.SERVICE_UNAVAILABLE
            return _respond(connection, code, json.dumps(body), "application/json")
        if url.path == "/livez":
            return _respond(connection, http.HTTPStatus.OK, json.dumps({"status": "alive"}), "application/json")
        if url.path == "/metrics":
            if not self._authorized(request, parse_qs(url.query)):
                return self._unauthorized(connection)
            gauges = {"streams_capacity": ("Maximum concurrent streams.", self.config.max_streams),
                      "inference_queue": ("Window decodes waiting for the worker.",
                                          self._scheduler.queued if self._scheduler else 0),
                      "draining": ("1 while the server shuts down.", int(self.draining))}
            return _respond(connection, http.HTTPStatus.OK, self.metrics.render(gauges),
                            "text/plain; version=0.0.4; charset=utf-8")
        if url.path in ("/", "/index.html"):
            page = next((p for p in INDEX_PATHS if p.is_file()), None)
            html = page.read_text(encoding="utf-8") if page else PLACEHOLDER_PAGE
            return _respond(connection, http.HTTPStatus.OK, html, "text/html; charset=utf-8")
        return _respond(connection, http.HTTPStatus.NOT_FOUND,
                        f"not found: {url.path}; the stream endpoint is {PATH}\n", "text/plain; charset=utf-8")

    def _check_stream_request(self, connection: ServerConnection, request: Request,
                              query: dict[str, list[str]]) -> Response | None:
        origin = request.headers.get("Origin")
        if self.config.allow_origins and origin is not None and origin not in self.config.allow_origins:
            self.metrics.count_error("forbidden_origin")
            log.info("refused a stream from origin %r (not in --allow-origin)", origin)
            return _respond(connection, http.HTTPStatus.FORBIDDEN,
                            "forbidden_origin: this origin may not open streams\n", "text/plain; charset=utf-8")
        if not self._authorized(request, query):
            return self._unauthorized(connection)
        reason = self.admit(_peer(connection))
        if reason is None:
            return None
        # HTTP 503 before the upgrade, so that a load balancer can send the stream to another instance.
        response = _respond(connection, http.HTTPStatus.SERVICE_UNAVAILABLE, json.dumps(error_message(*reason)),
                            "application/json")
        response.headers["Retry-After"] = "1"
        return response

    def _load_detail(self, open_streams: int) -> str:
        predicted = _percent(self.admission.utilization(open_streams + 1))
        return f"{open_streams} open, predicted load with one more {predicted}"

    def _authorized(self, request: Request, query: dict[str, list[str]]) -> bool:
        if self.config.token is None:
            return True
        header = request.headers.get("Authorization", "")
        given = header[7:] if header[:7].lower() == "bearer " else (query.get("token") or [""])[0]
        return hmac.compare_digest(given.encode(), self.config.token.encode())

    def _unauthorized(self, connection: ServerConnection) -> Response:
        self.metrics.count_error("unauthorized")
        response = _respond(connection, http.HTTPStatus.UNAUTHORIZED,
                            "unauthorized: send the token as 'Authorization: Bearer <token>' or '?token=<token>'\n",
                            "text/plain; charset=utf-8")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    # --- WebSocket -----------------------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        # The handshake checks capacity (HTTP 503); this catches handshakes that passed it at the same time. A
        # stream accepted while the server drains is ended at once, like the others.
        reason = None if self.draining else self.admit(_peer(ws))
        if reason is not None:
            await _send_all(ws, refusal(*reason, TRY_AGAIN_LATER))
            return
        session = Session(self.info, max_message_bytes=self.config.max_message_bytes)
        connection = _Connection(ws, session, self.scheduler, self.metrics, self.config.idle_timeout)
        task = asyncio.current_task()
        assert task is not None
        self.open_stream(task, connection)
        log.info("session %s: stream opened from %s", session.id, _peer(ws))
        try:
            if self.draining:
                connection.apply(session.drain())
            await connection.run()
        except Exception:
            log.exception("session %s: connection handler failed", session.id)
            connection.crashed = True
            await _send_all(ws, refusal("internal", "internal server error (logged on the server)", INTERNAL_ERROR))
        finally:
            self.close_stream(task)
            outcome = "failed" if connection.crashed else "ended" if session.closed else "client left"
            log.info("session %s: %s after %.1f s of audio, %d finals", session.id, outcome, session.audio_seconds,
                     session.stats["finals"])


class _Outbox:
    """Messages waiting for a client, in order, bounded by policy: while more than ``LAG_MESSAGES`` wait,
    queued partials are superseded by the newest one and the client is warned (once per episode); finals
    and everything else always stay. ``full`` tells the reader to stop taking audio."""

    def __init__(self) -> None:
        self._items: deque[Send | Close] = deque()
        self._ready = asyncio.Event()
        self._lagging = False
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def full(self) -> bool:
        return len(self._items) >= MAX_OUTBOX

    def put(self, action: Send | Close) -> None:
        if isinstance(action, Send) and action.message["type"] == "partial" and len(self._items) >= LAG_MESSAGES:
            kept = deque(a for a in self._items if not (isinstance(a, Send) and a.message["type"] == "partial"))
            self.dropped += len(self._items) - len(kept)
            self._items = kept
            if not self._lagging:
                self._lagging = True
                self._items.append(Send(warning_message(
                    "client_lagging", f"more than {LAG_MESSAGES} messages wait for this client: older partials "
                    "are dropped (finals never are); read messages as they arrive")))
        self._items.append(action)
        self._ready.set()

    async def get(self) -> Send | Close:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        if len(self._items) <= 1:
            self._lagging = False
        return self._items.popleft()


class _Connection:
    """Runs one session on one WebSocket: a reader, a writer that keeps messages in order, decode tasks."""

    def __init__(self, ws: ServerConnection, session: Session, scheduler: Scheduler, metrics: Metrics,
                 idle_timeout: float):
        self.ws, self.session, self.scheduler, self.metrics = ws, session, scheduler, metrics
        self.idle_timeout = idle_timeout or None
        self.outbox = _Outbox()
        self.warned_backlog = False  # audio_backlog is sent once per stream
        self.decodes: set[asyncio.Task] = set()
        self.progress = asyncio.Event()
        self.crashed = False

    def apply(self, actions: list[Action]) -> None:
        """Queue messages in order and start decodes (never blocks)."""
        if self.crashed:
            return
        for action in actions:
            if isinstance(action, Run):
                task = asyncio.create_task(self._decode(action))
                self.decodes.add(task)
                task.add_done_callback(self.decodes.discard)
                continue
            if isinstance(action, Send) and action.message["type"] == "error":
                code = action.message["code"]
                self.metrics.count_error(code)
                log.debug("session %s: error %s: %s", self.session.id, code, action.message["message"])
            elif isinstance(action, Close) and action.code != 1000:
                log.info("session %s: closing with %d (%s)", self.session.id, action.code, action.reason)
            self.outbox.put(action)

    async def run(self) -> None:
        self.apply(self.session.open())
        reader, writer = asyncio.create_task(self._read()), asyncio.create_task(self._write())
        closed = asyncio.create_task(self.ws.wait_closed())
        try:
            # The writer returns after sending Close; the reader or `closed` end first when the client leaves.
            await asyncio.wait({reader, writer, closed}, return_when=asyncio.FIRST_COMPLETED)
            if self.crashed:
                await writer  # send the internal error and close 1011
            if writer.done() and writer.exception() is not None:
                raise writer.exception()
        finally:
            for task in (reader, writer, closed, *self.decodes):
                task.cancel()  # a client that left frees its stream at once, queued decodes included
            await asyncio.gather(reader, writer, closed, *self.decodes, return_exceptions=True)

    def _crash(self) -> None:
        log.exception("session %s: internal error", self.session.id)
        self.apply(refusal("internal", "internal server error (logged on the server); reconnect to start a "
                                       "new stream", INTERNAL_ERROR))
        self.crashed = True

    async def _read(self) -> None:
        try:
            while True:  # until the connection closes; a closed session ignores late messages
                while self.session.backlog_seconds > MAX_BACKLOG_SECONDS or self.outbox.full:
                    if not self.warned_backlog and not self.outbox.full:
                        self.warned_backlog = True
                        self.apply([Send(warning_message(
                            "audio_backlog", f"audio arrives faster than it is transcribed: over "
                            f"{MAX_BACKLOG_SECONDS:g} s wait, so reading pauses until the server catches up "
                            "(send at most real time for live captions)"))])
                    self.progress.clear()
                    await self.progress.wait()
                try:
                    message = await asyncio.wait_for(self.ws.recv(), self.idle_timeout)
                except asyncio.TimeoutError:
                    self.apply(self.session.timed_out(self.idle_timeout or 0))
                    continue
                before = self.session.audio_seconds
                if isinstance(message, str):
                    self.apply(self.session.receive_text(message))
                else:
                    self.apply(self.session.receive_bytes(message))
                self.metrics.add_audio(self.session.audio_seconds - before)
        except ConnectionClosed:
            return
        except Exception:
            self._crash()

    async def _write(self) -> None:
        try:
            while True:
                action = await self.outbox.get()
                if isinstance(action, Send):
                    await self.ws.send(json.dumps(action.message, ensure_ascii=False))
                    self.progress.set()  # a reader paused by a full outbox may go on
                else:
                    await self.ws.close(action.code, action.reason)
                    return
        except ConnectionClosed:
            return

    async def _decode(self, run: Run) -> None:
        try:
            result: Any = await self.scheduler.submit(run.request)
        except Exception as exc:  # noqa: BLE001 - the session reports it to the client
            result = exc
        try:
            self.apply(self.session.complete(run.request, result))
        except Exception:
            self._crash()
        self.progress.set()


async def _send_all(ws: ServerConnection, actions: list[Action]) -> None:
    try:
        for action in actions:
            if isinstance(action, Send):
                await ws.send(json.dumps(action.message))
            elif isinstance(action, Close):
                await ws.close(action.code, action.reason)
    except ConnectionClosed:
        pass


def _respond(connection: ServerConnection, status: http.HTTPStatus, body: str, content_type: str) -> Response:
    response = connection.respond(status, body)
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = content_type
    return response


def _percent(share: float | None) -> str:
    return "not measured yet" if share is None else f"{100 * share:.0f}% of the workers' time"


def _peer(ws: ServerConnection) -> str:
    address = ws.remote_address
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)


async def run_server(engine: Any, config: ServerConfig, stop: asyncio.Event | None = None,
                     runner: Runner | None = None, wyoming_uri: str | None = None,
                     wyoming_zeroconf: str | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set), then drain for ``config.drain_seconds``; returns 0.
    ``wyoming_uri`` also serves the Wyoming protocol there (:mod:`streaming.wyoming`), ``wyoming_zeroconf``
    announces it under that name (``""``: the default)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        async with Server(engine, config, runner) as server, contextlib.AsyncExitStack() as services:
            if wyoming_uri is not None:
                from .wyoming import WyomingService

                await services.enter_async_context(WyomingService(server, wyoming_uri, wyoming_zeroconf))
            await stop.wait()
            log.info("shutting down: draining %d open stream(s) (up to %g s)", server.active_streams,
                     config.drain_seconds)
            await server.drain(config.drain_seconds)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    log.info("stopped")
    return 0


def serve_command(args: argparse.Namespace) -> int:
    """``whisper-stream serve``: load the model once and run the server until a signal."""
    import torch

    from .engine import Engine, configure_threads
    from .engine.weights import ModelLoadError

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
                              shed_after_ms=args.shed_after_ms)
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
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        print(f"whisper-stream: --device {args.device!r} is not a device; use cpu, cuda or cuda:N", file=sys.stderr)
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
            engine = Engine.load(args.model, device=args.device, dtype=args.dtype)
    except (ModelLoadError, RuntimeError) as exc:
        print(f"whisper-stream: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(run_server(engine, config, runner=runner, wyoming_uri=args.wyoming_uri,
                                      wyoming_zeroconf=args.wyoming_zeroconf))
    except OSError as exc:
        print(f"whisper-stream: cannot listen: {exc}", file=sys.stderr)
        return 2
