"""Tests for the wire JSON shape of recogniser events."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from streaming.core.agreement import Word
from streaming.core.events import Event, Final, LanguageDetected, Partial, UtteranceEnd


def test_partial_to_dict() -> None:
    event = Partial(segment=2, revision=5, text=" go forward", start=23.44449, end=24.0)
    assert event.to_dict() == {"type": "partial", "segment": 2, "revision": 5, "text": " go forward",
                               "start": 23.444, "end": 24.0}


def test_final_to_dict_rounds_times_and_probabilities() -> None:
    words = (Word(" Ask", 1.23456, 1.5, 0.987654), Word(" not.", 1.5, 1.9999, 0.5))
    event = Final(segment=0, text=" Ask not.", start=1.23456, end=1.9999, words=words)
    assert event.to_dict() == {
        "type": "final", "segment": 0, "text": " Ask not.", "start": 1.235, "end": 2.0,
        "words": [{"word": " Ask", "start": 1.235, "end": 1.5, "probability": 0.9877},
                  {"word": " not.", "start": 1.5, "end": 2.0, "probability": 0.5}],
    }


def test_utterance_end_and_language_to_dict() -> None:
    assert UtteranceEnd(segment=3, end=11.5004).to_dict() == {"type": "utterance_end", "segment": 3,
                                                              "end": 11.5}
    assert LanguageDetected("en", 0.912345).to_dict() == {"type": "language", "language": "en",
                                                          "probability": 0.9123}


@pytest.mark.parametrize(
    "event",
    [
        Partial(0, 0, "", 0.0, 0.0),
        Partial(1, 2, " héllo ¿", np.float32(1.1), np.float64(2.2)),
        Final(1, " hi", np.float32(0.5), 1.0, (Word(" hi", np.float32(0.5), 1.0, np.float32(0.75)),)),
        Final(4, "", 3.0, 3.0, ()),
        UtteranceEnd(1, np.float64(3.25)),
        LanguageDetected("es", np.float32(0.5)),
    ],
)
def test_events_are_json_serialisable_and_frozen(event: Event) -> None:
    data = event.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["type"] in {"partial", "final", "utterance_end", "language"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.segment = 9  # type: ignore[misc,union-attr]
