"""The heap trimmer: trims only after activity, and the real malloc_trim gives freed pages back."""

from __future__ import annotations

import threading

import pytest

from streaming.heap import HeapTrimmer, find_malloc_trim


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_trims_once_per_change_of_activity_and_reports_the_cost() -> None:
    activity, calls, costs = [0], [], []
    trimmer = HeapTrimmer(lambda: activity[0], trim=lambda pad: calls.append(pad) or 1, on_trim=costs.append)
    assert not trimmer.tick()  # nothing ran since it was created
    activity[0] = 1.5
    assert trimmer.tick() and not trimmer.tick()
    activity[0] = 2.0
    assert trimmer.tick()
    assert calls == [0, 0] and len(costs) == 2 and all(c >= 0 for c in costs)


def test_without_malloc_trim_it_does_nothing() -> None:
    activity = [0]
    trimmer = HeapTrimmer(lambda: activity[0])
    trimmer._trim = None  # a C library without malloc_trim (musl, macOS)
    trimmer.start()
    activity[0] = 1
    assert not trimmer.available and not trimmer.tick()
    trimmer.close()


@pytest.mark.parametrize("interval", [0, -1.0, float("nan")])
def test_a_bad_interval_is_refused(interval: float) -> None:
    with pytest.raises(ValueError, match="interval"):
        HeapTrimmer(lambda: 0, interval)


def test_the_thread_trims_while_there_is_activity_and_stops_on_close() -> None:
    activity, trimmed = [0], threading.Event()
    trimmer = HeapTrimmer(lambda: activity[0], interval=0.01, trim=lambda pad: trimmed.set() or 1)
    trimmer.start()
    activity[0] = 1
    assert trimmed.wait(10)
    trimmer.close()
    assert not trimmer._thread.is_alive()


@pytest.mark.skipif(find_malloc_trim() is None, reason="this C library has no malloc_trim (glibc only)")
def test_malloc_trim_returns_the_holes_a_worker_thread_left_in_its_arena() -> None:
    """What the server sees: a thread frees every other block; glibc keeps the holes resident until a trim."""
    kept: list[bytes] = []

    def fragment() -> None:
        blocks = [b"x" * 100_000 for _ in range(2000)]  # 200 MB in chunks under the mmap threshold
        kept.extend(blocks[1::2])
        del blocks

    worker = threading.Thread(target=fragment)
    worker.start()
    worker.join()
    before = resident_mb()
    activity = [0]
    trimmer = HeapTrimmer(lambda: activity[0])
    activity[0] = 1
    assert trimmer.tick()
    assert before - resident_mb() > 50, (before, resident_mb())
    assert len(kept) == 1000
