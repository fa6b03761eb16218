"""Speaker labels: the online clustering and the piece tracker (synthetic vectors and tones), the stream core and
the protocol session with a fake engine, and, on real speech, the GE2E encoder, the recogniser and the server."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import pytest

from streaming.core.agreement import Word
from streaming.core.events import Event, Final
from streaming.core.messages import EmbedReply, EmbedRequest, WindowReply, WindowRequest, WordTiming
from streaming.core.session import POLICY_VIOLATION, EngineInfo, Run, Send, Session
from streaming.core.speakers import SAME_SPEAKER, SPEAKER_ENCODER_INSTALL, SpeakerClusters, SpeakerTracker
from streaming.core.stream import StreamCore, StreamOptions
from streaming.engine import speaker
from streaming.engine.speaker import SpeakerEncoder, SpeakerModelMissing

RATE = 16000
LOW, HIGH = 120.0, 240.0  # the two fake voices' pitches


# --- synthetic voices and a fake engine ------------------------------------------------------------------


def voice(seconds: float, pitch: float) -> np.ndarray:
    """A harmonic, syllable-modulated tone that the VAD takes for speech; ``pitch`` stands for the voice."""
    t = np.arange(round(seconds * RATE)) / RATE
    signal = sum(np.sin(2 * np.pi * pitch * k * t) / k for k in range(1, 20))
    signal = signal * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t) ** 2)
    return (0.1 * signal / np.sqrt(np.mean(signal**2))).astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * RATE), np.float32)


def fake_embedding(clip: np.ndarray) -> np.ndarray:
    """A unit vector that tells the two fake voices apart by the strongest frequency of the clip."""
    spectrum = np.abs(np.fft.rfft(clip))
    pitch = np.argmax(spectrum) * RATE / max(clip.size, 1)
    return np.array([1.0, 0.0]) if pitch < (LOW + HIGH) / 2 else np.array([0.0, 1.0])


def fake_decode(request: WindowRequest) -> WindowReply:
    """One word per 0.4 s of window audio, ``" wK"`` with token K; words already forced as prefix are left out."""
    n = int(len(request.audio) / RATE / 0.4)
    words = [WordTiming(f" w{k}", (k,), k * 0.4, k * 0.4 + 0.35, 0.9) for k in range(n)]
    return WindowReply(words=words[len(request.prefix):], language="en")


def fake_run(request: WindowRequest | EmbedRequest) -> WindowReply | EmbedReply:
    if isinstance(request, EmbedRequest):
        return EmbedReply(np.stack([fake_embedding(c) for c in request.clips]))
    return fake_decode(request)


def run_core(core: StreamCore, audio: np.ndarray, chunk: int = 480, delay: int = 0) -> list[Event]:
    """Feed ``audio`` in chunks; each request is answered once ``delay`` more chunks were fed (a busy engine),
    decodes and embeddings side by side as the server runs them."""
    events: list[Event] = []
    waiting: dict[type, tuple[object, int]] = {}  # request kind -> (request, chunks fed since)

    def drain(new: list[Event], force: bool = False) -> None:
        events.extend(new)
        while True:
            request = core.next_request()
            if request is not None and type(request) not in waiting:
                waiting[type(request)] = (request, 0)
            due = [(kind, r) for kind, (r, age) in waiting.items() if age >= delay or force]
            if not due:
                return
            kind, request = due[0]
            del waiting[kind]
            events.extend(core.complete(request, fake_run(request)))

    for i in range(0, audio.size, chunk):
        waiting.update({kind: (r, age + 1) for kind, (r, age) in waiting.items()})
        drain(core.feed(audio[i: i + chunk]))
    drain(core.flush(), force=True)
    return events


def finals(events: list) -> list[Final]:
    return [e for e in events if isinstance(e, Final)]


# --- clustering ------------------------------------------------------------------------------------------


def noisy(direction: np.ndarray, rng: np.random.Generator, spread: float = 0.15) -> np.ndarray:
    return direction + spread * rng.standard_normal(direction.size) / np.sqrt(direction.size)


def test_clusters_give_each_voice_one_label_in_order_of_appearance() -> None:
    rng = np.random.default_rng(0)
    a, b = np.eye(64)[0], np.eye(64)[1]
    clusters = SpeakerClusters()
    labels = [clusters.assign(noisy(v, rng), 2.0) for v in (a, a, b, a, b, b, a)]
    assert labels == [0, 0, 1, 0, 1, 1, 0] and len(clusters) == 2


def test_one_voice_stays_one_label_and_its_centroid_follows_it() -> None:
    rng = np.random.default_rng(1)
    direction = np.eye(64)[0]
    clusters = SpeakerClusters()
    assert {clusters.assign(noisy(direction, rng, 0.5), 1.5) for _ in range(30)} == {0}
    assert clusters.similarities(direction)[0] > 0.95  # the mean of many noisy pieces is close to the voice


def test_a_short_piece_never_starts_a_new_speaker() -> None:
    clusters = SpeakerClusters()
    a, b = np.eye(8)[0], np.eye(8)[1]
    assert clusters.assign(a, 2.0) == 0
    assert clusters.assign(b, 0.5) == 0 and len(clusters) == 1  # too short to tell: the closest voice
    assert clusters.assign(b, 1.0) == 1


@pytest.mark.parametrize("piece, previous, label", [
    ((0.75, 0.72), 1, 1),  # about as close to both: the speaker before the pause stays
    ((0.75, 0.72), 0, 0),
    ((0.75, 0.72), None, 0),  # no speaker before it: the closest
    ((0.9, 0.3), 1, 0),  # clearly the other one
])
def test_after_a_pause_the_previous_speaker_stays_unless_another_is_clearly_closer(
        piece: tuple[float, float], previous: int | None, label: int) -> None:
    clusters = SpeakerClusters()
    a, b = np.eye(8)[0], np.eye(8)[1]
    assert (clusters.assign(a, 2.0), clusters.assign(b, 2.0)) == (0, 1)
    assert clusters.assign(a * piece[0] + b * piece[1], 1.0, previous=previous) == label


def test_a_speaker_heard_only_briefly_is_compared_with_the_early_threshold() -> None:
    a, b = np.eye(8)[0], np.eye(8)[1]
    between = a * 0.62 + b * np.sqrt(1 - 0.62**2)  # cosine 0.62 to a
    early = SpeakerClusters()
    early.assign(a, 1.2)  # one short piece: a noisy voice print
    assert early.assign(between, 1.5) == 0
    settled = SpeakerClusters()
    settled.assign(a, 3.0)
    assert settled.assign(between, 1.5) == 1


def test_a_piece_far_from_its_speaker_does_not_refine_the_centroid() -> None:
    clusters = SpeakerClusters()
    a = np.eye(8)[0]
    clusters.assign(a, 2.0)
    clusters.refine(0, np.eye(8)[1], 10.0)
    assert clusters.similarities(a)[0] == pytest.approx(1.0)


# --- the tracker -----------------------------------------------------------------------------------------


def feed_tracker(tracker: SpeakerTracker, audio: np.ndarray, start: int = 0) -> None:
    for i in range(0, audio.size, 480):
        tracker.feed(start + i, audio[i: i + 480], -120.0)


def embed_all(tracker: SpeakerTracker) -> list[int]:
    """Answer the tracker's requests with fake embeddings; returns the clip lengths asked for, in samples."""
    sizes = []
    while (request := tracker.next_request()) is not None:
        sizes += [c.size for c in request.clips]
        tracker.complete(request, EmbedReply(np.stack([fake_embedding(c) for c in request.clips])))
    return sizes


