"""The Wyoming speech-to-text service (streaming/wyoming.py) through the wyoming package's own client, against
the real server on loopback ports: the tiny random model for the protocol, the bundled tiny.en for speech."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
import sys
import time
import urllib.error
import urllib.request
import wave
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import scorer
from signals import vowel
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.event import Event, async_read_event, async_write_event
from wyoming.info import Describe, Info
from wyoming.ping import Ping

from streaming import __version__
from streaming.cli import build_parser, main
from streaming.core.audio import SAMPLE_RATE, resample
from streaming.engine import Engine, configure_threads
from streaming.server import Server, ServerConfig
from streaming.testing import ServerProcess
from streaming.wyoming import DEFAULT_PORT, ZEROCONF_TYPE, WyomingService, check_zeroconf, parse_uri

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "deploy" / "compose.wyoming.yaml"
STREAMING_EVENTS = ["transcript-start", "transcript-chunk", "transcript-stop", "transcript"]


@pytest.fixture(scope="module")
def real_engine() -> Iterator[Engine]:
    threads = torch.get_num_threads()
    configure_threads(1)
    yield Engine.load("tiny.en")
    torch.set_num_threads(threads)


@contextlib.asynccontextmanager
async def serving(engine: Engine, **settings) -> AsyncIterator[tuple[Server, WyomingService]]:
    """The WebSocket server and the Wyoming service beside it, both on free loopback ports."""
    async with Server(engine, ServerConfig(port=0, **settings)) as server, \
            WyomingService(server, "tcp://127.0.0.1:0") as service:
        yield server, service


def client(service: WyomingService) -> AsyncTcpClient:
    return AsyncTcpClient("127.0.0.1", service.port, connect_timeout=10, read_timeout=120)


class RawClient:
    """A bare connection that writes events (and can vanish without closing properly)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    async def write_event(self, event: Event) -> None:
        await async_write_event(event, self.writer)


def pcm(audio: np.ndarray, width: int = 2, channels: int = 1) -> bytes:
    """Mono float audio as interleaved integer PCM of ``width`` bytes (8-bit unsigned, wider signed)."""
    audio = np.repeat(np.clip(audio, -1, 1), channels)
    if width == 1:
        return np.round(audio * 127 + 128).astype(np.uint8).tobytes()
    ints = np.round(audio * (2 ** (8 * width - 1) - 1)).astype("<i4" if width > 2 else "<i2")
    return ints.view(np.uint8).reshape(-1, 4)[:, :3].tobytes() if width == 3 else ints.tobytes()


async def send_command(wy: AsyncTcpClient | RawClient, audio: bytes, rate: int = SAMPLE_RATE, width: int = 2,
                       channels: int = 1, pace: float = 0.0, stop: bool = True) -> None:
    """transcribe, audio-start, 100 ms chunks (each followed by ``pace`` x 100 ms of waiting), audio-stop."""
    await wy.write_event(Transcribe(language="en").event())
    await wy.write_event(AudioStart(rate, width, channels).event())
    step = rate // 10 * width * channels
    for at in range(0, len(audio), step):
        await wy.write_event(AudioChunk(rate, width, channels, audio[at:at + step]).event())
        await asyncio.sleep(0.1 * pace)
    if stop:
        await wy.write_event(AudioStop().event())


async def events_until(wy: AsyncTcpClient, last: str = "transcript") -> list[Event]:
    """Events up to the first of type ``last``, or until the connection closes."""
    events = []
    while (event := await wy.read_event()) is not None:
        events.append(event)
        if event.type == last:
            break
    return events


def types(events: list[Event]) -> list[str]:
    return [e.type for e in events]


def errors(events: list[Event]) -> list[str]:
    return [e.data["code"] for e in events if e.type == "error"]


def streamed_in_order(events: list[Event]) -> str:
    """Check the streaming order (start, chunks, stop, transcript) and that the chunks make the transcript."""
    kinds = types(events)
    assert kinds[0] == "transcript-start" and kinds[-2:] == ["transcript-stop", "transcript"], kinds
    assert set(kinds[1:-2]) <= {"transcript-chunk"}, kinds
    text = Transcript.from_event(events[-1]).text
    assert "".join(e.data["text"] for e in events[1:-2]).strip() == text
    assert events[0].data["language"] == events[-1].data["language"] == "en"
    return text


async def wait_idle(server: Server) -> None:
    async with asyncio.timeout(30):
        while server.active_streams:
            await asyncio.sleep(0.02)
    assert server.metrics.streams_active == 0


