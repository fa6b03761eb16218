"""Server metrics: thread-safe counters and histograms, exposed in the Prometheus text format by
``prometheus_client`` (with its process collector: CPU, memory, open files)."""

from __future__ import annotations

import bisect
import itertools
import math
import threading
from collections import Counter
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

PREFIX = "whisper_stream"
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)
DELAY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


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

    def family(self, name: str, help_text: str) -> HistogramMetricFamily:
        cumulative = itertools.accumulate(self.counts)
        return HistogramMetricFamily(name, help_text, sum_value=self.sum, buckets=[
            (floatToGoString(bound), count) for bound, count in zip((*self.buckets, math.inf), cumulative)])


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
        self.skipped_speculative = 0
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

    def count_skipped(self) -> None:
        """A speculative decode was not run: no worker was free for it."""
        with self._lock:
            self.skipped_speculative += 1

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
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Snapshot(self._families(gauges or {})))
        registry.register(ProcessCollector(registry=None))
        return generate_latest(registry).decode()

    def _families(self, gauges: dict[str, tuple[str, float]]) -> list[Metric]:
        rtf = self.real_time_factor
        p = PREFIX
        with self._lock:
            errors = CounterMetricFamily(f"{p}_errors", "Error messages sent and connections refused, by code.",
                                         labels=["code"])
            for code, n in sorted(self.errors.items()):
                errors.add_metric([code], n)
            families = [
                GaugeMetricFamily(f"{p}_streams_active", "Open streams.", self.streams_active),
                CounterMetricFamily(f"{p}_streams", "Streams accepted since start.", self.streams_total),
                CounterMetricFamily(f"{p}_audio_seconds", "Seconds of audio received.", self.audio_seconds),
                CounterMetricFamily(f"{p}_inference_requests", "Window decodes run.", self.requests),
                CounterMetricFamily(f"{p}_inference_failures", "Window decodes that raised.", self.request_failures),
                CounterMetricFamily(f"{p}_inference_busy_seconds", "Time the inference worker spent running.",
                                    self.busy_seconds),
                CounterMetricFamily(f"{p}_heap_trims", "Times freed memory was returned to the system.",
                                    self.heap_trims),
                CounterMetricFamily(f"{p}_heap_trim_seconds", "Time spent returning freed memory.",
                                    self.heap_trim_seconds),
                CounterMetricFamily(f"{p}_shed_decodes", "Final decodes run with a short audio context because "
                                    "they waited longer than --shed-after-ms.", self.shed_decodes),
                CounterMetricFamily(f"{p}_skipped_speculative_decodes", "Final decodes asked for at a pause, before "
                                    "the endpoint, and not run because no worker was free.", self.skipped_speculative),
                GaugeMetricFamily(f"{p}_real_time_factor", "Inference seconds per second of audio received.", rtf),
                self.batch_size.family(f"{p}_batch_size", "Window decodes per inference batch."),
                self.queue_delay.family(f"{p}_queue_delay_seconds", "Time a decode waited for the inference worker."),
                errors,
            ]
        return families + [GaugeMetricFamily(f"{p}_{name}", help_text, value)
                           for name, (help_text, value) in gauges.items()]


class _Snapshot(Collector):
    """Metric families computed once, for one exposition."""

    def __init__(self, families: list[Metric]):
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families