def test_pieces_end_at_pauses_and_words_take_the_label_of_the_piece_they_were_said_in() -> None:
    tracker = SpeakerTracker()
    feed_tracker(tracker, np.concatenate([voice(1.2, LOW), silence(0.3), voice(1.2, HIGH), silence(0.1),
                                          voice(0.6, HIGH)]))
    tracker.end_utterance()
    # A 0.1 s gap is no pause; the second piece is decided on its first 1.6 s, too little is left to refine it.
    assert [round(s / RATE, 1) for s in embed_all(tracker)] == [1.2, 1.6]
    words = [Word(" a", 0.2, 0.6, 0.9), Word(" b", 1.0, 1.35, 0.9), Word(" c", 1.6, 2.0, 0.9),
             Word(" d", 3.0, 3.4, 0.9)]
    assert tracker.labels(words) == [0, 0, 1, 1]  # "b" is said mostly in the pause: the nearest piece


def test_a_long_piece_is_decided_on_its_first_seconds_and_words_wait_for_their_label() -> None:
    tracker = SpeakerTracker()
    feed_tracker(tracker, voice(1.0, LOW))
    word = [Word(" a", 0.2, 0.6, 0.9)]
    assert tracker.next_request() is None  # not decided yet: more audio may come
    assert tracker.labels(word) is None  # a committed word asks for it now
    request = tracker.next_request()
    assert request is not None and [c.size for c in request.clips] == [RATE] and tracker.next_request() is None
    feed_tracker(tracker, voice(4.0, LOW), RATE)
    assert tracker.labels(word) is None  # still being embedded
    tracker.complete(request, EmbedReply(np.stack([fake_embedding(c) for c in request.clips])))
    assert tracker.labels(word) == [0]
    assert [round(s / RATE, 1) for s in embed_all(tracker)] == [3.2]  # refines the voice in 3.2 s stretches
    with pytest.raises(ValueError, match="did not issue"):
        tracker.complete(request, EmbedReply(np.zeros((1, 2))))