def http_get(url: str) -> tuple[int, dict]:
    """A JSON endpoint's status and body (blocking: run it in a thread)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def audio_seconds(port: int) -> float:
    """``whisper_stream_audio_seconds_total`` from the server's /metrics (blocking: run it in a thread)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        (value,) = re.findall(r"^whisper_stream_audio_seconds_total (\S+)$", response.read().decode(), re.M)
    return float(value)


async def describes(service: WyomingService) -> Info:
    """A new client's describe: the service still answers."""
    async with client(service) as wy:
        await wy.write_event(Describe().event())
        event = await wy.read_event()
    assert event is not None and Info.is_type(event.type), event
    return Info.from_event(event)


# --- configuration -----------------------------------------------------------------------------------


def test_uris() -> None:
    assert parse_uri("tcp://0.0.0.0:10300") == ("0.0.0.0", DEFAULT_PORT)
    assert parse_uri("tcp://[::1]:0") == ("::1", 0)
    for bad in ("0.0.0.0:10300", "tcp://host", "unix:///tmp/s", "tcp://:10300", "tcp://h:99999", "tcp://h:1/x"):
        with pytest.raises(ValueError, match=r"tcp://HOST:PORT.*tcp://0\.0\.0\.0:10300"):
            parse_uri(bad)


def test_serve_refuses_bad_wyoming_options_before_loading_the_model(capsys: pytest.CaptureFixture[str],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["serve", "--wyoming-uri", "http://0.0.0.0:10300"]) == 2
    assert "tcp://HOST:PORT" in capsys.readouterr().err
    assert main(["serve", "--wyoming-zeroconf"]) == 2
    assert "add --wyoming-uri" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "zeroconf", None)  # import zeroconf now fails as if it were not installed
    with pytest.raises(RuntimeError, match=r"pip install zeroconf .*whisper-stream\[wyoming\]"):
        check_zeroconf()
    assert main(["serve", "--wyoming-uri", "tcp://127.0.0.1:10300", "--wyoming-zeroconf", "kitchen"]) == 2
    assert "pip install zeroconf" in capsys.readouterr().err


def test_the_compose_example_runs_the_service_on_the_wyoming_port() -> None:
    (service,) = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"].values()
    args = build_parser().parse_args(service["command"])
    assert args.command == "serve" and args.host == "0.0.0.0"
    host, port = parse_uri(args.wyoming_uri)
    assert (host, port) == ("0.0.0.0", DEFAULT_PORT)
    assert f"{DEFAULT_PORT}:{DEFAULT_PORT}" in service["ports"] and f"{args.port}:{args.port}" in service["ports"]


async def test_zeroconf_announces_the_service_for_home_assistant(tiny_engine: Engine) -> None:
    pytest.importorskip("zeroconf", reason="the zeroconf package is missing: pip install -e '.[wyoming]'")
    from zeroconf.asyncio import AsyncZeroconf

    async with Server(tiny_engine, ServerConfig(port=0)) as server, \
            WyomingService(server, "tcp://0.0.0.0:0", zeroconf_name="test-kitchen") as service:
        browser = AsyncZeroconf()
        try:
            found = await browser.async_get_service_info(ZEROCONF_TYPE, f"test-kitchen.{ZEROCONF_TYPE}", 5000)
        finally:
            await browser.async_close()
        assert found is not None and found.port == service.port
        async with AsyncTcpClient(found.parsed_addresses()[0], found.port) as wy:
            await wy.write_event(Describe().event())
            assert (await wy.read_event()).type == "info"


# --- the protocol, on the random model ---------------------------------------------------------------


async def test_describe_tells_the_program_the_model_and_streaming(tiny_engine: Engine) -> None:
    async with serving(tiny_engine) as (_, service):
        info = await describes(service)
        async with client(service) as wy:
            await wy.write_event(Ping(text="hi").event())
            pong = await wy.read_event()
    (program,) = info.asr
    assert program.name == "whisper-stream" and program.version == __version__ and program.installed
    assert program.supports_transcript_streaming and program.attribution.name
    (model,) = program.models
    assert model.name == "tiny-random" and model.languages == ["en"]
    assert model.attribution.url == "https://github.com/openai/whisper"
    assert pong is not None and pong.type == "pong" and pong.data["text"] == "hi"


