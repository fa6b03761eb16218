"""Tests for the LocalAgreement-n commit policy."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streaming.core.agreement import LocalAgreement, Word, normalize


def words(text: str, start: float = 0.0, step: float = 0.5, probability: float = 0.9) -> list[Word]:
    """Whisper-style words (leading space) spaced ``step`` seconds apart from ``start``."""
    return [Word(f" {t}", start + i * step, start + (i + 1) * step, probability)
            for i, t in enumerate(text.split())]


def text(ws: list[Word]) -> str:
    return "".join(w.text for w in ws)


def test_normalize_strips_case_whitespace_and_surrounding_punctuation() -> None:
    assert normalize(" Hello,") == normalize("hello") == normalize('"HELLO!"') == "hello"
    assert normalize(" ¿Qué?") == "qué"
    assert normalize(" don't") == "don't"
    assert normalize(" ...") == ""


def test_n_must_be_positive() -> None:
    with pytest.raises(ValueError, match="n=0"):
        LocalAgreement(0)


def test_margin_holds_back_a_word_the_older_hypothesis_heard_only_to_its_end() -> None:
    la = LocalAgreement(2, margin=0.3)
    la.update(words("call for"), heard_until=1.05)  # "for" ends at 1.0: the audio was cut inside "forwarding"
    committed, partial = la.update(words("call for"), heard_until=1.85)  # the same cut twice: agreed
    assert text(committed) == " call" and text(partial) == " for"
    committed, partial = la.update(words("forwarding to", start=0.5), heard_until=2.6)
    assert committed == [] and text(partial) == " forwarding to"  # not "for reading"
    committed, _ = la.update(words("forwarding to you", start=0.5), heard_until=3.4)
    assert text(committed) == " forwarding to"


def test_an_unsure_word_stops_agreement_until_it_is_sure() -> None:
    la = LocalAgreement(2, min_probability=0.5)
    unsure = [Word(" the", 0.0, 0.3, 0.9), Word(" dial", 0.3, 0.6, 0.3), Word(" tone", 0.6, 0.9, 0.9)]
    la.update(unsure)
    committed, partial = la.update(unsure)
    assert text(committed) == " the" and text(partial) == " dial tone"  # "tone" waits behind "dial"
    sure = [Word(" dial", 0.3, 0.6, 0.8), Word(" tone", 0.6, 0.9, 0.9)]
    assert text(la.update(sure)[0]) == " dial tone"  # the newest hypothesis heard more and is sure
    la.update(words("is on"))
    assert la.update([Word(" is", 0.9, 1.2, 0.2), Word(" on", 1.2, 1.5, 0.9)])[0] == []  # now it doubts
    with pytest.raises(ValueError, match="min_probability=2"):
        LocalAgreement(2, min_probability=2)


def test_the_first_word_since_reset_must_be_sure_in_every_hypothesis() -> None:
    la = LocalAgreement(2, min_probability=0.3)
    la.update([Word(" Mark", 0.0, 0.3, 0.29), Word(" three", 0.3, 0.6, 0.8)])
    committed, partial = la.update([Word(" Mark", 0.0, 0.3, 0.31), Word(" three", 0.3, 0.6, 0.8)])
    assert committed == [] and text(partial) == " Mark three"  # the older hypothesis doubted it
    committed, _ = la.update([Word(" Mark", 0.0, 0.3, 0.6), Word(" three", 0.3, 0.6, 0.8)])
    assert text(committed) == " Mark three"  # both sure now; after it, only the newest hypothesis counts
    la.update([Word(" to", 0.6, 0.9, 0.2)])
    assert text(la.update([Word(" to", 0.6, 0.9, 0.5)])[0]) == " to"
    la.reset()  # a new utterance: its first word is checked in both hypotheses again
    la.update([Word(" What", 0.0, 0.3, 0.28)])
    assert la.update([Word(" What", 0.0, 0.3, 0.48)])[0] == []


def test_without_margin_a_word_at_the_window_end_is_committed() -> None:
    la = LocalAgreement(2)
    la.update(words("call for"), heard_until=1.05)
    assert text(la.update(words("call for"), heard_until=1.85)[0]) == " call for"
    with pytest.raises(ValueError, match="margin=-1"):
        LocalAgreement(2, margin=-1)


def test_local_agreement_2_commits_the_common_prefix() -> None:
    la = LocalAgreement(2)
    assert la.update(words("and so")) == ([], words("and so"))
    committed, partial = la.update(words("and so my fellow"))
    assert text(committed) == " and so" and text(partial) == " my fellow"
    # The caller now passes only the uncommitted part; it is compared with the shifted remainder.
    committed, partial = la.update(words("my fellow americans", start=1.0))
    assert text(committed) == " my fellow" and text(partial) == " americans"
    committed, partial = la.update(words("americans ask", start=2.0))
    assert text(committed) == " americans" and text(partial) == " ask"
    assert text(la.commit_all()) == " ask"
    assert la.commit_all() == []


def test_disagreement_commits_only_up_to_the_first_difference() -> None:
    la = LocalAgreement(2)
    la.update(words("ask knot what"))
    committed, partial = la.update(words("ask not what"))
    assert text(committed) == " ask" and text(partial) == " not what"
    committed, partial = la.update(words("not what you"))
    assert text(committed) == " not what" and text(partial) == " you"


def test_commits_take_the_newest_hypothesis_timings() -> None:
    la = LocalAgreement(2)
    la.update([Word(" Hello", 0.0, 0.4, 0.5)])
    newest = [Word(" hello,", 0.1, 0.5, 0.8), Word(" world", 0.6, 1.0, 0.7)]
    committed, partial = la.update(newest)
    assert committed == newest[:1] and partial == newest[1:]


def test_n1_commits_everything_immediately() -> None:
    la = LocalAgreement(1)
    assert la.update(words("one two")) == (words("one two"), [])
    assert la.update(words("three")) == (words("three"), [])
    assert la.commit_all() == []


def test_n3_needs_three_agreeing_hypotheses() -> None:
    la = LocalAgreement(3)
    assert la.update(words("go")) == ([], words("go"))
    assert la.update(words("go forward")) == ([], words("go forward"))
    committed, partial = la.update(words("go forward ten"))
    assert text(committed) == " go" and text(partial) == " forward ten"
    # Remainders now: "forward", "forward ten"; the third agrees on "forward" only.
    committed, partial = la.update(words("forward ten meters"))
    assert text(committed) == " forward" and text(partial) == " ten meters"
    committed, partial = la.update(words("ten meters"))
    assert text(committed) == " ten" and text(partial) == " meters"


def test_matching_ignores_case_and_punctuation() -> None:
    la = LocalAgreement(2)
    la.update([Word(" Ever", 0, 1, 1), Word(" tried.", 1, 2, 1)])
    committed, partial = la.update([Word(" ever", 0, 1, 1), Word(" Tried,", 1, 2, 1), Word(" ever", 2, 3, 1)])
    assert text(committed) == " ever Tried," and text(partial) == " ever"


def test_commit_all_and_reset() -> None:
    la = LocalAgreement(2)
    la.update(words("front left"))
    assert text(la.commit_all()) == " front left"
    la.update(words("rear"))
    la.reset()
    assert la.update(words("rear right")) == ([], words("rear right"))


# --- properties ------------------------------------------------------------------------------------------

VOCAB = st.sampled_from(["the", "north", "wind", "sun", "ask", "not", "what", "you", "can", "do"])


@given(final=st.lists(VOCAB, max_size=25), cuts=st.lists(st.integers(0, 25), min_size=1, max_size=12),
       n=st.integers(1, 4))
def test_consistent_hypotheses_commit_exactly_the_last_hypothesis(final: list[str], cuts: list[int],
                                                                  n: int) -> None:
    """Growing prefixes of one transcript: commits are append-only and add up to the last hypothesis."""
    target = words(" ".join(final))
    lengths = sorted(min(c, len(target)) for c in cuts)
    la, committed = LocalAgreement(n), []
    for length in lengths:
        new, partial = la.update(target[len(committed) : length])
        assert new + partial == target[len(committed) : length]
        committed += new
        assert committed == target[: len(committed)]
    assert committed + la.commit_all() == target[: lengths[-1]]


@given(hypotheses=st.lists(st.lists(VOCAB, max_size=6), min_size=1, max_size=10), n=st.integers(1, 3))
def test_commits_are_agreed_by_the_last_n_hypotheses(hypotheses: list[list[str]], n: int) -> None:
    """Arbitrary hypotheses: every commit is a prefix that the last n (shifted) hypotheses share."""
    la = LocalAgreement(n)
    history: list[list[str]] = []
    for hyp in hypotheses:
        history = (history + [hyp])[-n:]
        new, partial = la.update(words(" ".join(hyp)))
        keys = [normalize(w.text) for w in new]
        assert new + partial == words(" ".join(hyp))
        if new:
            assert len(history) == n and all(h[: len(keys)] == keys for h in history)
        history = [h[len(keys) :] for h in history]