def test_labels_count_in_the_order_words_are_labelled_so_noise_before_speech_takes_no_number() -> None:
    tracker = SpeakerTracker()
    feed_tracker(tracker, np.concatenate([voice(1.2, HIGH), silence(0.5), voice(1.2, LOW)]))
    tracker.end_utterance()
    embed_all(tracker)  # the clusters: HIGH first, LOW second
    assert tracker.labels([Word(" low", 2.0, 2.4, 0.9)]) == [0]
    assert tracker.labels([Word(" high", 0.2, 0.6, 0.9), Word(" low", 2.0, 2.4, 0.9)]) == [1, 0]


# --- the stream core -------------------------------------------------------------------------------------


def test_a_speaker_change_inside_one_commit_splits_it_into_two_labelled_finals() -> None:
    # min_chunk 10 s: no interim decode, so the decode at the end of the utterance commits every word at once.
    core = StreamCore(StreamOptions(diarize=True, min_chunk=10))
    audio = np.concatenate([silence(0.5), voice(2.4, LOW), silence(0.25), voice(2.4, HIGH), silence(1.0),
                            voice(1.6, LOW), silence(1.0)])
    events = run_core(core, audio)
    labelled = finals(events)
    assert [(f.segment, f.speaker) for f in labelled] == [(0, 0), (0, 1), (1, 0)]
    assert all(w.start < 3.0 for w in labelled[0].words) and all(w.start > 2.8 for w in labelled[1].words)
    assert all(f.to_dict()["speaker"] == f.speaker and {w["speaker"] for w in f.to_dict()["words"]} == {f.speaker}
               for f in labelled)
    kinds = [type(e).__name__ for e in events]
    assert kinds.index("UtteranceEnd") > kinds.index("Final") and core.idle


@pytest.mark.parametrize("delay", [3, 20, 60])
def test_labels_do_not_depend_on_how_long_the_engine_takes(delay: int) -> None:
    audio = np.concatenate([silence(0.5), voice(2.4, LOW), silence(0.25), voice(2.4, HIGH), silence(1.0),
                            voice(1.6, LOW), silence(0.6), voice(3.0, HIGH), silence(1.0)])
    words = [(w.text, f.speaker) for f in finals(run_core(StreamCore(StreamOptions(diarize=True)), audio))
             for w in f.words]
    late = [(w.text, f.speaker) for f in finals(run_core(StreamCore(StreamOptions(diarize=True)), audio,
                                                         delay=delay)) for w in f.words]
    assert [s for _, s in late] == [s for _, s in words] and {s for _, s in words} == {0, 1}


def test_without_diarize_finals_have_no_speaker_and_no_embedding_is_asked() -> None:
    core = StreamCore(StreamOptions())
    events = run_core(core, np.concatenate([silence(0.5), voice(2.0, LOW), silence(1.0)]))
    assert finals(events) and all(f.speaker is None and "speaker" not in f.to_dict() for f in finals(events))


# --- the protocol session ----------------------------------------------------------------------------------


def session_run(session: Session, actions: list) -> list[dict]:
    """Run every Run action with the fake engine; the messages sent, in order."""
    out, todo = [], list(actions)
    while todo:
        action = todo.pop(0)
        if isinstance(action, Run):
            todo[:0] = session.complete(action.request, fake_run(action.request))
        elif isinstance(action, Send):
            out.append(action.message)
        else:
            out.append({"type": "close", "code": action.code})
    return out


def started(engine: EngineInfo = EngineInfo("tiny.en", False, speakers=True), **fields) -> tuple[Session, list]:
    session = Session(engine, session_id="s")
    session.open()
    return session, session_run(session, session.receive_text(json.dumps({"type": "start", **fields})))