async def test_a_command_counts_as_a_stream_and_streams_its_transcript(tiny_engine: Engine) -> None:
    audio = np.concatenate([np.zeros(4800, np.float32), vowel(1.5), np.zeros(8000, np.float32)])
    async with serving(tiny_engine) as (server, service), client(service) as wy:
        await send_command(wy, pcm(audio), stop=False)
        async with asyncio.timeout(30):
            while not server.active_streams:
                await asyncio.sleep(0.01)
        status, health = await asyncio.to_thread(http_get, f"http://127.0.0.1:{server.port}/healthz")
        assert status == 200 and health["active_streams"] == 1
        await wy.write_event(AudioStop().event())
        streamed_in_order(await events_until(wy))
        await wait_idle(server)
        # The connection stays open for the next command.
        await send_command(wy, pcm(audio))
        streamed_in_order(await events_until(wy))
    assert server.metrics.streams_total == 2
    assert server.metrics.audio_seconds == pytest.approx(2 * len(audio) / SAMPLE_RATE)


@pytest.mark.parametrize("raw, code", [
    (b"this is not json\n", "bad_event"),
    (b'["describe"]\n', "bad_event"),
    (b"[" * 20_000 + b"\n", "bad_event"),  # nesting too deep for the JSON parser
    (b'{"type": "describe", "data_length": 5}\nabcde', "bad_event"),
    (b'{"type": "audio-chunk", "data": {"rate": 16000, "width": 2, "channels": 1}, "payload_length": 8193}\n',
     "frame_too_large"),
    (b'{"type": "describe", "data_length": 1000000000}\n', "frame_too_large"),
    (b'{"type": "' + b"x" * 70_000, "bad_event"),
])
async def test_unframeable_input_gets_an_error_and_a_closed_connection(tiny_engine: Engine, raw: bytes,
                                                                       code: str) -> None:
    async with serving(tiny_engine, max_message_bytes=8192) as (server, service):
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(10):
            error = await async_read_event(reader)
            assert error is not None and error.type == "error" and error.data["code"] == code
            assert error.data["text"]
            assert await reader.read() == b""  # closed by the service
        writer.close()
        assert server.metrics.errors[code] == 1
        assert (await describes(service)).asr


async def test_recoverable_mistakes_get_an_error_and_keep_the_connection(tiny_engine: Engine) -> None:
    async with serving(tiny_engine) as (server, service), client(service) as wy:
        await wy.write_event(Event("synthesize", {"text": "hello"}))
        await wy.write_event(AudioChunk(SAMPLE_RATE, 2, 1, bytes(3200)).event())
        await wy.write_event(AudioStop().event())
        replies = [await wy.read_event() for _ in range(3)]
        assert errors(replies) == ["unknown_event", "audio_before_start", "audio_before_start"]
        assert "synthesize" in replies[0].data["text"] and "audio-start" in replies[1].data["text"]
        await wy.write_event(AudioStart(SAMPLE_RATE, 2, 1).event())
        await wy.write_event(AudioChunk(SAMPLE_RATE, 2, 1, bytes(3)).event())  # not whole frames
        await wy.write_event(AudioChunk(8000, 2, 1, bytes(1600)).event())  # another format mid-command
        await wy.write_event(AudioChunk(SAMPLE_RATE, 2, 1, pcm(vowel(1))).event())
        await wy.write_event(AudioStop().event())
        events = await events_until(wy)
        assert errors(events) == ["bad_audio", "format_changed"]
        streamed_in_order([e for e in events if e.type != "error"])
        await wy.write_event(Describe().event())
        assert (await wy.read_event()).type == "info"
    assert server.active_streams == 0


@pytest.mark.parametrize("rate, width, channels, code, needle", [
    (4000, 2, 1, "unsupported_format", "unsupported sample rate 4000"),
    (SAMPLE_RATE, 5, 1, "unsupported_format", "unsupported sample width 5"),
    (SAMPLE_RATE, 2, 9, "unsupported_format", "unsupported channel count 9"),
    ("16000", 2, 1, "bad_start", "sample_rate must be an integer"),
])
async def test_unsupported_audio_formats_are_refused(tiny_engine: Engine, rate: object, width: int, channels: int,
                                                     code: str, needle: str) -> None:
    async with serving(tiny_engine) as (server, service):
        async with client(service) as wy:
            await wy.write_event(Event("audio-start", {"rate": rate, "width": width, "channels": channels}))
            replies = await events_until(wy)
        assert errors(replies) == [code] and needle in replies[0].data["text"]
        assert len(replies) == 1  # then the connection closed
        await wait_idle(server)
        assert (await describes(service)).asr


