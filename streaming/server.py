"""The server's front: HTTP routes, authentication, origin checks, admission and draining for every wire
protocol, and the scheduler they all share. One aiohttp application serves WebSockets and plain HTTP on one
port. Each stream runs in its wire protocol's adapter (:data:`WEBSOCKET_ROUTES`: :mod:`streaming.native`,
:mod:`streaming.deepgram`, :mod:`streaming.openai_realtime`; :mod:`streaming.wyoming` on its own TCP port), each
request of a REST API in its adapter (:data:`HTTP_ROUTES`).

Besides the stream endpoints (the native one is ``/v1/stream``) the port serves ``/healthz`` (readiness: 503
while draining or full), ``/livez`` (liveness), ``/metrics`` and the browser client at ``/``. ``Server`` is the
embeddable object (tests start it on port 0); ``streaming.cli`` adds signal handling and draining for the
``whisper-stream serve`` command.
"""

from __future__ import annotations

import asyncio
import hmac
import http
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from . import __version__, deepgram, deepgram_prerecorded, native, openai_audio, openai_realtime
from .admission import Admission
from .core.session import DEFAULT_MAX_MESSAGE_BYTES, EngineInfo, error_message
from .engine import speaker
from .heap import HeapTrimmer
from .metrics import Metrics
from .scheduler import Runner, Scheduler, check_options
from .websocket import WebSocket, peer, websocket_response

log = logging.getLogger(__name__)

# The stream endpoints, each served by its wire protocol's adapter.
WEBSOCKET_ROUTES = {native.PATH: native.serve_stream, deepgram.PATH: deepgram.serve_stream,
                    openai_realtime.PATH: openai_realtime.serve_stream}
# Checks of a stream's query at the handshake: (HTTP status, JSON body) to refuse it in the API's own format.
QueryCheck = Callable[[EngineInfo, dict[str, list[str]]], "tuple[int, dict[str, Any]] | None"]
HANDSHAKE_CHECKS: dict[str, QueryCheck] = {deepgram.PATH: deepgram.check_query,
                                           openai_realtime.PATH: openai_realtime.check_query}
# The REST endpoints: (method, path) -> the adapter's handler.
HttpHandler = Callable[["Server", web.Request], Awaitable[web.StreamResponse]]
HTTP_ROUTES: dict[tuple[str, str], HttpHandler] = {
    ("POST", openai_audio.TRANSCRIPTIONS): openai_audio.transcriptions,
    ("POST", openai_audio.TRANSLATIONS): openai_audio.translations,
    ("GET", openai_audio.MODELS): openai_audio.models,
    ("GET", openai_audio.MODELS + "/{model}"): openai_audio.model,
    ("POST", deepgram_prerecorded.PATH): deepgram_prerecorded.transcribe,
}

