"""Soak: hours of audio through one real server, faster than real time, watching for leaks.

Starts ``whisper-stream serve`` (``python -m streaming.cli serve --port 0 --threads 1``) as a child process.
Several concurrent clients each connect over and over, stream a random slice of a random eval stream at a
random speed (several times real time), and end it one of three ways: ``stop`` (waiting for ``done``), an
abrupt disconnect mid-stream (the TCP connection aborted, no close handshake), or a close handshake
mid-stream without ``stop``. Refusals (``capacity``/``overloaded``) are counted and retried after a pause.

Phases: a warm-up under load, a pause until the server has no stream open (the idle *baseline* sample),
then the main run until ``--audio-hours`` of audio were sent or ``--minutes`` of wall time passed (whichever
comes first), cut into ``--segments`` load phases each followed by such an idle sample (the last one is the
*end*). Every ``--interval`` seconds under load it samples the RSS of the server and its child processes
(the inference processes of ``--worker-processes``), the server's open file descriptors and
threads (/proc/PID/status, /proc/PID/fd) with the streams completed and the final latency: for each
``final``, the wall time from sending the audio at its end to receiving it (the clients send faster than the
server transcribes, so this includes the backlog). It prints a row per sample and a summary with a verdict:
flat when the end has no more fds and threads than the baseline, idle RSS grew at most ``--max-rss-growth``
MB from the middle idle sample to the end, and (when the second half spans 20 min or more) the least-squares
slope of RSS under load over the second half is at most ``--max-rss-slope`` MB/h. Every sample goes to a JSON
file in ``--out``, the server's log beside it.

Usage: python benchmarks/soak.py [--audio-hours 2] [--minutes M] [--streams 4] [--speed 4 10] [--interval 30]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shlex
import statistics
import sys
import time
import urllib.error
import urllib.request
import wave
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from evalkit import child_pids
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from streaming.testing import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_EVAL = Path(os.environ.get("WHISPER_STREAM_EVAL", ROOT.parent / "shared" / "eval"))
SR = 16000
CHUNK_SECONDS = 0.1
REFUSALS = ("capacity", "overloaded")
MIN_SLOPE_SPAN = 1200.0  # seconds of loaded samples before an RSS slope per hour means anything


@dataclass
class SoakConfig:
    """What to run; the run ends at ``audio_hours`` of audio sent or ``minutes`` of wall time, the first."""

    audio_hours: float = 2.0
    minutes: float | None = None
    streams: int = 4
    speed: tuple[float, float] = (4.0, 10.0)
    slice_seconds: tuple[float, float] = (5.0, 60.0)
    abort_share: float = 0.25  # streams dropped mid-stream without a close handshake
    close_share: float = 0.1  # streams closed mid-stream with a close handshake but no stop
    interval: float = 30.0
    warmup: float = 30.0
    segments: int = 4  # the main run is cut into this many load phases, each followed by an idle sample
    settle: float = 3.0
    seed: int = 0
    model: str = "tiny.en"
    server_args: tuple[str, ...] = ("--max-utilization", "0")  # admission off: every client streams
    eval_dir: Path = DEFAULT_EVAL
    out: Path = ROOT / "benchmarks" / "out" / "soak"
    max_rss_growth: float = 30.0  # MB of idle RSS growth from the middle to the end that still counts as flat
    max_rss_slope: float = 50.0  # MB/hour under load over the second half (judged when it spans 20 min)
    quiet: bool = False


@dataclass
class Tally:
    """Everything the clients saw, cumulative."""

    audio_seconds: float = 0.0
    streams: dict[str, int] = field(default_factory=lambda: {"stop": 0, "abort": 0, "close": 0, "refused": 0,
                                                            "failed": 0})
    finals: int = 0
    latencies: list[float] = field(default_factory=list)  # final latencies (s)
    done_delays: list[float] = field(default_factory=list)  # stop sent -> done received (s)
    errors: dict[str, int] = field(default_factory=dict)  # error codes other than refusals
    warnings: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # what went wrong in failed streams (first few)


# --- the server process -----------------------------------------------------------------------------


def _status_field(status: str, name: str) -> int:
    """An integer field (e.g. VmRSS in kB, Threads) of a /proc/PID/status text; 0 where it is missing."""
    found = re.search(rf"^{name}:\s+(\d+)", status, re.M)
    return int(found.group(1)) if found else 0


def _rss_kb(pid: int) -> int:
    """VmRSS of process ``pid`` in kB (0 once it has exited)."""
    try:
        return _status_field(Path(f"/proc/{pid}/status").read_text(), "VmRSS")
    except OSError:
        return 0


class SoakServer(ServerProcess):
    """The server under soak: its memory, descriptors and threads, its health, and what its log reports."""

    def __init__(self, model: str, extra: tuple[str, ...], log: Path):
        super().__init__(["--threads", "1", "--model", model, "--max-streams", "64", "--log-level", "info", *extra],
                         log, cwd=ROOT)

    def logged(self) -> dict[str, int]:
        """Warning, error and traceback lines in the server's log so far."""
        lines = self.log_text().splitlines()
        return {kind: sum(needle in line for line in lines)
                for kind, needle in (("warning", " WARNING "), ("error", " ERROR "), ("traceback", "Traceback"))}

    def sample(self) -> dict[str, float]:
        """RSS (MB) of the server process and its children (the inference processes of
        ``--worker-processes``), and the server process's open file descriptors and threads."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        rss_kb = _status_field(status, "VmRSS") + sum(_rss_kb(child) for child in child_pids(self.pid))
        return {"rss_mb": round(rss_kb / 1024, 1), "fds": len(os.listdir(f"/proc/{self.pid}/fd")),
                "threads": _status_field(status, "Threads")}

    def health(self) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(f"{self.http_url}/healthz", timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:  # 503: full
            return json.loads(exc.read())


# --- the clients ------------------------------------------------------------------------------------


def load_audio(eval_dir: Path) -> dict[str, bytes]:
    """Every eval stream as raw 16 kHz mono s16 PCM."""
    streams = {}
    for path in sorted((eval_dir / "streams").glob("*.wav")):
        with wave.open(str(path)) as w:
            if (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (SR, 1, 2):
                streams[path.stem] = w.readframes(w.getnframes())
    if not streams:
        raise FileNotFoundError(f"no 16 kHz mono eval streams in {eval_dir / 'streams'}")
    return streams


class Budget:
    """When to stop starting streams: enough audio sent (in all, ``audio_seconds``) or the deadline passed."""

    def __init__(self, tally: Tally, audio_seconds: float, deadline: float):
        self.tally, self.audio_seconds, self.deadline = tally, audio_seconds, deadline

    def spent(self) -> bool:
        return self.tally.audio_seconds >= self.audio_seconds or time.monotonic() >= self.deadline


async def one_stream(url: str, pcm: bytes, speed: float, ending: str, cut: float, tally: Tally) -> str:
    """Stream ``pcm`` at ``speed`` x real time; ``ending``: stop, abort or close (the last two after the
    ``cut`` share of the audio). Returns how it ended: the ending, ``refused`` or ``failed``."""
    chunk = int(SR * CHUNK_SECONDS) * 2
    chunks = [pcm[at:at + chunk] for at in range(0, len(pcm), chunk)]
    if ending != "stop":
        chunks = chunks[:max(1, int(len(chunks) * cut))]
    async with asyncio.timeout(60 + 2 * len(chunks) * CHUNK_SECONDS):
        try:
            ws = await connect(url, open_timeout=30)
        except InvalidStatus as exc:  # 503: full (capacity, overloaded)
            if exc.response.status_code != 503:
                raise
            tally.streams["refused"] += 1
            return "refused"
        try:
            first = json.loads(await ws.recv())
            if first["type"] == "error":  # refused in a race with another connection
                outcome = "refused" if first["code"] in REFUSALS else "failed"
                tally.streams[outcome] += 1
                if outcome == "failed":
                    tally.errors[first["code"]] = tally.errors.get(first["code"], 0) + 1
                return outcome
            sent_at: list[float] = []  # wall time at which each chunk went out
            receiver = asyncio.create_task(receive(ws, sent_at, tally))
            began = time.monotonic()
            for i, data in enumerate(chunks):
                await asyncio.sleep(max(0.0, began + i * CHUNK_SECONDS / speed - time.monotonic()))
                await ws.send(data)
                sent_at.append(time.monotonic())
                tally.audio_seconds += len(data) / (2 * SR)
            if ending == "abort":
                ws.transport.abort()
            elif ending == "close":
                await ws.close()
            else:
                await ws.send('{"type": "stop"}')
            stopped = time.monotonic()
            done = await receiver
            if ending == "stop":
                if done is None:
                    raise RuntimeError(f"no done after stop (close code {ws.close_code})")
                tally.done_delays.append(time.monotonic() - stopped)
            tally.streams[ending] += 1
            return ending
        finally:
            ws.transport.abort()


async def receive(ws: ClientConnection, sent_at: list[float], tally: Tally) -> dict | None:
    """Record finals (with their latency), errors and warnings until the connection closes; the ``done``."""
    done = None
    with contextlib.suppress(ConnectionClosed):
        async for text in ws:
            message = json.loads(text)
            kind = message["type"]
            if kind == "final":
                tally.finals += 1
                index = min(len(sent_at), int(message["end"] / CHUNK_SECONDS - 1e-6) + 1) - 1
                if index >= 0:
                    tally.latencies.append(time.monotonic() - sent_at[index])
            elif kind == "error":
                tally.errors[message["code"]] = tally.errors.get(message["code"], 0) + 1
            elif kind == "warning":
                tally.warnings[message["code"]] = tally.warnings.get(message["code"], 0) + 1
            elif kind == "done":
                done = message
    return done


async def client(url: str, audio: dict[str, bytes], config: SoakConfig, budget: Budget, rng: random.Random) -> None:
    """Stream after stream until the budget is spent."""
    names = sorted(audio)
    weights = [len(audio[n]) for n in names]
    while not budget.spent():
        pcm = audio[rng.choices(names, weights)[0]]
        seconds = min(rng.uniform(*config.slice_seconds), len(pcm) / (2 * SR))
        start = rng.uniform(0, len(pcm) / (2 * SR) - seconds)
        piece = pcm[int(start * SR) * 2:int((start + seconds) * SR) * 2]
        roll = rng.random()
        ending = "abort" if roll < config.abort_share else "close" if roll < config.abort_share + config.close_share \
            else "stop"
        try:
            outcome = await one_stream(url, piece, rng.uniform(*config.speed), ending, rng.uniform(0.1, 0.9),
                                       budget.tally)
        except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError, RuntimeError) as exc:
            outcome = "failed"
            budget.tally.streams["failed"] += 1
            if len(budget.tally.failures) < 10:
                budget.tally.failures.append(f"{ending}: {exc!r}")
        if outcome in ("refused", "failed"):
            await asyncio.sleep(rng.uniform(0.2, 1.0))  # retry after a pause


# --- sampling and the run ---------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per hour."""
    if len(points) < 3:
        return None
    xs, ys = zip(*points)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return None if var == 0 else round(3600 * sum((x - mx) * (y - my) for x, y in points) / var, 1)


