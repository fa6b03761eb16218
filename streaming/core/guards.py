"""Guards against the known failures of streaming Whisper, applied to each new hypothesis.

Whisper on short, growing windows repeats itself: it loops ("no matter no matter ..."), re-transcribes
audio whose words are already committed, or restarts the utterance after the forced prefix. Each guard
removes one such pattern from the new words before they reach the agreement policy.
"""

from __future__ import annotations

from .agreement import Word, keys

OVERLAP_MAX_WORDS = 8
RESTART_MIN_WORDS = 4
# Speech is slower than this, averaged over a few words: a hypothesis with more words than the audio after the
# committed ones can hold at this rate must be re-transcribing committed audio.
MIN_WORD_SECONDS = 0.25


def drop_repetitions(words: list[Word]) -> list[Word]:
    """Cut where a hypothesis starts looping: a phrase of two or more words repeated back to back, or one
    word three times in a row. Whisper does this on short windows; speech almost never does."""
    k = keys(words)
    for i in range(len(k)):
        for size in range(1, (len(k) - i) // 2 + 1):
            gram = k[i:i + size]
            if k[i + size:i + 2 * size] != gram:
                continue
            if size >= 2 or k[i + 2 * size:i + 3 * size] == gram:
                return words[:i + size]
    return list(words)


def cut_loops(prefix: list[Word], words: list[Word]) -> list[Word]:
    """:func:`drop_repetitions` on the new words, also catching a loop that repeats the committed prefix."""
    kept = drop_repetitions(prefix + words)
    if len(kept) < len(prefix):
        return drop_repetitions(words)
    return kept[len(prefix):]


def drop_redecoded(words: list[Word], committed: list[Word], room: float) -> list[Word]:
    """Drop the part of a hypothesis that re-transcribes words already committed in this utterance.

    - Overlap: the end of the committed text (two or more words) reappears in the new words, and what
      precedes it there is one word or mostly (3/4) committed text: keep only what follows it. This covers the plain
      overlap at the start and Whisper restarting the utterance ("Sorry, but the user's mailbox can't accept
      more" after "Sorry, but the user mailbox can't accept").
    - Restart that stops short: the new words begin (possibly after one differing word) with a run of
      ``RESTART_MIN_WORDS`` or more committed words, and there are more of them than ``room`` (the seconds of
      audio heard after the last committed word) can hold; with room enough, the speaker said it again
      ("The conference will begin..." twice in a row).
    Shorter runs in the middle are kept: menus really do say "to record your" again and again.
    """
    new, done = keys(words), keys(committed)
    if not done:
        return list(words)
    known = set(done)
    for k in range(min(len(new), len(done), OVERLAP_MAX_WORDS), 1, -1):
        for pos in range(len(new) - k, -1, -1):
            if new[pos:pos + k] == done[-k:]:
                before = new[:pos]
                if len(before) <= 1 or sum(w in known for w in before) >= 0.75 * len(before):
                    return words[pos + k:]
    if len(new) * MIN_WORD_SECONDS <= room:
        return list(words)
    for skip in (0, 1):
        run = _longest_run(new[skip:], done)
        if run >= RESTART_MIN_WORDS:
            return words[skip + run:]
    return list(words)


def _longest_run(new: list[str], done: list[str]) -> int:
    """Length of the longest leading run of ``new`` that occurs contiguously in ``done``."""
    best = 0
    for start in range(len(done)):
        n = 0
        while n < len(new) and start + n < len(done) and done[start + n] == new[n]:
            n += 1
        best = max(best, n)
    return best