# The browser client ships in the sibling `clients` package (installed beside `streaming`).
INDEX_PATHS = (Path(__file__).resolve().parent.parent / "clients" / "web" / "index.html",)
PLACEHOLDER_PAGE = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>whisper-stream</title></head>
<body><h1>whisper-stream {__version__}</h1>
<p>The browser client is not installed. Stream audio over a WebSocket to <code>{native.PATH}</code>
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
    max_upload_mb: float = 25.0  # the largest request body of the REST APIs (files to transcribe)

    def __post_init__(self) -> None:
        if self.max_streams < 1:
            raise ValueError(f"max_streams={self.max_streams} is invalid; use 1 or more")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes={self.max_message_bytes} is too small; use at least 1024")
        if self.idle_timeout < 0 or self.drain_seconds < 0:
            raise ValueError("idle_timeout and drain_seconds must be >= 0 seconds")
        if not 0 <= self.max_utilization <= 1:
            raise ValueError(f"max_utilization={self.max_utilization} is out of range; allowed: 0 (off) to 1")
        check_options(self.max_batch, self.max_wait_ms, self.workers, self.shed_after_ms)
        if not 0 <= self.heap_trim_seconds <= 3600:
            raise ValueError(f"heap_trim_seconds={self.heap_trim_seconds} is out of range; allowed: 0 (off) to 3600")
        if not 0 < self.max_upload_mb <= 4096:
            raise ValueError(f"max_upload_mb={self.max_upload_mb} is out of range; allowed: above 0, at most 4096")
        if self.token is not None and not self.token:
            raise ValueError("token is empty; pass a non-empty token or none to disable authentication")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1_000_000)


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
    """An open stream or request of any wire protocol, as the server tracks it for admission and draining."""

    def drain(self) -> None:
        """End the stream soon: decode the audio received so far and send the rest (never blocks)."""


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
        self._sockets: set[web.WebSocketResponse] = set()
        self._scheduler: Scheduler | None = None
        self._trimmer: HeapTrimmer | None = None
        self._runner_web: web.AppRunner | None = None

    async def start(self) -> None:
        """Start the inference worker and listen; ``port`` tells the bound port (config port 0: any free)."""
        runner = {} if self._runner is None else {"runner": self._runner}
        self._scheduler = Scheduler(self.engine, self.config.max_batch, self.config.max_wait_ms, self.metrics,
                                    workers=self.config.workers, on_busy=self.admission.record_busy,
                                    shed_after_ms=self.config.shed_after_ms, **runner)
        try:
            self._runner_web = web.AppRunner(self._application(), access_log=None, handle_signals=False,
                                             shutdown_timeout=1.0)
            await self._runner_web.setup()
            await web.TCPSite(self._runner_web, self.config.host, self.config.port).start()
        except BaseException:
            if self._runner_web is not None:
                await self._runner_web.cleanup()
            await asyncio.to_thread(self._scheduler.close)
            raise
        if self.config.heap_trim_seconds:
            self._trimmer = HeapTrimmer(lambda: self.metrics.busy_seconds, self.config.heap_trim_seconds,
                                        on_trim=self.metrics.observe_heap_trim)
            self._trimmer.start()
        log.info("listening on %s (model %s, %s, at most %d streams)", self.url, self.info.model,
                 getattr(self.engine, "dtype_name", "?"),
                 self.config.max_streams)

    def _application(self) -> web.Application:
        app = web.Application(middlewares=[_not_found])
        for path in WEBSOCKET_ROUTES:
            app.router.add_get(path, self._stream)
        for (method, path), handler in HTTP_ROUTES.items():
            app.router.add_route(method, path, partial(handler, self))
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/livez", self._livez)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/", self._index)
        app.router.add_get("/index.html", self._index)
        app.on_response_prepare.append(_server_header)
        return app

    @property
    def scheduler(self) -> Scheduler:
        """The inference scheduler all streams share."""
        if self._scheduler is None:
            raise RuntimeError("the server is not started; call start() first")
        return self._scheduler

    @property
    def port(self) -> int:
        if self._runner_web is None or not self._runner_web.addresses:
            raise RuntimeError("the server is not started; call start() first")
        return self._runner_web.addresses[0][1]

    @property
    def url(self) -> str:
        return f"ws://{self.config.host}:{self.port}{native.PATH}"

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
            stream.drain()
        if not streams:
            return True
        _, pending = await asyncio.wait([task for task, _ in streams], timeout=timeout)
        if pending:
            log.warning("drain deadline: closing %d streams that did not finish in %g s", len(pending), timeout)
        return not pending

    async def close(self) -> None:
        """Close every connection (1001), stop listening and stop the inference worker."""
        await asyncio.gather(*(ws.close(code=1001, message=b"server shutdown") for ws in list(self._sockets)),
                             return_exceptions=True)
        if self._runner_web is not None:
            await self._runner_web.cleanup()
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

    async def _healthz(self, request: web.Request) -> web.Response:
        status = self.readiness
        body = {"status": status, "model": self.info.model, "active_streams": self.active_streams,
                "capacity": self.config.max_streams}
        code = http.HTTPStatus.OK if status == "ok" else http.HTTPStatus.SERVICE_UNAVAILABLE
        return respond(code, json.dumps(body), "application/json")

    async def _livez(self, request: web.Request) -> web.Response:
        return respond(http.HTTPStatus.OK, json.dumps({"status": "alive"}), "application/json")

    async def _metrics(self, request: web.Request) -> web.Response:
        if not self.authorized(request):
            return self._unauthorized()
        gauges = {"streams_capacity": ("Maximum concurrent streams.", self.config.max_streams),
                  "inference_queue": ("Window decodes waiting for the worker.",
                                      self._scheduler.queued if self._scheduler else 0),
                  "draining": ("1 while the server shuts down.", int(self.draining))}
        return respond(http.HTTPStatus.OK, self.metrics.render(gauges), "text/plain; version=0.0.4; charset=utf-8")

    async def _index(self, request: web.Request) -> web.Response:
        page = next((p for p in INDEX_PATHS if p.is_file()), None)
        html = page.read_text(encoding="utf-8") if page else PLACEHOLDER_PAGE
        return respond(http.HTTPStatus.OK, html, "text/html; charset=utf-8")

    def _check_stream_request(self, request: web.Request) -> web.Response | None:
        origin = request.headers.get("Origin")
        if self.config.allow_origins and origin is not None and origin not in self.config.allow_origins:
            self.metrics.count_error("forbidden_origin")
            log.info("refused a stream from origin %r (not in --allow-origin)", origin)
            return respond(http.HTTPStatus.FORBIDDEN, "forbidden_origin: this origin may not open streams\n",
                           "text/plain; charset=utf-8")
        if not self.authorized(request):
            return self._unauthorized()
        check = HANDSHAKE_CHECKS.get(request.path)
        refused = check(self.info, _query(request)) if check else None
        if refused is not None:
            self.metrics.count_error("bad_request")
            return respond(http.HTTPStatus(refused[0]), json.dumps(refused[1]), "application/json")
        reason = self.admit(peer(request))
        if reason is None:
            return None
        # HTTP 503 before the upgrade, so that a load balancer can send the stream to another instance.
        response = respond(http.HTTPStatus.SERVICE_UNAVAILABLE, json.dumps(error_message(*reason)),
                           "application/json")
        response.headers["Retry-After"] = "1"
        return response

    def _load_detail(self, open_streams: int) -> str:
        predicted = _percent(self.admission.utilization(open_streams + 1))
        return f"{open_streams} open, predicted load with one more {predicted}"

    def authorized(self, request: web.Request) -> bool:
        """Whether ``request`` carries the server's token (always, without ``--token``): as ``Authorization:
        Bearer`` (OAuth, OpenAI's clients) or ``Token`` (Deepgram's), the ``token`` WebSocket subprotocol
        (Deepgram's browser clients) or ``?token=``."""
        if self.config.token is None:
            return True
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
        if scheme.lower() in ("bearer", "token"):
            given = credentials.strip()
        elif len(protocols) == 2 and protocols[0].lower() == "token":
            given = protocols[1]
        else:
            given = request.query.get("token", "")
        return hmac.compare_digest(given.encode(), self.config.token.encode())

    def _unauthorized(self) -> web.Response:
        self.metrics.count_error("unauthorized")
        response = respond(http.HTTPStatus.UNAUTHORIZED,
                           "unauthorized: send the token as 'Authorization: Bearer <token>' or '?token=<token>'\n",
                           "text/plain; charset=utf-8")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    # --- WebSocket -----------------------------------------------------------------------------------

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        """Check the handshake, then run the stream with the adapter of the wire protocol its path names."""
        refused = self._check_stream_request(request)
        if refused is not None:
            return refused
        # Messages up to twice the limit are read so that the session can answer frame_too_large; larger ones
        # are cut off with close code 1009.
        max_size = 2 * self.config.max_message_bytes
        ws = websocket_response(max_size)
        if not ws.can_prepare(request).ok:
            return respond(http.HTTPStatus.UPGRADE_REQUIRED,
                           f"upgrade required: {request.path} is a WebSocket endpoint\n", "text/plain; charset=utf-8")
        await ws.prepare(request)
        self._sockets.add(ws)
        try:
            await WEBSOCKET_ROUTES[request.path](self, WebSocket(request, ws, max_size))
        finally:
            self._sockets.discard(ws)
            await ws.close()
        return ws


def respond(status: int, body: str | bytes, content_type: str) -> web.Response:
    """A response whose ``Content-Type`` is exactly ``content_type``."""
    return web.Response(status=status, body=body.encode() if isinstance(body, str) else body,
                        headers={"Content-Type": content_type})


@web.middleware
async def _not_found(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                     ) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return respond(http.HTTPStatus.NOT_FOUND, f"not found: {request.path}; the stream endpoint is {native.PATH}\n",
                       "text/plain; charset=utf-8")


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = f"whisper-stream/{__version__}"


def _query(request: web.Request) -> dict[str, list[str]]:
    return {name: request.query.getall(name) for name in request.query}


def _percent(share: float | None) -> str:
    return "not measured yet" if share is None else f"{100 * share:.0f}% of the workers' time"