async def test_an_oversize_audio_chunk_ends_the_connection_only(tiny_engine: Engine) -> None:
    async with serving(tiny_engine, max_message_bytes=4096) as (server, service):
        async with client(service) as wy:
            await send_command(wy, bytes(4096), stop=False)
            await wy.write_event(AudioChunk(SAMPLE_RATE, 2, 1, bytes(4098)).event())
            replies = await events_until(wy)
        assert errors(replies) == ["frame_too_large"] and "4098 bytes exceeds the 4096-byte limit" in str(replies)
        await wait_idle(server)
        async with client(service) as wy:
            await send_command(wy, pcm(vowel(1)))
            streamed_in_order(await events_until(wy))


async def test_commands_and_websocket_streams_share_the_stream_limit(tiny_engine: Engine) -> None:
    async with serving(tiny_engine, max_streams=1) as (server, service):
        async with connect(f"ws://127.0.0.1:{server.port}/v1/stream") as ws, client(service) as wy:
            assert json.loads(await ws.recv())["type"] == "ready"
            await wy.write_event(AudioStart(SAMPLE_RATE, 2, 1).event())
            replies = await events_until(wy)
            assert errors(replies) == ["capacity"] and "limit of 1 streams" in replies[0].data["text"]
            assert len(replies) == 1  # closed
        await wait_idle(server)
        async with client(service) as wy:
            await send_command(wy, pcm(vowel(1)), stop=False)
            with pytest.raises(InvalidStatus) as refused:
                async with connect(f"ws://127.0.0.1:{server.port}/v1/stream"):
                    pass
            assert refused.value.response.status_code == 503
            health = (await asyncio.to_thread(http_get, f"http://127.0.0.1:{server.port}/healthz"))[1]
            assert health["status"] == "full"
            await wy.write_event(AudioStop().event())
            streamed_in_order(await events_until(wy))
    assert server.metrics.errors["capacity"] == 2


