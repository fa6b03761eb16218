"""The runtime every WebSocket adapter shares: one :class:`~streaming.core.session.Session` on one WebSocket.

It reads client messages into the session, writes the session's messages back in order through a bounded
outbox, stops reading while too much audio or too many messages wait, and runs the decodes the session asks
for on the server's shared scheduler. A :class:`Codec` is what differs between wire protocols: how client
messages become session calls and how the session's (native) messages look on the wire. Admission,
authentication and draining are the front's (:mod:`streaming.server`); the protocol's rules are the session's.
:class:`WebSocket` is the one place that knows the connection is aiohttp's.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from .core.session import (
    INTERNAL_ERROR,
    TRY_AGAIN_LATER,
    Action,
    Close,
    Run,
    Send,
    Session,
    lagging_warning,
    refusal,
)
from .metrics import Metrics
from .scheduler import Scheduler

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger(__name__)

# Messages queued for a client that does not read them: past LAG_MESSAGES partials are dropped (finals
# never); past MAX_OUTBOX the server also stops reading the client's audio until the queue drains.
LAG_MESSAGES = 16
MAX_OUTBOX = 256
# Keepalive: a ping this often; a client that does not answer within half of it is gone.
PING_SECONDS = 20.0
# How often a stream whose reader is paused looks whether its client is still connected.
CLOSED_POLL_SECONDS = 0.5


# aiohttp's own cap on a message, as a multiple of the largest one a stream reads (``WebSocket.max_size``).
# Between the two a message is read and refused with close code 1009 in a closing handshake, which goes on
# reading what the client still sends; past aiohttp's cap the connection is dropped at once (with the rest
# of the message unread the client may then see a reset rather than the close frame).
HARD_LIMIT_FACTOR = 8


def websocket_response(max_size: int) -> web.WebSocketResponse:
    """aiohttp's WebSocket response for a stream that reads messages of up to ``max_size`` bytes."""
    return web.WebSocketResponse(protocols=("token",), heartbeat=PING_SECONDS, compress=False,
                                 max_msg_size=HARD_LIMIT_FACTOR * max_size)


class ConnectionClosed(Exception):
    """The WebSocket is closed: the client left, or either side closed it."""


class WebSocket:
    """One accepted WebSocket (aiohttp's) as the adapters use it: text or bytes in, text out, a close code."""

    def __init__(self, request: web.Request, ws: web.WebSocketResponse, max_size: int):
        self.request, self._ws, self.max_size = request, ws, max_size
        self.closing = False  # this side started the closing handshake
        self.path = request.path_qs
        self.peer = peer(request)

    async def recv(self) -> str | bytes:
        """The next message; raises :class:`ConnectionClosed` once the connection closes."""
        message = await self._ws.receive()
        if message.type in (WSMsgType.TEXT, WSMsgType.BINARY):
            data = message.data
            if len(data) > self.max_size or isinstance(data, str) and 4 * len(data) > self.max_size and len(
                    data.encode()) > self.max_size:
                await self._ws.close(code=1009, message=f"message too big: the limit is {self.max_size} bytes".encode())
                raise ConnectionClosed("message too big")  # and the closing handshake is over
            return data
        raise ConnectionClosed(f"{message.type.name.lower()}: {message.extra or ''}")

    async def send(self, text: str) -> None:
        try:
            await self._ws.send_str(text)
        except (ConnectionError, RuntimeError) as exc:  # RuntimeError: aiohttp's "closed" on some paths
            raise ConnectionClosed(str(exc)) from exc

    async def close(self, code: int, reason: str = "") -> None:
        """Send the close frame and wait for the client's (the connection's reader returns meanwhile)."""
        self.closing = True
        await self._ws.close(code=code, message=reason.encode())

    async def wait_closed(self) -> None:
        """Return once the connection is closed, even while nobody reads it."""
        while not self._ws.closed and self.request.transport is not None and not self.request.transport.is_closing():
            await asyncio.sleep(CLOSED_POLL_SECONDS)


