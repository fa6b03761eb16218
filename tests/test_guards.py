"""Guards against streaming Whisper's failure patterns: loops, re-decoded overlap, restarts."""

from __future__ import annotations

from streaming.core.agreement import Word
from streaming.core.guards import cut_loops, drop_redecoded, drop_repetitions

ROOM = 0.5  # seconds heard after the committed words: too little for a few words said again


def words(text: str, start: float = 0.0) -> list[Word]:
    return [Word(f" {t}", start + i * 0.4, start + (i + 1) * 0.4, 0.9) for i, t in enumerate(text.split())]


def text(ws: list[Word]) -> str:
    return "".join(w.text for w in ws).strip()


def test_repetition_loops_are_cut_after_the_first_copy() -> None:
    assert text(drop_repetitions(words("ask what you can do ask what you can do ask"))) == "ask what you can do"
    assert text(drop_repetitions(words("no no no no matter"))) == "no"
    assert text(drop_repetitions(words("you you you"))) == "you"


def test_real_speech_with_repeated_words_is_kept() -> None:
    for phrase in ("no no matter", "fail again fail better", "press 1 to record press 2 to erase"):
        assert text(drop_repetitions(words(phrase))) == phrase
    assert drop_repetitions([]) == []


def test_a_loop_that_repeats_the_committed_prefix_is_cut() -> None:
    prefix = words("and so")
    new = words("my fellow americans and so my fellow americans and so my", start=1.0)
    assert text(cut_loops(prefix, new)) == "my fellow americans"


def test_overlap_with_the_end_of_the_committed_text_is_dropped() -> None:
    committed = words("ask what you can do")
    assert text(drop_redecoded(words("can do for your country", 2.0), committed, ROOM)) == "for your country"
    assert text(drop_redecoded(words("you can do. For your country", 2.0), committed, ROOM)) == "For your country"


def test_a_restart_after_a_differing_first_word_is_dropped() -> None:
    committed = words("Feels like these days go on forever.")
    assert drop_redecoded(words("Feel like these days go on forever.", 3.0), committed, ROOM) == []


def test_a_restarted_utterance_is_dropped() -> None:
    committed = words("The conference will begin when the leader arrives.")
    assert drop_redecoded(words("The conference will begin.", 3.0), committed, ROOM) == []


def test_a_phrase_said_again_is_kept_when_the_audio_after_the_committed_words_holds_it() -> None:
    committed = words("The conference will begin when the leader arrives.")
    assert text(drop_redecoded(words("The conference will begin.", 3.0), committed, room=2.0)) == (
        "The conference will begin.")


def test_short_repeated_phrases_in_menus_are_kept() -> None:
    committed = words("Press 1 to record your unavailable message. Press 2 to record your busy message. Press 3")
    new = words("to record your name.", 6.0)
    assert text(drop_redecoded(new, committed, ROOM)) == "to record your name."
    assert drop_redecoded(words("new words"), [], ROOM) == words("new words")


def test_a_restart_that_runs_past_the_committed_end_keeps_only_the_continuation() -> None:
    committed = words("Sorry, but the user mailbox can't accept")
    new = words("Sorry, but the user's mailbox can't accept more messages.", 3.0)
    assert text(drop_redecoded(new, committed, ROOM)) == "more messages."


def test_a_new_sentence_ending_like_the_last_one_is_kept() -> None:
    committed = words("Has left the conference.")
    new = words("Has joined the conference.", 3.0)
    assert text(drop_redecoded(new, committed, ROOM)) == "Has joined the conference."
