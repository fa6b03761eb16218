"""The browser client (clients/web/index.html) in headless Chromium, against the fake server and the real one.

Needs Debian's Chromium (/usr/bin/chromium) and Playwright for Python (its own browsers are not used).
Without them the tests skip, except in CI (CI=true), where they fail.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import serve_in_thread
from fake_server import DONE, FINALS, SCRIPT, STARTED, TEXT, Close, FakeServer, words_of, write_wav

from streaming.engine import Engine
from streaming.server import Server, ServerConfig

CHROMIUM = Path("/usr/bin/chromium")
PAGE = Path(__file__).resolve().parent.parent / "clients" / "web" / "index.html"
CHROMIUM_ARGS = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream", "--no-sandbox",
                 "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run"]
# The committed text on the page: the finals' text nodes, without the partial.
FINALS_JS = """() => [...document.querySelectorAll('#transcript p')]
  .map((p) => [...p.childNodes].filter((n) => n.nodeType === Node.TEXT_NODE).map((n) => n.data).join(''))
  .filter((t) => t).join(' ')"""


@pytest.fixture
def chromium() -> Any:
    """Playwright's ``sync_playwright``, once Chromium and Playwright are known to be there."""
    missing = []
    if not CHROMIUM.is_file():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("Playwright for Python (pip install playwright; no `playwright install` needed)")
    if missing:
        reason = "the browser test needs " + " and ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return sync_playwright


@contextlib.contextmanager
def open_page(chromium: Any, profile: Path, audio: Path, url: str) -> Iterator[Any]:
    """A page at ``url`` in a fresh headless Chromium whose microphone plays ``audio`` in a loop."""
    with chromium() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True,
            args=[*CHROMIUM_ARGS, f"--use-file-for-fake-audio-capture={audio}"])
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page_errors: list[str] = []
            page.on("pageerror", lambda error: page_errors.append(str(error)))
            page.goto(url)
            yield page
            assert page_errors == []
        finally:
            context.close()


def page_url(server_url: str, query: str = "") -> str:
    """The page's address on the server whose stream endpoint is ``server_url``."""
    return server_url.replace("ws://", "http://").replace("/v1/stream", "/") + query