class SoakRun:
    """One soak run: the server, the clients, the samples."""

    def __init__(self, config: SoakConfig):
        self.config = config
        self.audio = load_audio(config.eval_dir)
        self.tally = Tally()
        self.samples: list[dict[str, Any]] = []
        self.started = time.monotonic()
        self.config.out.mkdir(parents=True, exist_ok=True)
        self.stamp = time.strftime("%Y%m%d-%H%M%S")
        self.server = SoakServer(config.model, config.server_args, config.out / f"server-{self.stamp}.log")
        self._mark = (0, 0)  # latencies and finals counted at the previous sample

    def sample(self, phase: str) -> dict[str, Any]:
        latencies = self.tally.latencies[self._mark[0]:]
        process = self.server.sample()  # before /healthz, whose connection holds a socket for a moment
        row = {"t": round(time.monotonic() - self.started, 1), "phase": phase, **process,
               "active": self.server.health().get("active_streams"),
               "audio_hours": round(self.tally.audio_seconds / 3600, 4),
               **{f"streams_{k}": v for k, v in self.tally.streams.items()},
               "finals": self.tally.finals - self._mark[1], "latency_p50": pct(latencies, 0.5),
               "latency_p90": pct(latencies, 0.9)}
        self._mark = (len(self.tally.latencies), self.tally.finals)
        self.samples.append(row)
        if not self.config.quiet:
            print_row(row, header=len(self.samples) == 1)
        return row

    async def load(self, seconds: float, audio_seconds: float, rng: random.Random) -> None:
        """All clients until ``seconds`` passed or ``audio_seconds`` more audio was sent; samples meanwhile."""
        budget = Budget(self.tally, self.tally.audio_seconds + audio_seconds, time.monotonic() + seconds)
        clients = [asyncio.create_task(client(self.server.url, self.audio, self.config, budget,
                                              random.Random(rng.random()))) for _ in range(self.config.streams)]
        while not all(c.done() for c in clients):
            await asyncio.wait(clients, timeout=self.config.interval)
            if not all(c.done() for c in clients):
                await asyncio.to_thread(self.sample, "load")
        for task in clients:
            task.result()

    async def idle(self, phase: str) -> dict[str, Any]:
        """Wait until the server has no stream open, let it settle, sample."""
        for _ in range(600):
            if (await asyncio.to_thread(self.server.health)).get("active_streams") == 0:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(self.config.settle)
        return await asyncio.to_thread(self.sample, phase)

    async def main(self) -> dict[str, Any]:
        config = self.config
        rng = random.Random(config.seed)
        start = await asyncio.to_thread(self.sample, "start")
        deadline = self.started + (config.minutes * 60 if config.minutes is not None else float("inf"))
        audio_total = config.audio_hours * 3600
        await self.load(min(config.warmup, (deadline - time.monotonic()) / 4), audio_total / 4, rng)
        idle = [await self.idle("baseline")]
        main_started = time.monotonic()
        # Equal segments, so that the middle-to-end comparison covers as much streaming as any other.
        seconds = max(0.0, deadline - main_started) / config.segments
        audio = max(0.0, audio_total - self.tally.audio_seconds) / config.segments
        for k in range(config.segments):
            await self.load(seconds, audio, rng)
            idle.append(await self.idle("end" if k == config.segments - 1 else f"idle{k + 1}"))
        return self.summary(start, idle, time.monotonic() - main_started)

    def summary(self, start: dict, idle: list[dict], main_seconds: float) -> dict[str, Any]:
        """``idle``: the idle samples, baseline first; middle and end are compared at idle, where the load
        does not move RSS."""
        baseline, middle, end = idle[0], idle[len(idle) // 2], idle[-1]
        loaded = [s for s in self.samples if s["phase"] == "load" and s["t"] >= baseline["t"]]
        half = [s for s in loaded if s["t"] >= (baseline["t"] + end["t"]) / 2]
        span = half[-1]["t"] - half[0]["t"] if half else 0.0
        slope = slope_per_hour([(s["t"], s["rss_mb"]) for s in half])
        growth = round(end["rss_mb"] - middle["rss_mb"], 1)
        wall = time.monotonic() - self.started
        verdict = []
        if end["fds"] > baseline["fds"]:
            verdict.append(f"fds {baseline['fds']} -> {end['fds']}")
        if end["threads"] > baseline["threads"]:
            verdict.append(f"threads {baseline['threads']} -> {end['threads']}")
        if growth > self.config.max_rss_growth:
            verdict.append(f"idle RSS grew {growth:g} MB from the middle to the end (> {self.config.max_rss_growth:g})")
        if slope is not None and span >= MIN_SLOPE_SPAN and slope > self.config.max_rss_slope:
            verdict.append(f"RSS under load grows {slope:g} MB/h (> {self.config.max_rss_slope:g})")
        t = self.tally
        return {
            "wall_seconds": round(wall, 1), "main_seconds": round(main_seconds, 1),
            "audio_hours": round(t.audio_seconds / 3600, 3), "speedup": round(t.audio_seconds / wall, 2),
            "streams": dict(t.streams), "finals": t.finals,
            "latency_p50": pct(t.latencies, 0.5), "latency_p90": pct(t.latencies, 0.9),
            "done_delay_p50": pct(t.done_delays, 0.5), "done_delay_p90": pct(t.done_delays, 0.9),
            "errors": dict(t.errors), "warnings": dict(t.warnings), "failures": list(t.failures),
            "start": pick(start), "baseline": pick(baseline), "middle": pick(middle), "end": pick(end),
            "idle_rss_mb": [s["rss_mb"] for s in idle], "rss_growth_middle_to_end_mb": growth,
            "rss_slope_mb_per_hour": slope, "rss_slope_span_seconds": round(span),
            "server_log": {**self.server.logged(), "path": str(self.server.log)},
            "verdict": "flat" if not verdict else "NOT flat: " + "; ".join(verdict),
        }


def pick(sample: dict) -> dict:
    return {k: sample[k] for k in ("t", "rss_mb", "fds", "threads")}


def print_row(row: dict, header: bool) -> None:
    columns = ("t", "phase", "rss_mb", "fds", "threads", "active", "audio_hours", "streams_stop", "streams_abort",
               "streams_close", "streams_refused", "streams_failed", "finals", "latency_p50", "latency_p90")
    if header:
        print(" ".join(f"{c.replace('streams_', ''):>9}" for c in columns))
    print(" ".join(f"{'-' if row[c] is None else row[c]:>9}" for c in columns), flush=True)


def soak(config: SoakConfig) -> dict[str, Any]:
    """Run the soak; returns the summary (also written, with every sample, to ``config.out``)."""
    run = SoakRun(config)
    try:
        summary = asyncio.run(run.main())
    finally:
        exit_code = run.server.stop()
    summary["server_exit_code"] = exit_code
    path = config.out / f"soak-{run.stamp}.json"
    config_json = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
    path.write_text(json.dumps({"config": config_json, "summary": summary, "samples": run.samples}, indent=1))
    summary["json"] = str(path)
    return summary


def print_summary(s: dict[str, Any]) -> None:
    print(f"\n# soak summary: {s['wall_seconds'] / 60:.1f} min wall, {s['audio_hours']:.2f} h of audio "
          f"({s['speedup']:g}x real time)")
    print(f"streams: {s['streams']}; finals {s['finals']}; final latency p50 {s['latency_p50']} s, "
          f"p90 {s['latency_p90']} s; stop -> done p50 {s['done_delay_p50']} s, p90 {s['done_delay_p90']} s")
    print(f"errors {s['errors'] or 'none'}; warnings {s['warnings'] or 'none'}; client failures "
          f"{s['failures'] or 'none'}; server log {s['server_log']}; server exit code {s['server_exit_code']}")
    print(f"{'':>9} {'t s':>8} {'RSS MB':>8} {'fds':>5} {'threads':>8}")
    for name in ("start", "baseline", "middle", "end"):
        row = s[name]
        print(f"{name:>9} {row['t']:>8} {row['rss_mb']:>8} {row['fds']:>5} {row['threads']:>8}")
    print(f"idle RSS {s['idle_rss_mb']} MB: middle -> end {s['rss_growth_middle_to_end_mb']:+g} MB; RSS slope "
          f"under load over the second half: {s['rss_slope_mb_per_hour']} MB/h over {s['rss_slope_span_seconds']} s")
    print(f"verdict: {s['verdict']}\nsamples: {s['json']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--audio-hours", type=float, default=2.0, help="audio to send in all (default: 2)")
    parser.add_argument("--minutes", type=float, default=None, help="wall-time limit (default: none)")
    parser.add_argument("--streams", type=int, default=4, help="concurrent clients (default: 4)")
    parser.add_argument("--speed", type=float, nargs=2, default=(4.0, 10.0), metavar=("MIN", "MAX"),
                        help="x real time per stream, drawn uniformly (default: 4 10)")
    parser.add_argument("--slice", type=float, nargs=2, default=(5.0, 60.0), metavar=("MIN", "MAX"),
                        help="seconds of audio per stream (default: 5 60)")
    parser.add_argument("--abort-share", type=float, default=0.25, help="streams dropped mid-stream")
    parser.add_argument("--close-share", type=float, default=0.1, help="streams closed mid-stream without stop")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between samples (default: 30)")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds of load before the baseline")
    parser.add_argument("--segments", type=int, default=4, help="load phases after the baseline, each followed "
                                                                 "by an idle sample (default: 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--server-args", default="--max-utilization 0",
                        help="more `serve` flags (default: '--max-utilization 0', admission control off, so that "
                             "every client streams however loaded the server is)")
    parser.add_argument("--eval", type=Path, default=DEFAULT_EVAL, help="the eval directory (with streams/)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "soak")
    parser.add_argument("--max-rss-growth", type=float, default=30.0,
                        help="flat: idle RSS grows at most this from the middle to the end, MB (default: 30)")
    parser.add_argument("--max-rss-slope", type=float, default=50.0,
                        help="flat: RSS under load grows at most this, MB/h, over a second half of 20+ min")
    args = parser.parse_args()
    config = SoakConfig(audio_hours=args.audio_hours, minutes=args.minutes, streams=args.streams,
                        speed=tuple(args.speed), slice_seconds=tuple(args.slice), abort_share=args.abort_share,
                        close_share=args.close_share, interval=args.interval, warmup=args.warmup,
                        segments=args.segments, seed=args.seed, model=args.model,
                        server_args=tuple(shlex.split(args.server_args)), eval_dir=args.eval, out=args.out,
                        max_rss_growth=args.max_rss_growth, max_rss_slope=args.max_rss_slope)
    limit = f"{config.minutes:g} min or " if config.minutes is not None else ""
    print(f"# soak: {limit}{config.audio_hours:g} h of audio, {config.streams} streams at {config.speed[0]:g}-"
          f"{config.speed[1]:g}x, {os.cpu_count()} cores, Python {sys.version.split()[0]}", flush=True)
    print_summary(soak(config))


if __name__ == "__main__":
    main()