async def test_a_client_leaving_mid_command_frees_its_stream(tiny_engine: Engine,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="streaming")
    async with serving(tiny_engine) as (server, service):
        leaver = RawClient(*await asyncio.open_connection("127.0.0.1", service.port))
        await send_command(leaver, pcm(vowel(3)), stop=False)
        leaver.writer.transport.abort()  # gone without audio-stop or a goodbye
        await wait_idle(server)
        async with client(service) as wy:
            await send_command(wy, pcm(vowel(1)))
            streamed_in_order(await events_until(wy))
    assert any("client left" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_draining_answers_open_commands_and_refuses_new_ones(tiny_engine: Engine) -> None:
    async with serving(tiny_engine) as (server, service):
        async with client(service) as talker, client(service) as silent, client(service) as late:
            await send_command(talker, pcm(vowel(2)), stop=False)
            await send_command(silent, bytes(3200), stop=False)  # nothing to decode: ends as soon as it drains
            async with asyncio.timeout(30):
                while server.active_streams < 2:
                    await asyncio.sleep(0.01)
            draining = asyncio.create_task(server.drain(30))
            for wy in (talker, silent):
                replies = await events_until(wy)
                assert types(replies)[-2:] == ["transcript-stop", "transcript"]
                assert await wy.read_event() is None  # closed after the transcript
            assert await draining
            await late.write_event(AudioStart(SAMPLE_RATE, 2, 1).event())
            assert errors(await events_until(late)) == ["draining"]


async def test_a_command_without_audio_stop_times_out_with_its_transcript(tiny_engine: Engine) -> None:
    async with serving(tiny_engine, idle_timeout=0.5) as (server, service), client(service) as wy:
        await send_command(wy, pcm(vowel(1)), stop=False)
        replies = await events_until(wy)
        assert errors(replies) == ["idle_timeout"]
        streamed_in_order([e for e in replies if e.type != "error"])
        assert await wy.read_event() is None
        await wait_idle(server)


# --- real speech, on the bundled tiny.en -------------------------------------------------------------


def spoken(shared_eval: Path, text: str) -> tuple[np.ndarray, dict]:
    """The en_prompts clip whose reference is ``text``, with 0.3 s of the stream's silence each side, and its
    reference (for the eval's scorer)."""
    reference = json.loads((shared_eval / "streams" / "en_prompts.json").read_text())
    (segment,) = [s for s in reference["segments"] if s["text"] == text]
    with wave.open(str(shared_eval / "streams" / "en_prompts.wav")) as w:
        w.setpos(round((segment["start"] - 0.3) * SAMPLE_RATE))
        frames = w.readframes(round((segment["end"] - segment["start"] + 0.6) * SAMPLE_RATE))
    audio = np.frombuffer(frames, "<i2").astype(np.float32) / 32768
    return audio, {"language": "en", "segments": [segment]}


def wer(shared_eval: Path, reference: dict, text: str) -> float:
    return scorer(shared_eval).score(reference, [{"t": 0.0, "type": "final", "text": text}])["wer"]


PASSWORD = "Please enter your password followed by the pound key."
NOT_IN_SERVICE = "The number you have dialed is not in service. Please check the number and try again."


@pytest.mark.real_model
@pytest.mark.parametrize("rate, width, channels", [(16000, 2, 1), (48000, 3, 2), (22050, 1, 1), (44100, 4, 2)])
async def test_a_spoken_command_in_any_pcm_format(real_engine: Engine, shared_eval: Path, rate: int, width: int,
                                                  channels: int) -> None:
    audio, reference = spoken(shared_eval, PASSWORD)
    async with serving(real_engine) as (server, service), client(service) as wy:
        await send_command(wy, pcm(resample(audio, SAMPLE_RATE, rate), width, channels), rate, width, channels)
        text = streamed_in_order(await events_until(wy))
    assert wer(shared_eval, reference, text) <= 0.15, text


@pytest.mark.real_model
async def test_finals_stream_while_the_audio_arrives(real_engine: Engine, shared_eval: Path) -> None:
    """At real-time pace, finals come as transcript-chunks before the audio ends, and the detector ends the
    utterance in the trailing second of silence: its final decode starts before audio-stop."""
    audio, reference = spoken(shared_eval, NOT_IN_SERVICE)
    audio = np.concatenate([audio, np.zeros(SAMPLE_RATE, np.float32)])
    async with serving(real_engine) as (server, service), client(service) as wy:
        finals_submitted: list[float] = []
        submit = server.scheduler.submit

        async def spy(request):
            if request.final:
                finals_submitted.append(time.monotonic())
            return await submit(request)

        server.scheduler.submit = spy
        received: list[tuple[float, Event]] = []

        async def receive() -> None:
            while (event := await wy.read_event()) is not None:
                received.append((time.monotonic(), event))
                if event.type == "transcript":
                    return

        receiving = asyncio.create_task(receive())
        await send_command(wy, pcm(audio), pace=1.0, stop=False)
        audio_sent = time.monotonic()
        await wy.write_event(AudioStop().event())
        await asyncio.wait_for(receiving, 60)
    text = streamed_in_order([event for _, event in received])
    assert wer(shared_eval, reference, text) <= 0.15, text
    assert next(t for t, e in received if e.type == "transcript-chunk") < audio_sent
    assert finals_submitted and finals_submitted[0] < audio_sent


@pytest.mark.real_model
async def test_two_clients_at_once_each_get_their_own_transcript(real_engine: Engine, shared_eval: Path) -> None:
    clips = [spoken(shared_eval, text) for text in (PASSWORD, NOT_IN_SERVICE)]
    async with serving(real_engine) as (server, service):

        async def one(audio: np.ndarray) -> str:
            async with client(service) as wy:
                await send_command(wy, pcm(audio), pace=0.5)
                return streamed_in_order(await events_until(wy))

        texts = await asyncio.gather(*(one(audio) for audio, _ in clips))
        assert server.metrics.streams_total == 2
    for text, (_, reference) in zip(texts, clips):
        assert wer(shared_eval, reference, text) <= 0.15, texts


@pytest.mark.real_model
def test_serve_with_a_wyoming_uri_answers_and_sigterm_drains_an_open_command(shared_eval: Path,
                                                                            tmp_path: Path) -> None:
    """``whisper-stream serve --wyoming-uri`` in a child process: both protocols listen; SIGTERM mid-command
    answers the command with the transcript of its audio so far, then the process exits 0."""
    audio, reference = spoken(shared_eval, PASSWORD)
    server = ServerProcess(["--wyoming-uri", "tcp://127.0.0.1:0", "--threads", "1", "--workers", "1",
                            "--device", "cpu", "--drain-seconds", "60"], tmp_path / "serve.log", cwd=REPO)
    try:
        async def command() -> list[Event]:
            async with AsyncTcpClient("127.0.0.1", server.address["wyoming_port"], read_timeout=120) as wy:
                await send_command(wy, pcm(audio), stop=False)
                async with asyncio.timeout(30):  # until the server has read all of it
                    while await asyncio.to_thread(audio_seconds, server.port) < len(audio) / SAMPLE_RATE:
                        await asyncio.sleep(0.05)
                server.process.send_signal(signal.SIGTERM)
                return await events_until(wy)

        text = streamed_in_order(asyncio.run(command()))
        assert server.process.wait(timeout=60) == 0
        log = server.log_text()
    finally:
        server.stop()
    assert wer(shared_eval, reference, text) <= 0.15, (text, log)
    assert "draining 1 open stream(s)" in log and "stopped" in log
