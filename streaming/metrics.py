"""Server metrics: thread-safe counters and histograms rendered in the Prometheus text format."""

from __future__ import annotations

import bisect
import math
import threading
from collections import Counter
from collections.abc import Iterable, Sequence

PREFIX = "whisper_stream"
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)
DELAY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Histogram:
    """Cumulative-bucket histogram (not locked itself: :class:`Metrics` guards it)."""

    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self, name: str) -> Iterable[str]:
        total = 0
        for bound, count in zip((*self.buckets, math.inf), self.counts):
            total += count
            yield f'{name}_bucket{{le="{_number(bound)}"}} {total}'
        yield f"{name}_sum {_number(self.sum)}"
        yield f"{name}_count {self.count}"


class Metrics:
    """Everything ``/metrics`` reports; safe to update from the event loop and the inference thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.streams_active = 0
        self.streams_total = 0
        self.audio_seconds = 0.0
        self.errors: Counter[str] = Counter()
        self.requests = 0
        self.request_failures = 0
        self.busy_seconds = 0.0
        self.heap_trims = 0
        self.heap_trim_seconds = 0.0
        self.shed_decodes = 0
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.queue_delay = Histogram(DELAY_BUCKETS)

    def stream_opened(self) -> None:
        with self._lock:
            self.streams_active += 1
            self.streams_total += 1

    def stream_closed(self) -> None:
        with self._lock:
            self.streams_active -= 1

    def add_audio(self, seconds: float) -> None:
        if seconds > 0:
            with self._lock:
                self.audio_seconds += seconds

    def count_error(self, code: str) -> None:
        with self._lock:
            self.errors[code] += 1

    def observe_batch(self, delays: Sequence[float], busy_seconds: float, failures: int) -> None:
        """One inference batch: each request's queue delay, the batch's run time, requests that raised."""
        with self._lock:
            self.batch_size.observe(len(delays))
            for delay in delays:
                self.queue_delay.observe(delay)
            self.requests += len(delays)
            self.request_failures += failures
            self.busy_seconds += busy_seconds

    def count_shed(self) -> None:
        """A final decode ran with a short audio context because the workers were overloaded."""
        with self._lock:
            self.shed_decodes += 1

    def observe_heap_trim(self, seconds: float) -> None:
        """Freed memory was returned to the system, which took ``seconds``."""
        with self._lock:
            self.heap_trims += 1
            self.heap_trim_seconds += seconds

    @property
    def real_time_factor(self) -> float:
        """Inference seconds per second of audio received (0 before any audio)."""
        with self._lock:
            return self.busy_seconds / self.audio_seconds if self.audio_seconds else 0.0

    def render(self, gauges: dict[str, tuple[str, float]] | None = None) -> str:
        """Prometheus text exposition; ``gauges`` adds ``name: (help, value)`` gauges owned by the caller."""
        rtf = self.real_time_factor
        p = PREFIX
        with self._lock:
            lines = [
                *_metric(f"{p}_streams_active", "gauge", "Open streams.", self.streams_active),
                *_metric(f"{p}_streams_total", "counter", "Streams accepted since start.", self.streams_total),
                *_metric(f"{p}_audio_seconds_total", "counter", "Seconds of audio received.", self.audio_seconds),
                *_metric(f"{p}_inference_requests_total", "counter", "Window decodes run.", self.requests),
                *_metric(f"{p}_inference_failures_total", "counter", "Window decodes that raised.",
                         self.request_failures),
                *_metric(f"{p}_inference_busy_seconds_total", "counter", "Time the inference worker spent running.",
                         self.busy_seconds),
                *_metric(f"{p}_heap_trims_total", "counter", "Times freed memory was returned to the system.",
                         self.heap_trims),
                *_metric(f"{p}_heap_trim_seconds_total", "counter", "Time spent returning freed memory.",
                         self.heap_trim_seconds),
                *_metric(f"{p}_shed_decodes_total", "counter", "Final decodes run with a short audio context "
                         "because they waited longer than --shed-after-ms.", self.shed_decodes),
                *_metric(f"{p}_real_time_factor", "gauge", "Inference seconds per second of audio received.", rtf),
                f"# HELP {p}_batch_size Window decodes per inference batch.",
                f"# TYPE {p}_batch_size histogram",
                *self.batch_size.render(f"{p}_batch_size"),
                f"# HELP {p}_queue_delay_seconds Time a decode waited for the inference worker.",
                f"# TYPE {p}_queue_delay_seconds histogram",
                *self.queue_delay.render(f"{p}_queue_delay_seconds"),
                f"# HELP {p}_errors_total Error messages sent and connections refused, by code.",
                f"# TYPE {p}_errors_total counter",
                *(f'{p}_errors_total{{code="{code}"}} {n}' for code, n in sorted(self.errors.items())),
            ]
        for name, (help_text, value) in (gauges or {}).items():
            lines += _metric(f"{p}_{name}", "gauge", help_text, value)
        return "\n".join(lines) + "\n"


def _metric(name: str, kind: str, help_text: str, value: float) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {_number(value)}"]
