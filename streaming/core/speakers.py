"""Live speaker labels (sans-I/O): speech split at pauses into pieces, each piece's voice compared with the
speakers heard so far, every committed word labelled by the piece it was said in.

:class:`SpeakerClusters` is the online clustering of speaker embeddings (pure numpy). :class:`SpeakerTracker`
cuts a stream's speech into pieces at pauses, asks for the embeddings of their audio with
:class:`~streaming.core.messages.EmbedRequest` (the engine computes them) and labels each piece once, for good.

Why pauses: people take turns in the gaps between phrases, so a change of speaker without a pause (talking
over each other) is out of scope; a piece is the speech between two pauses. Its label is decided on its first
``DECIDE_SECONDS`` (one partial of the speaker encoder), or on what there is when it ends or when committed
words need it sooner; the rest of the piece keeps that label and refines the speaker's centroid.

Thresholds, measured with the GE2E encoder (:mod:`streaming.engine.speaker`) on the en_mixed clips (8 voices)
and 30 en_prompts clips (one voice), ``python benchmarks/diarize_eval.py --similarities``. A piece against the
centroid of up to 6 other pieces of each voice: for 1 to 3 s pieces, same-voice cosines have their 5th
percentile at 0.67 to 0.87 and different-voice cosines their 95th at 0.60 to 0.65; the fewest errors (0 to
3 %) are at 0.65 for every length from 1 s. A 1.2 s piece against the centroid of 1, 2, 3 and 6 pieces of
1 s: the fewest errors are at 0.58, 0.63, 0.62 and 0.66: a centroid of one short piece is a noisier voice
print, so a speaker heard for less than ``SETTLED_SECONDS`` is compared with ``SAME_SPEAKER_EARLY``. Pieces
of 0.5 s are unreliable (7.6 % error at best), so pieces under ``MIN_NEW_SECONDS`` never start a new speaker.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .agreement import Word
from .messages import EmbedReply, EmbedRequest
from .vad import SAMPLE_RATE, VadConfig

# How to install the speaker encoder's weights (engine side): one home for the hint every error names.
SPEAKER_ENCODER_INSTALL = "pip install --no-deps resemblyzer==0.1.4"
FRAME = SAMPLE_RATE // 100  # 10 ms: the level of each frame decides speech or pause
PAUSE_SECONDS = 0.2  # this much quiet between two stretches of speech splits them into pieces
DECIDE_SECONDS = 1.6  # a piece's label is decided on its first 1.6 s (one partial of the speaker encoder)
REFINE_SECONDS = 3.2  # later audio of a piece is embedded in stretches this long to refine its speaker's centroid
MIN_REFINE_SECONDS = 1.0  # a shorter last stretch is not embedded
SAME_SPEAKER = 0.65  # cosine similarity of a piece to a speaker's centroid from which it is that speaker
SAME_SPEAKER_EARLY = 0.58  # the same, for a speaker heard for less than SETTLED_SECONDS
SETTLED_SECONDS = 2.0
MIN_NEW_SECONDS = 1.0  # a piece shorter than this never starts a new speaker
STAY_MARGIN = 0.05  # after a pause in an utterance, the speaker before it stays unless another is this much closer


class SpeakerClusters:
    """Online clustering of speaker embeddings: each speaker is the duration-weighted mean direction of the
    embeddings assigned to it; an embedding is a new speaker when no centroid is close enough
    (``SAME_SPEAKER``, or ``SAME_SPEAKER_EARLY`` for a speaker with less than ``SETTLED_SECONDS`` of speech)."""

    def __init__(self) -> None:
        self._sums: list[np.ndarray] = []
        self._seconds: list[float] = []

    def __len__(self) -> int:
        return len(self._sums)

    def similarities(self, embedding: np.ndarray) -> np.ndarray:
        """Cosine similarity of ``embedding`` to every speaker's centroid."""
        if not self._sums:
            return np.zeros(0)
        sums = np.stack(self._sums)
        return sums @ _unit(embedding) / np.maximum(np.linalg.norm(sums, axis=1), 1e-12)

    def matches(self, embedding: np.ndarray) -> np.ndarray:
        """Which speakers ``embedding`` is close enough to."""
        early = np.array(self._seconds) < SETTLED_SECONDS
        return self.similarities(embedding) >= np.where(early, SAME_SPEAKER_EARLY, SAME_SPEAKER)

    def assign(self, embedding: np.ndarray, seconds: float, previous: int | None = None) -> int:
        """The speaker of a piece of ``seconds`` of speech; ``previous`` is the speaker just before it in the
        same utterance (kept unless another one is clearly closer). A piece close enough to its speaker, or
        the first of a new one, refines that speaker's centroid."""
        sims, close = self.similarities(embedding), self.matches(embedding)
        if not sims.size or (not close.any() and seconds >= MIN_NEW_SECONDS):
            self._sums.append(np.zeros_like(_unit(embedding)))
            self._seconds.append(0.0)
            label = len(self._sums) - 1
        elif close.any():
            best = int(np.argmax(np.where(close, sims, -np.inf)))
            stays = previous is not None and close[previous] and sims[previous] >= sims[best] - STAY_MARGIN
            label = previous if stays else best
        else:
            label = previous if previous is not None else int(np.argmax(sims))
        self.refine(label, embedding, seconds)
        return label

    def refine(self, label: int, embedding: np.ndarray, seconds: float) -> None:
        """Add more of speaker ``label``'s speech to its centroid, if it sounds like that speaker (a new
        speaker's first piece always does)."""
        if not self._seconds[label] or self.matches(embedding)[label]:
            self._sums[label] = self._sums[label] + _unit(embedding) * seconds
            self._seconds[label] += seconds