@pytest.fixture
def tone_wav(tmp_path: Path) -> Path:
    t = np.arange(16000) / 16000
    return write_wav(tmp_path / "tone.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32))


# --- the audio path ------------------------------------------------------------------------------------

RESPONSE_JS = """
async ([rate, frequencies]) => {
  const result = {};
  for (const frequency of frequencies) {
    const context = new OfflineAudioContext(1, rate, rate);  // one second
    const url = URL.createObjectURL(new Blob([WORKLET_SOURCE], {type: "application/javascript"}));
    await context.audioWorklet.addModule(url);
    const node = new AudioWorkletNode(context, "downsampler", {numberOfOutputs: 1, outputChannelCount: [1]});
    const frames = [];
    node.port.onmessage = (event) => frames.push(new Int16Array(event.data));
    const tone = new OscillatorNode(context, {frequency});
    tone.connect(node);
    node.connect(context.destination);
    tone.start();
    await context.startRendering();
    await new Promise((resolve) => setTimeout(resolve, 300));  // frames posted at the end are still in flight
    const samples = frames.flatMap((frame) => Array.from(frame, (v) => v / 32767));
    const middle = samples.slice(1600, samples.length - 1600);
    const amplitude = Math.sqrt(middle.reduce((sum, v) => sum + v * v, 0) / middle.length) * Math.SQRT2;
    result[frequency] = {samples: samples.length, frame: frames[0].length, amplitude};
  }
  return result;
}
"""


@pytest.mark.parametrize("rate", [48000, 44100])
def test_the_worklet_low_passes_and_resamples_to_16k(chromium: Any, tmp_path: Path, tone_wav: Path,
                                                     rate: int) -> None:
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(serve_in_thread(FakeServer(page=PAGE).running))
        page = stack.enter_context(open_page(chromium, tmp_path / "profile", tone_wav, page_url(server.url)))
        response = page.evaluate(RESPONSE_JS, [rate, [300, 1000, 3000, 6000, 9000, 12000, 20000]])
    for frequency, measured in response.items():
        assert measured["frame"] == 320 and 16000 - 2 * 320 <= measured["samples"] <= 16000
        if int(frequency) <= 6000:
            assert measured["amplitude"] == pytest.approx(1.0, abs=0.01), frequency  # passband: flat
        else:
            assert measured["amplitude"] < 0.003, frequency  # no aliasing (naive decimation would give ~1)


TONES = {220: 0.2, 1000: 0.2, 2500: 0.2, 4700: 0.2}


def test_the_page_sends_the_microphone_audio_undistorted(chromium: Any, tmp_path: Path) -> None:
    t = np.arange(3 * 16000) / 16000  # analysed well inside the first pass: Chromium's loop is not seamless
    wav = write_wav(tmp_path / "tones.wav", sum(a * np.sin(2 * np.pi * f * t) for f, a in TONES.items()))
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(serve_in_thread(FakeServer(replies={"stop": []}, page=PAGE).running))
        page = stack.enter_context(open_page(chromium, tmp_path / "profile", wav, page_url(server.url)))
        page.get_by_role("button", name="Start").click()
        page.wait_for_function("() => document.getElementById('status').textContent.startsWith('Listening')")
        deadline = time.monotonic() + 30
        while len(server.audio) < 2 * 16000 * 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    y = np.frombuffer(bytes(server.audio), dtype="<i2")[12000:28000] / 32767  # one second, past the start
    t = t[: y.size]
    assert y.size == 16000
    fitted = np.zeros_like(y)
    for frequency, amplitude in TONES.items():
        basis = np.exp(2j * np.pi * frequency * t)
        component = 2 * np.vdot(basis, y) / y.size  # the tone's complex amplitude in the capture
        assert abs(component) == pytest.approx(amplitude, rel=0.01), frequency  # flat, no gain control
        fitted += (component * basis).real
    snr = 10 * np.log10(np.sum(fitted**2) / np.sum((y - fitted) ** 2))
    assert snr > 40  # no aliasing, no glitches, no voice processing (which Chromium turns on by default: ~14 dB)


# --- the page against the fake server ------------------------------------------------------------------


def test_start_streams_pcm_and_shows_partials_and_finals_then_stop_waits_for_done(
        chromium: Any, tmp_path: Path, tone_wav: Path) -> None:
    replies = {"audio": SCRIPT[:3], "stop": [*SCRIPT[3:], DONE, Close(1000)]}
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(serve_in_thread(FakeServer(replies=replies, token="abc", page=PAGE).running))
        page = stack.enter_context(open_page(chromium, tmp_path / "profile", tone_wav,
                                             page_url(server.url, "?token=abc")))
        assert page.get_attribute("#transcript", "aria-live") == "polite"
        assert page.get_attribute("#partial", "aria-hidden") == "true"
        page.get_by_role("button", name="Start").click()
        page.wait_for_function(f"() => ({FINALS_JS})() === {FINALS[0]['text'].strip()!r}")
        page.wait_for_function("() => document.getElementById('partial').textContent === ' ask not'")
        assert page.get_by_role("status").inner_text().startswith("Listening (model fake.en)")
        page.get_by_role("button", name="Stop").click()
        page.wait_for_function("() => document.getElementById('status').textContent.startsWith('Done')")
        assert page.evaluate(FINALS_JS) == TEXT
        assert page.locator("#partial").inner_text() == ""
        assert page.get_by_role("button", name="Start").is_enabled()
    assert "token=abc" in server.requests[0].path
    assert server.texts == [{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "channels": 1,
                             "interim_results": True}, {"type": "stop"}]
    assert server.audio_messages >= 2 and len(server.audio) % 2 == 0
    assert len(server.audio) >= 2 * 320 * (server.audio_messages - 1)  # 20 ms frames (the last may be short)


SPEAKERS_JS = """() => [...document.querySelectorAll('#transcript p')].filter((p) => p.querySelector('.speaker'))
  .map((p) => [p.textContent, getComputedStyle(p.querySelector('.speaker:not(.speaker-name)')).color])"""


def test_with_speakers_labelled_each_voice_gets_its_name_and_colour(chromium: Any, tmp_path: Path,
                                                                   tone_wav: Path) -> None:
    labelled = [{**final, "speaker": speaker, "words": [{**w, "speaker": speaker} for w in final["words"]]}
                for final, speaker in zip(FINALS, (0, 1, 0))]
    script = [labelled[0], labelled[1], {"type": "utterance_end", "segment": 0, "end": 6.2}, labelled[2]]
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(serve_in_thread(FakeServer(replies={"audio": script}, page=PAGE).running))
        page = stack.enter_context(open_page(chromium, tmp_path / "profile", tone_wav, page_url(server.url)))
        page.get_by_label("Label speakers").check()
        page.get_by_role("button", name="Start").click()
        page.wait_for_function(f"() => ({SPEAKERS_JS})().length === 3")
        shown = page.evaluate(SPEAKERS_JS)
    assert [text for text, _ in shown] == ["Speaker 1: And so my fellow Americans,",
                                           "Speaker 2: ask not what your country can do for you.",
                                           "Speaker 1: Ask what you can do for your country."]
    assert shown[0][1] == shown[2][1] != shown[1][1]
    assert server.texts[0]["diarize"] is True


def test_a_server_error_is_shown_and_the_page_can_start_again(chromium: Any, tmp_path: Path,
                                                              tone_wav: Path) -> None:
    error = {"type": "error", "code": "bad_start", "message": "bad start message: unknown field 'x'"}
    replies = {"start": [STARTED, error, {**DONE, "reason": "bad_start"}, Close(1008, "bad_start")]}
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(serve_in_thread(FakeServer(replies=replies, page=PAGE).running))
        page = stack.enter_context(open_page(chromium, tmp_path / "profile", tone_wav, page_url(server.url)))
        page.get_by_role("button", name="Start").click()
        alert = page.get_by_role("alert")
        alert.filter(has_text="bad_start").wait_for()
        assert alert.inner_text() == "Server error (bad_start): bad start message: unknown field 'x'"
        page.get_by_role("button", name="Start").wait_for()
        assert page.get_by_role("status").inner_text() == "Stopped."


def test_a_refused_connection_says_to_check_the_server_and_token(chromium: Any, tmp_path: Path,
                                                                 tone_wav: Path) -> None:
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(serve_in_thread(FakeServer(token="abc", page=PAGE).running))
        page = stack.enter_context(open_page(chromium, tmp_path / "profile", tone_wav, page_url(server.url)))
        page.get_by_role("button", name="Start").click()
        page.get_by_role("alert").filter(has_text="Cannot connect").wait_for()
        assert "is the server running, and is the token right" in page.get_by_role("alert").inner_text()
        assert page.get_by_role("button", name="Start").is_enabled()


# --- the page against the real server ------------------------------------------------------------------


@pytest.fixture(scope="module")
def jfk_wav(shared_eval: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The JFK sentence (first 11.5 s of en_mixed.wav) as 16-bit PCM WAV, for Chromium's fake microphone."""
    with wave.open(str(shared_eval / "streams" / "en_mixed.wav")) as w:
        params, pcm = w.getparams(), w.readframes(round(11.5 * w.getframerate()))
    assert params.sampwidth == 2
    path = tmp_path_factory.mktemp("audio") / "jfk.wav"
    with wave.open(str(path), "wb") as w:
        w.setparams(params)
        w.writeframes(pcm)
    return path


@pytest.mark.real_model
def test_live_captions_from_the_microphone_with_the_real_server(chromium: Any, tmp_path: Path,
                                                                jfk_wav: Path) -> None:
    engine = Engine.load("tiny.en", device="cpu")
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(serve_in_thread(lambda: Server(engine, ServerConfig(port=0))))
        page = stack.enter_context(open_page(chromium, tmp_path / "profile", jfk_wav, page_url(server.url)))
        page.get_by_role("button", name="Start").click()
        page.wait_for_function(f"() => /fellow.*country/is.test(({FINALS_JS})())", timeout=120_000)
        page.get_by_role("button", name="Stop").click()
        page.wait_for_function("() => document.getElementById('status').textContent.startsWith('Done')",
                               timeout=60_000)
        text = words_of(page.evaluate(FINALS_JS))
        assert page.locator("#error").inner_text() == ""
    # Word-level accuracy is the recogniser's business (tests of the server); this checks the page's path.
    assert re.search(r"\bfellow\b.*\bcountry\b", text), text
