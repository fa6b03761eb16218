"""Give the C heap's free pages back to the operating system while the server runs.

glibc gives each inference thread its own malloc arena and returns memory to the system only from the top
of a heap. Window decodes free tensors of every size many times a second, so free holes pile up below live
chunks and stay resident: with two worker threads a server's idle memory grew by 140 MB in four minutes
of load (benchmarks/RESULTS.md), none of it live. ``malloc_trim(0)`` releases the free pages of every
arena; :class:`HeapTrimmer` calls it on its own thread once per interval while inference is running.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS, Windows)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


class HeapTrimmer:
    """Every ``interval`` seconds, trims the heap if ``activity()`` changed since the last trim.

    ``activity`` is any value that changes while memory is being used (the server passes its inference
    busy-seconds counter), so an idle server does no work. ``trim`` defaults to glibc's ``malloc_trim``;
    without it the trimmer does nothing. ``on_trim(seconds)`` hears what each trim cost.
    """

    def __init__(self, activity: Callable[[], object], interval: float = 1.0,
                 trim: Callable[[int], int] | None = None, on_trim: Callable[[float], None] | None = None):
        if not interval > 0:
            raise ValueError(f"interval={interval!r} is invalid; use a number of seconds > 0")
        self.interval = interval
        self._activity = activity
        self._trim = trim if trim is not None else find_malloc_trim()
        self._on_trim = on_trim
        self._last: object = activity()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def available(self) -> bool:
        return self._trim is not None

    def start(self) -> None:
        if self._trim is None:
            log.info("no malloc_trim in this C library: freed inference memory stays with the process")
            return
        self._thread = threading.Thread(target=self._loop, name="whisper-stream-heap-trim", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def tick(self) -> bool:
        """Trim now if there was activity since the last trim; True when it trimmed."""
        current = self._activity()
        if current == self._last or self._trim is None:
            return False
        self._last = current
        started = time.perf_counter()
        self._trim(0)
        if self._on_trim is not None:
            self._on_trim(time.perf_counter() - started)
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.tick()