def _unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float64)
    return vector / max(float(np.linalg.norm(vector)), 1e-12)


@dataclass(eq=False)
class _Piece:
    """Speech between two pauses, in samples on the stream timeline."""

    start: int
    end: int
    previous: _Piece | None  # the piece before it in the same utterance
    label: int | None = None
    sent_to: int = 0  # its audio before this sample has been sent to be embedded
    deciding: bool = False  # the stretch that decides its label is queued or being embedded


@dataclass(eq=False)
class _Stretch:
    piece: _Piece
    audio: np.ndarray
    decides: bool


class SpeakerTracker:
    """One stream's speaker labels: feed it the speech audio the VAD passes, ask it for embedding requests,
    give it their replies, and ask it for the labels of committed words."""

    def __init__(self, vad: VadConfig = VadConfig()) -> None:
        self.clusters = SpeakerClusters()
        self._floor_db, self._margin_db = vad.energy_floor_dbfs, vad.noise_margin_db
        self._pieces: list[_Piece] = []
        self._open: _Piece | None = None
        self._last: _Piece | None = None  # the current utterance's last piece
        self._latest = 0  # the latest speaker decided: for words said where no speech was heard
        # Speaker -> label, numbered as speakers first label words: noise heard before anyone speaks, a speaker
        # of its own, takes no number.
        self._public: dict[int, int] = {}
        self._audio: list[np.ndarray] = []  # the open piece's audio from its `sent_to` on, in frames
        self._pos: int | None = None  # the sample after the last one fed, None between utterances
        self._rest = np.zeros(0, np.float32)  # the start of a frame
        self._quiet = 0  # frames of quiet since the last speech
        self._queued: list[_Stretch] = []
        self._in_flight: tuple[EmbedRequest, list[_Stretch]] | None = None

    # --- input ---------------------------------------------------------------------------------------

    def feed(self, start_sample: int, audio: np.ndarray, noise_floor_dbfs: float) -> None:
        """Speech audio at ``start_sample``; audio that does not continue the last begins a new utterance.
        ``noise_floor_dbfs`` is the VAD's noise floor: a frame is quiet below it plus the noise margin."""
        if self._pos != start_sample:
            self.end_utterance()
            self._pos = start_sample
        data = np.concatenate((self._rest, audio))
        gate = max(self._floor_db, noise_floor_dbfs + self._margin_db)
        full = data.size - data.size % FRAME
        frame_start = self._pos - self._rest.size
        for off in range(0, full, FRAME):
            frame = data[off: off + FRAME]
            level = 10 * math.log10(float(np.mean(np.square(frame, dtype=np.float64))) + 1e-12)
            self._frame(frame_start + off, frame, level < gate)
        self._rest = data[full:]
        self._pos += audio.size

    def end_utterance(self) -> None:
        """The utterance ended (or the stream did): the open piece ends too."""
        if self._open is not None:
            self._close(self._open)
        self._pos, self._rest, self._quiet, self._last = None, np.zeros(0, np.float32), 0, None

    # --- work ----------------------------------------------------------------------------------------

    def next_request(self) -> EmbedRequest | None:
        """The embeddings this stream needs now: every queued stretch in one request, one request at a time."""
        if self._in_flight is not None or not self._queued:
            return None
        request = EmbedRequest(tuple(s.audio for s in self._queued))
        self._in_flight, self._queued = (request, self._queued), []
        return request

    def complete(self, request: EmbedRequest, reply: EmbedReply) -> None:
        """Take the embeddings of ``request``: label the pieces they decide, refine the others' speakers."""
        if self._in_flight is None or request is not self._in_flight[0]:
            raise ValueError("complete() got an embedding request this tracker did not issue or already completed")
        stretches = self._in_flight[1]
        self._in_flight = None
        if len(reply.embeddings) != len(stretches):
            raise ValueError(f"got {len(reply.embeddings)} embeddings for {len(stretches)} clips")
        for stretch, embedding in zip(stretches, reply.embeddings):
            piece, seconds = stretch.piece, stretch.audio.size / SAMPLE_RATE
            if stretch.decides:
                previous = piece.previous.label if piece.previous is not None else None
                piece.label = self._latest = self.clusters.assign(embedding, seconds, previous)
                piece.deciding, piece.previous = False, None  # decided: no chain of pieces is kept alive
            elif piece.label is not None:
                self.clusters.refine(piece.label, embedding, seconds)

    @property
    def busy(self) -> bool:
        """Embeddings are queued or being computed."""
        return bool(self._queued) or self._in_flight is not None

    def labels(self, words: Sequence[Word]) -> list[int] | None:
        """The speaker label of each word (of the piece it was said in, or the nearest; labels count from 0 in the
        order speakers are first asked for), or None while one of those pieces is still undecided: its deciding
        stretch is then sent without waiting for more audio."""
        starts = [p.start for p in self._pieces]
        pieces = [self._piece_of(w, starts) for w in words]
        waiting = [p for p in pieces if p is not None and p.label is None]
        for piece in waiting:
            if not piece.deciding:
                self._send(piece, decides=True)
        if waiting:
            return None
        speakers = [p.label if p is not None else self._latest for p in pieces]
        return [self._public.setdefault(s, len(self._public)) for s in speakers]

    def forget(self, before: float) -> None:
        """Drop the pieces that end before ``before`` seconds (no word still to be labelled lies there), but
        the one before the first kept (the previous speaker of the next utterance's words)."""
        sample = round(before * SAMPLE_RATE)
        keep = next((i for i, p in enumerate(self._pieces) if p.end >= sample), len(self._pieces))
        del self._pieces[:max(0, keep - 1)]

    # --- internals -----------------------------------------------------------------------------------

    def _frame(self, start: int, frame: np.ndarray, quiet: bool) -> None:
        piece = self._open
        if quiet:
            self._quiet += 1
            if piece is not None:
                self._audio.append(frame)
                if self._quiet * FRAME >= PAUSE_SECONDS * SAMPLE_RATE:
                    self._close(piece)
            return
        self._quiet = 0
        if piece is None:
            piece = self._open = self._last = _Piece(start, start, self._last, sent_to=start)
            self._pieces.append(piece)
            self._audio = []
        self._audio.append(frame)
        piece.end = start + frame.size
        if piece.label is None and not piece.deciding:
            if piece.end - piece.sent_to >= DECIDE_SECONDS * SAMPLE_RATE:
                self._send(piece, decides=True)
        elif piece.end - piece.sent_to >= REFINE_SECONDS * SAMPLE_RATE:
            self._send(piece, decides=False)

    def _close(self, piece: _Piece) -> None:
        self._open = None
        if piece.label is None and not piece.deciding:
            self._send(piece, decides=True)
        elif piece.end - piece.sent_to >= MIN_REFINE_SECONDS * SAMPLE_RATE:
            self._send(piece, decides=False)
        self._audio = []

    def _send(self, piece: _Piece, decides: bool) -> None:
        """Queue the piece's audio not sent yet (to its last speech frame) to be embedded."""
        joined = np.concatenate(self._audio) if self._audio else np.zeros(0, np.float32)
        audio = joined[: piece.end - piece.sent_to]
        self._queued.append(_Stretch(piece, audio, decides))
        self._audio = [joined[audio.size:]]
        piece.sent_to = piece.end
        piece.deciding = piece.deciding or decides

    def _piece_of(self, word: Word, starts: list[int]) -> _Piece | None:
        """The piece holding the middle of ``word``, else the nearest one (``starts``: the pieces' starts)."""
        middle = (word.start + word.end) / 2 * SAMPLE_RATE
        after = bisect.bisect_right(starts, middle)
        near = self._pieces[max(0, after - 1): after + 1]
        return min(near, key=lambda p: max(p.start - middle, middle - p.end, 0.0), default=None)
