"""Inference in child processes: one per scheduler worker thread, each with its own engine.

Threads of one process share Python's interpreter lock, which every torch operator releases and takes back,
and the event loop needs it too; a child process per worker lets decodes run side by side. The scheduler's
worker thread only sends the batch over a pipe and hands back each reply as it arrives.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from .core.messages import Reply, Request
from .engine.inference import iter_requests

log = logging.getLogger(__name__)

START_TIMEOUT = 300.0


@dataclass(frozen=True)
class ChildEngine:
    """What the parent knows of the engine its inference processes loaded: all the server needs of it."""

    name: str
    multilingual: bool
    dtype_name: str


def _child(conn: Connection, model: str, dtype: str | None, threads: int, heap_trim_seconds: float) -> None:
    """A child's life: load the engine, then run every batch it is sent until it is sent None."""
    from .engine import Engine, configure_threads
    from .engine.weights import ModelLoadError
    from .heap import HeapTrimmer

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent drains
    configure_threads(threads)
    try:
        engine = Engine.load(model, device="cpu", dtype=dtype)
    except (ModelLoadError, ValueError) as exc:  # their messages name the model or dtype and the fix
        conn.send(("error", str(exc)))
        return
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which names it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    batches = 0
    trimmer = HeapTrimmer(lambda: batches, heap_trim_seconds) if heap_trim_seconds else None
    if trimmer is not None:
        trimmer.start()
    conn.send(("ready", ChildEngine(engine.name, engine.multilingual, engine.dtype_name)))
    while (requests := conn.recv()) is not None:
        for reply in iter_requests(engine, requests):
            if isinstance(reply, BaseException):  # its class may not unpickle in the parent
                reply = RuntimeError(f"{type(reply).__name__}: {reply}")
            conn.send(reply)
        batches += 1
    if trimmer is not None:
        trimmer.close()


class _Child:
    def __init__(self, args: tuple[Any, ...]):
        context = multiprocessing.get_context("spawn")  # no forked copy of the parent's torch threads
        self.conn, child_end = context.Pipe()
        self.process = context.Process(target=_child, args=(child_end, *args), daemon=True,
                                       name="whisper-stream-inference")
        self.process.start()
        child_end.close()

    def wait_ready(self) -> ChildEngine:
        if not self.conn.poll(START_TIMEOUT):
            raise RuntimeError(f"an inference process did not load the model within {START_TIMEOUT:g} s")
        try:
            kind, detail = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"an inference process exited while loading the model "
                               f"(exit code {self.process.exitcode})") from None
        if kind != "ready":
            raise RuntimeError(detail)
        return detail

    def stop(self, timeout: float = 5.0) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


class ProcessRunner:
    """A :class:`streaming.scheduler.Scheduler` runner that runs each worker thread's batches in a child
    process of its own (CPU only). ``model`` and ``dtype`` are what :meth:`Engine.load` takes; each child
    uses ``threads`` torch threads and returns freed heap memory every ``heap_trim_seconds`` (0: never).
    A child that dies fails the batch it was running and is replaced. ``engine`` describes the loaded model:
    the parent needs no copy of its own (``Server(runner.engine, config, runner)``); a model that does not
    load raises RuntimeError with the loader's message."""

    def __init__(self, model: str, dtype: str | None, workers: int, threads: int = 1,
                 heap_trim_seconds: float = 1.0):
        self._args = (model, dtype, threads, heap_trim_seconds)
        self._free: queue.SimpleQueue[_Child] = queue.SimpleQueue()
        self._local = threading.local()
        self._children = [_Child(self._args) for _ in range(workers)]
        try:
            self.engine = [child.wait_ready() for child in self._children][0]
        except BaseException:
            self.close()
            raise
        for child in self._children:
            self._free.put(child)

    @property
    def pids(self) -> list[int]:
        return [child.process.pid for child in self._children]

    def __call__(self, engine: Any, requests: list[Request]) -> Iterator[Reply | Exception]:
        child = getattr(self._local, "child", None)
        if child is None:
            child = self._local.child = self._free.get()
        done = 0
        try:
            child.conn.send(list(requests))
            for _ in requests:
                yield child.conn.recv()
                done += 1
        except (EOFError, OSError):
            child.stop(timeout=1)  # reaps it: its exit code is known only then
            exitcode = child.process.exitcode
            log.error("an inference process died (exit code %s); starting a new one", exitcode)
            self._local.child = self._replace(child)
            error = RuntimeError(f"the inference process running this decode died (exit code {exitcode})")
            for _ in requests[done:]:
                yield error

    def _replace(self, dead: _Child) -> _Child:
        """Start a child in the place of ``dead`` (stopped already)."""
        child = _Child(self._args)
        child.wait_ready()
        self._children[self._children.index(dead)] = child
        return child

    def close(self) -> None:
        """Stop every child (each finishes the batch it is running)."""
        for child in self._children:
            child.stop()
