"""Tests for streaming.formats: the txt, srt, vtt and json transcript writers."""

from __future__ import annotations

import json

import pytest

from streaming.formats import FORMATS, Cue, _clock, render

CUES = [
    Cue(0.0, 2.5, " Hello there."),
    Cue(2.5, 3661.0456, " General Kenobi!", [{"word": " General", "start": 2.5, "end": 3.0, "probability": 0.9}]),
]


@pytest.mark.parametrize(("seconds", "srt", "vtt"), [
    (0.0, "00:00:00,000", "00:00:00.000"),
    (1.5, "00:00:01,500", "00:00:01.500"),
    (59.9996, "00:01:00,000", "00:01:00.000"),  # ms rounding carries into seconds and minutes
    (3599.9999, "01:00:00,000", "01:00:00.000"),
    (3725.0124, "01:02:05,012", "01:02:05.012"),
    (360000.0, "100:00:00,000", "100:00:00.000"),
    (-0.2, "00:00:00,000", "00:00:00.000"),
])
def test_clock(seconds: float, srt: str, vtt: str) -> None:
    assert _clock(seconds, ",") == srt
    assert _clock(seconds, ".") == vtt


def test_txt_one_stripped_line_per_cue() -> None:
    assert render(CUES, "txt") == "Hello there.\nGeneral Kenobi!\n"


def test_srt() -> None:
    assert render(CUES, "srt") == (
        "1\n00:00:00,000 --> 00:00:02,500\nHello there.\n"
        "\n"
        "2\n00:00:02,500 --> 01:01:01,046\nGeneral Kenobi!\n"
    )


def test_vtt() -> None:
    assert render(CUES, "vtt") == (
        "WEBVTT\n\n"
        "00:00:00.000 --> 00:00:02.500\nHello there.\n"
        "\n"
        "00:00:02.500 --> 01:01:01.046\nGeneral Kenobi!\n"
    )


def test_json() -> None:
    data = json.loads(render(CUES, "json", "en"))
    assert data["language"] == "en"
    assert data["text"] == "Hello there. General Kenobi!"
    assert data["segments"] == [
        {"start": 0.0, "end": 2.5, "text": "Hello there."},
        {"start": 2.5, "end": 3661.046, "text": "General Kenobi!",
         "words": [{"word": " General", "start": 2.5, "end": 3.0, "probability": 0.9}]},
    ]


def test_json_keeps_non_ascii_text() -> None:
    out = render([Cue(0, 1, " Después del tono")], "json", "es")
    assert "Después" in out
    assert json.loads(out)["segments"][0]["text"] == "Después del tono"


def test_blank_cues_are_dropped_and_numbering_stays_contiguous() -> None:
    cues = [Cue(0, 1, " one"), Cue(1, 2, "   "), Cue(2, 3, " two")]
    assert render(cues, "txt") == "one\ntwo\n"
    srt = render(cues, "srt")
    assert srt.startswith("1\n") and "\n\n2\n00:00:02,000 --> 00:00:03,000\ntwo\n" in srt
    assert "3\n" not in srt
    assert [s["text"] for s in json.loads(render(cues, "json"))["segments"]] == ["one", "two"]


def test_empty_input() -> None:
    assert render([], "txt") == "\n"
    assert render([], "srt") == ""
    assert render([], "vtt") == "WEBVTT\n\n"
    assert json.loads(render([], "json")) == {"language": None, "text": "", "segments": []}


def test_render_accepts_an_iterator() -> None:
    assert render(iter(CUES), "srt") == render(CUES, "srt")


def test_unknown_format() -> None:
    with pytest.raises(ValueError, match="unknown output format 'docx'") as info:
        render(CUES, "docx")
    assert all(fmt in str(info.value) for fmt in FORMATS)


SPOKEN = [Cue(0.0, 1.5, " Press one.", [{"word": " Press", "start": 0.0, "end": 0.6, "probability": 0.9,
                                           "speaker": 0}], speaker=0),
          Cue(2.0, 3.0, " Ask not.", speaker=1)]


def test_speaker_labels_in_every_format() -> None:
    assert render(SPOKEN, "txt") == "[SPEAKER 1] Press one.\n[SPEAKER 2] Ask not.\n"
    assert render(SPOKEN, "srt").endswith("2\n00:00:02,000 --> 00:00:03,000\n[SPEAKER 2] Ask not.\n")
    assert render(SPOKEN, "vtt").endswith("00:00:02.000 --> 00:00:03.000\n<v Speaker 2>Ask not.\n")
    segments = json.loads(render(SPOKEN, "json"))["segments"]
    assert [s["speaker"] for s in segments] == [0, 1] and segments[0]["words"][0]["speaker"] == 0
    assert json.loads(render(SPOKEN, "json"))["text"] == "Press one. Ask not."
