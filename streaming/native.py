"""The native wire protocol (docs/protocol.md) on a WebSocket at ``/v1/stream``: the shared runtime
(:mod:`streaming.websocket`) with its default codec, since the session speaks the native protocol."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .websocket import Codec, WebSocket, serve_session

if TYPE_CHECKING:
    from .server import Server

PATH = "/v1/stream"


async def serve_stream(server: Server, ws: WebSocket) -> None:
    """Run one native-protocol stream on ``ws`` until it ends or the client leaves."""
    await serve_session(server, ws, Codec())