class Codec:
    """One wire protocol on a session; this base class is the native protocol (docs/protocol.md). A codec
    is made per connection, so it may keep state (item ids, text so far)."""

    def open(self, session: Session) -> list[Action]:
        """The actions when the connection is accepted."""
        return session.open()

    def text(self, session: Session, text: str) -> list[Action]:
        """A text message from the client."""
        return session.receive_text(text)

    def binary(self, session: Session, data: bytes) -> list[Action]:
        """A binary message from the client."""
        return session.receive_bytes(data)

    def prepare(self, actions: list[Action]) -> list[Action]:
        """One batch of the session's actions before they are queued (it may look ahead within it)."""
        return actions

    def encode(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        """The wire messages (JSON objects) for one session message, possibly none."""
        return [message]


async def serve_session(server: Server, ws: WebSocket, codec: Codec) -> None:
    """Run one stream of ``codec``'s protocol on ``ws`` until it ends or the client leaves."""
    # The handshake checks capacity (HTTP 503); this catches handshakes that passed it at the same time. A
    # stream accepted while the server drains is ended at once, like the others.
    reason = None if server.draining else server.admit(ws.peer)
    if reason is not None:
        await _send_all(ws, codec, refusal(*reason, TRY_AGAIN_LATER))
        return
    session = Session(server.info, max_message_bytes=server.config.max_message_bytes)
    connection = SessionStream(ws, session, codec, server.scheduler, server.metrics, server.config.idle_timeout)
    task = asyncio.current_task()
    assert task is not None
    server.open_stream(task, connection)
    log.info("session %s: %s stream opened from %s", session.id, type(codec).__name__, ws.peer)
    try:
        if server.draining:
            connection.apply(session.drain())
        await connection.run()
    except Exception:
        log.exception("session %s: connection handler failed", session.id)
        connection.crashed = True
        await _send_all(ws, codec, refusal("internal", "internal server error (logged on the server)",
                                           INTERNAL_ERROR))
    finally:
        server.close_stream(task)
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
                self._items.append(Send(lagging_warning(LAG_MESSAGES)))
        self._items.append(action)
        self._ready.set()

    async def get(self) -> Send | Close:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        if len(self._items) <= 1:
            self._lagging = False
        return self._items.popleft()


class SessionStream:
    """Runs one session on one WebSocket: a reader, a writer that keeps messages in order, decode tasks."""

    def __init__(self, ws: WebSocket, session: Session, codec: Codec, scheduler: Scheduler,
                 metrics: Metrics, idle_timeout: float):
        self.ws, self.session, self.codec, self.scheduler, self.metrics = ws, session, codec, scheduler, metrics
        self.idle_timeout = idle_timeout or None
        self.outbox = _Outbox()
        self.decodes: set[asyncio.Task] = set()
        self.progress = asyncio.Event()
        self.crashed = False

    def drain(self) -> None:
        self.apply(self.session.drain())

    def apply(self, actions: list[Action]) -> None:
        """Queue messages in order and start decodes (never blocks)."""
        if self.crashed:
            return
        for action in self.codec.prepare(actions):
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
        self.apply(self.codec.open(self.session))
        reader, writer = asyncio.create_task(self._read()), asyncio.create_task(self._write())
        closed = asyncio.create_task(self.ws.wait_closed())
        try:
            # The writer returns after sending Close; the reader or `closed` end first when the client leaves.
            await asyncio.wait({reader, writer, closed}, return_when=asyncio.FIRST_COMPLETED)
            if self.crashed or self.ws.closing:
                await writer  # send the internal error and close 1011; finish the closing handshake
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
                while True:
                    backlogged, warning = self.session.backlogged()
                    if not (backlogged or self.outbox.full):
                        break
                    self.apply(warning)
                    self.progress.clear()
                    await self.progress.wait()
                try:
                    message = await asyncio.wait_for(self.ws.recv(), self.idle_timeout)
                except asyncio.TimeoutError:
                    self.apply(self.session.timed_out(self.idle_timeout or 0))
                    continue
                before = self.session.audio_seconds
                if isinstance(message, str):
                    self.apply(self.codec.text(self.session, message))
                else:
                    self.apply(self.codec.binary(self.session, message))
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
                    for message in self.codec.encode(action.message):
                        await self.ws.send(json.dumps(message, ensure_ascii=False))
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


async def _send_all(ws: WebSocket, codec: Codec, actions: list[Action]) -> None:
    try:
        for action in actions:
            if isinstance(action, Send):
                for message in codec.encode(action.message):
                    await ws.send(json.dumps(message))
            elif isinstance(action, Close):
                await ws.close(action.code, action.reason)
    except ConnectionClosed:
        pass


def peer(request: web.BaseRequest) -> str:
    """The client's address as host:port, for logs."""
    address = request.transport.get_extra_info("peername") if request.transport else None
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