@pytest.mark.parametrize("fields, message", [
    ({"diarize": "yes"}, "diarize must be true or false, got 'yes'"),
    ({"diarize": 1}, "diarize must be true or false, got 1"),
    ({"diarize": None}, "diarize must be true or false, got None"),
    ({"multichannel": "true", "channels": 2}, "multichannel must be true or false"),
    ({"multichannel": True}, "needs channels from 2 to 8, got 1"),
    ({"multichannel": True, "channels": 9}, "needs channels from 2 to 8, got 9"),
])
def test_bad_diarize_and_multichannel_values_get_bad_start(fields: dict, message: str) -> None:
    _, out = started(**fields)
    assert out[0]["type"] == "error" and out[0]["code"] == "bad_start" and message in out[0]["message"]
    assert out[-1] == {"type": "close", "code": POLICY_VIOLATION}


def test_diarize_on_a_server_without_the_speaker_encoder_names_the_install_command() -> None:
    _, out = started(EngineInfo("tiny.en", False), diarize=True)
    assert out[0]["code"] == "bad_start" and SPEAKER_ENCODER_INSTALL in out[0]["message"]


def test_a_diarized_session_labels_its_finals_and_echoes_the_options() -> None:
    session, out = started(diarize=True)
    assert out[0]["type"] == "started" and out[0]["diarize"] is True and out[0]["multichannel"] is False
    pcm = np.concatenate([silence(0.5), voice(2.0, LOW), silence(1.0), voice(2.0, HIGH), silence(1.0)])
    out = session_run(session, session.receive_bytes((pcm * 32767).astype("<i2").tobytes()))
    out += session_run(session, session.receive_text('{"type": "stop"}'))
    labelled = [m for m in out if m["type"] == "final"]
    assert [m["speaker"] for m in labelled] == [0, 1] and out[-2]["type"] == "done" and out[-1]["code"] == 1000


def test_multichannel_transcribes_each_channel_and_tags_every_result_with_it() -> None:
    session, out = started(channels=2, multichannel=True, diarize=True)
    assert out[0]["channels"] == 2 and out[0]["multichannel"] is True
    left = np.concatenate([silence(0.5), voice(2.0, LOW), silence(4.5)])
    right = np.concatenate([silence(3.5), voice(2.0, HIGH), silence(1.5)])
    pcm = (np.stack([left, right], axis=1) * 32767).astype("<i2").tobytes()  # interleaved
    out = session_run(session, session.receive_bytes(pcm))
    out += session_run(session, session.receive_text('{"type": "stop"}'))
    results = [m for m in out if m["type"] in ("partial", "final", "utterance_end", "language")]
    assert results and all(m["channel"] in (0, 1) for m in results)
    assert all("channel" not in m for m in out if m["type"] == "done")
    by_channel = {c: [m for m in results if m["type"] == "final" and m["channel"] == c] for c in (0, 1)}
    assert by_channel[0] and by_channel[0][-1]["end"] <= 3.0 and by_channel[1][0]["start"] >= 3.0
    assert {m["speaker"] for m in by_channel[1]} == {0}  # each channel has labels of its own
    assert out[-2]["type"] == "done" and out[-2]["finals"] == len(by_channel[0]) + len(by_channel[1])


# --- the speaker encoder on real speech ---------------------------------------------------------------------


def clip(shared_eval: Path, stream: str, start: float, end: float) -> np.ndarray:
    with wave.open(str(shared_eval / "streams" / f"{stream}.wav")) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16)
    return pcm[round(start * RATE): round(end * RATE)].astype(np.float32) / 32768


def test_the_encoder_tells_two_voices_apart(speaker_encoder: SpeakerEncoder, shared_eval: Path) -> None:
    jfk = [clip(shared_eval, "en_mixed", s, s + 3.0) for s in (0.8, 4.0, 8.0)]
    beckett = [clip(shared_eval, "en_mixed", s, s + 3.0) for s in (13.0, 16.5, 19.6)]
    vectors = speaker_encoder.embed(jfk + beckett)
    assert vectors.shape == (6, 256) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    similar = vectors @ vectors.T
    same = [similar[i, j] for i in range(6) for j in range(i + 1, 6) if (i < 3) == (j < 3)]
    different = [similar[i, j] for i in range(3) for j in range(3, 6)]
    assert min(same) > SAME_SPEAKER > max(different)
    assert speaker_encoder.features(np.zeros(RATE, np.float32)).shape == (101, 40)


