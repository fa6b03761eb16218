"""Admission control: refuse a new stream when the measured inference load says it would not fit.

The scheduler reports how long its workers were busy; the server reports how many streams are open. Over a
sliding window that gives the cost of one stream (worker-seconds per stream-second); a new stream is
admitted while ``(open streams + 1) x cost`` stays under the target share of the workers' time. Until the
window holds enough stream time to measure (a cold server), only ``--max-streams`` limits admission.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

# Less stream time than this in the window gives no usable estimate (the last one is kept).
MIN_STREAM_SECONDS = 5.0


class Admission:
    """Capacity from measured cost; thread-safe (workers record, the event loop asks)."""

    def __init__(self, workers: int = 1, target: float = 0.8, window: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, enabled: bool = True):
        if not 0 < target <= 1:
            raise ValueError(f"target utilization {target!r} is out of range; allowed: above 0, at most 1")
        self.workers, self.target, self.window, self.clock, self.enabled = workers, target, window, clock, enabled
        self._lock = threading.Lock()
        self._busy: deque[tuple[float, float]] = deque()  # (end time, busy seconds) of each batch
        self._streams: deque[tuple[float, int]] = deque()  # (time, open streams from then on)
        self._cost: float | None = None  # worker-seconds per stream-second, from the last usable window

    def record_busy(self, seconds: float) -> None:
        """A worker just finished a batch that kept it busy for ``seconds``."""
        with self._lock:
            self._busy.append((self.clock(), seconds))

    def set_streams(self, count: int) -> None:
        """The number of open streams changed to ``count``."""
        with self._lock:
            self._streams.append((self.clock(), count))

    @property
    def cost(self) -> float | None:
        """Measured worker-seconds per stream-second, or None before there is enough data."""
        with self._lock:
            return self._estimate(self.clock())

    def utilization(self, streams: int) -> float | None:
        """Predicted share of the workers' time that ``streams`` open streams take."""
        cost = self.cost
        return None if cost is None else streams * cost / self.workers

    def admits(self, open_streams: int) -> bool:
        """Whether one more stream fits beside ``open_streams`` within the target utilization."""
        if not self.enabled or open_streams == 0:
            return True
        predicted = self.utilization(open_streams + 1)
        return predicted is None or predicted <= self.target

    def _estimate(self, now: float) -> float | None:
        start = now - self.window
        while self._busy and self._busy[0][0] <= start:
            self._busy.popleft()
        while len(self._streams) > 1 and self._streams[1][0] <= start:
            self._streams.popleft()
        stream_seconds = 0.0
        for i, (at, count) in enumerate(self._streams):
            until = self._streams[i + 1][0] if i + 1 < len(self._streams) else now
            stream_seconds += count * max(0.0, until - max(at, start))
        if stream_seconds >= MIN_STREAM_SECONDS:
            self._cost = sum(busy for _, busy in self._busy) / stream_seconds
        return self._cost