def test_missing_weights_name_the_install_command(monkeypatch: pytest.MonkeyPatch, tiny_model, tok) -> None:
    from streaming.engine import Engine
    from streaming.engine.recognizer import Recognizer

    monkeypatch.setattr(speaker.importlib.util, "find_spec", lambda name: None)
    assert not speaker.available()
    with pytest.raises(SpeakerModelMissing, match=SPEAKER_ENCODER_INSTALL.replace(".", r"\.")):
        Recognizer(Engine(tiny_model, tok), StreamOptions(diarize=True))


# --- real speech through the recogniser, the session and the server -----------------------------------------


def recognise(engine, audio: np.ndarray, options: StreamOptions) -> list[Event]:
    from streaming.engine.recognizer import Recognizer

    rec = Recognizer(engine, options)
    events: list[Event] = []
    for i in range(0, audio.size, 1600):
        events += rec.feed(audio[i: i + 1600])
    return events + rec.close()


@pytest.mark.real_model
def test_one_voice_throughout_gets_one_label(engine, speaker_encoder, shared_eval: Path, one_thread) -> None:
    audio = clip(shared_eval, "en_prompts", 0.0, 25.0)  # ten prompts by one speaker
    labelled = finals(recognise(engine, audio, StreamOptions(language="en", diarize=True)))
    assert sum(len(f.words) for f in labelled) > 40 and {f.speaker for f in labelled} == {0}


@pytest.mark.real_model
async def test_two_voices_alternating_get_two_labels_over_the_server(engine, speaker_encoder, shared_eval: Path,
                                                                     one_thread) -> None:
    import asyncio
    import contextlib

    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    from streaming.server import Server, ServerConfig

    segments = json.loads((shared_eval / "streams" / "en_meeting.json").read_text())["segments"][:3]  # A, B, A
    pcm = (clip(shared_eval, "en_meeting", 0.0, 21.0) * 32768).astype("<i2").tobytes()
    messages = []
    async with Server(engine, ServerConfig(port=0)) as server, connect(server.url) as ws:
        await ws.send(json.dumps({"type": "start", "language": "en", "diarize": True}))
        for i in range(0, len(pcm), 3200):
            await ws.send(pcm[i: i + 3200])
            await asyncio.sleep(0.01)
        await ws.send('{"type": "stop"}')
        async with asyncio.timeout(120):
            with contextlib.suppress(ConnectionClosed):
                while True:
                    messages.append(json.loads(await ws.recv()))
    labelled = [m for m in messages if m["type"] == "final"]
    assert messages[-1]["type"] == "done" and all({w["speaker"] for w in m["words"]} == {m["speaker"]}
                                                  for m in labelled)
    voices: dict[str, set[int]] = {}
    for message in labelled:
        middle = (message["start"] + message["end"]) / 2
        voice_of = min(segments, key=lambda s: max(s["start"] - middle, middle - s["end"], 0))["speaker"]
        voices.setdefault(voice_of, set()).add(message["speaker"])
    assert voices == {"A": {0}, "B": {1}}, labelled


@pytest.mark.real_model
def test_multichannel_with_two_clips_gives_each_its_transcript(engine, shared_eval: Path, one_thread) -> None:
    from streaming.engine.inference import run_request

    jfk = clip(shared_eval, "en_mixed", 0.0, 12.0)
    robot = np.concatenate([clip(shared_eval, "en_mixed", 23.2, 31.2), silence(4.0)])  # "go forward ...", "forever"
    pcm = (np.stack([jfk, robot], axis=1) * 32768).clip(-32768, 32767).astype("<i2").tobytes()
    session = Session(EngineInfo(engine.name, engine.multilingual), session_id="m")
    session.open()
    out: list[dict] = []

    def run(actions: list) -> None:
        while actions:
            action = actions.pop(0)
            if isinstance(action, Run):
                actions[:0] = session.complete(action.request, run_request(engine, action.request))
            elif isinstance(action, Send):
                out.append(action.message)

    run(session.receive_text(json.dumps({"type": "start", "channels": 2, "multichannel": True})))
    for i in range(0, len(pcm), 6400):
        run(session.receive_bytes(pcm[i: i + 6400]))
    run(session.receive_text('{"type": "stop"}'))
    text = {c: "".join(m["text"] for m in out if m["type"] == "final" and m["channel"] == c).lower() for c in (0, 1)}
    assert "fellow americans" in text[0] and "forward" not in text[0], text
    assert "forward" in text[1] and "forever" in text[1] and "americans" not in text[1], text
    assert out[-1]["type"] == "done"
