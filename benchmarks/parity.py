"""Parity of our offline transcription with faster-whisper's, stage by stage, on excerpts of the eval streams.

Usage: python benchmarks/parity.py [--streams en_prompts en_mixed] [--start 0 60] [--seconds 60] [--beam-size 1]
                                   [--model tiny.en] [--threads 1] [--examples 3] [--verbose]

Both engines transcribe the same excerpt (``--seconds`` from each ``--start``) with the same model files, faster-whisper
in float32 (CTranslate2) and ours in float32, both with Whisper's defaults (temperature fallback, conditioning on
previous text, beam ``--beam-size``, best of 5). The harness compares:

- the log-mel spectrogram of the excerpt (ours against faster-whisper's feature extractor);
- the encoder output of the first window (over the same mel, and each engine over its own mel);
- each 30 s window, paired by its start (seek): its length, prompt (previous text), temperature, output tokens and
  where the next window starts. A window whose tokens differ is given the cause of its first divergence:
  a different prompt, skip or temperature fallback, or, when both decoded it at temperature 0 from the same prompt,
  the first token where they part. There both engines' top-5 candidates and log-probabilities for that step, given
  the same prefix, come from their raw logits under the same (reference) logit rules; which stage flips the choice
  is found by running our decoder over faster-whisper's mel and over its encoder output.

It prints one line per excerpt, the first divergences grouped by cause, and examples of each cause.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.resources
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from evalkit import load_stream

from streaming.engine import Engine, configure_threads, decoding
from streaming.engine.decoding import DecodingOptions, DecodingResult, LogitRules, compression_ratio, initial_tokens
from streaming.engine.mel import N_FRAMES, N_SAMPLES, SAMPLE_RATE
from streaming.engine.tokenizer import Tokenizer
from streaming.engine.transcribe import TranscribeOptions, WindowTrace, transcribe
from streaming.engine.weights import _PART_PACKAGES, NAMED_MODELS

NEAR_TIE = 0.5  # nats: two candidates closer than this in both engines are a near tie that float noise can flip
CAUSES = {
    "prompt_open_segment": "prompt differs: ours holds a window's unfinished last segment (its opening timestamp, "
                           "and any text), which the next window decodes again; Whisper leaves it out",
    "prompt_timestamps": "prompt differs in timestamp tokens only (e.g. ours without any)",
    "prompt_text": "prompt differs: earlier windows decoded different text",
    "prompt_reset": "prompt differs: one engine reset it (temperature > 0.5)",
    "skip_silence": "ours skipped a window of digital silence that faster-whisper decoded",
    "skip_no_speech": "one engine skipped the window as no speech",
    "fallback_decision": "same tokens at temperature 0, but only one engine fell back to a higher temperature",
    "fallback_after_divergence": "the temperature-0 decodes differ and only one engine fell back",
    "fallback_exhausted": "every temperature failed: faster-whisper keeps the best attempt, ours (as openai) the last",
    "sampling": "both sampled at temperature > 0 (random)",
    "ct2_rules": "faster-whisper's token is not what its logits give under the reference logit rules",
    "timestamp_rule_tie": "the rule 'timestamp mass > best text token forces a timestamp' flips on a near tie",
    "mel_padding": "the choice flips with faster-whisper's mel: a short (last) window, which ours pads with the "
                   "log-mel floor (the silence after the audio) and faster-whisper, as openai/whisper, with zeros",
    "mel": "the choice flips with faster-whisper's mel (front-end float differences in a full window)",
    "encoder_numerics": "the choice flips with faster-whisper's encoder output (float differences)",
    "near_tie": "decoder float differences flip a near tie",
    "logprob_gap": "the engines' log-probabilities disagree by more than a near tie",
    "beam_search": "every step's best token agrees; the beam searches keep or rank hypotheses differently",
    "seek_rest": "same tokens; ours decodes the rest of a window whose text ended early (single timestamp)",
    "seek_anchor": "same tokens; ours ends a window without closing timestamp where its last word ends",
    "seek_other": "same tokens, next window starts elsewhere",
}


@dataclass
class Window:
    """One engine's record of one window: start and length in mel frames, the previous-text prompt, the decode
    attempts (temperature, tokens, avg log-prob, compression ratio, no-speech probability), the tokens it kept
    (timestamps included, no end of text), the temperature reported and where the next window starts."""

    seek: int
    frames: int
    prompt: list[int] = field(default_factory=list)
    attempts: list[dict] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    temperature: float | None = None
    next_seek: int = 0
    skipped: str | None = None
    mel: np.ndarray | None = None  # faster-whisper's window mel and encoder output
    encoded: np.ndarray | None = None


@dataclass
class Divergence:
    """The first divergence of faster-whisper's window ``window`` (starting at ``seek``) from ours."""

    window: int
    seek: int
    cause: str
    detail: str


@dataclass
class Report:
    """One excerpt's comparison: the log-mel's max abs difference (all frames, and less the last two, where the
    engines pad the audio differently), the first window's encoder output (max abs and relative difference, over
    faster-whisper's mel and over each engine's own), window counts, divergences and both engines' windows."""

    stream: str
    start: float
    seconds: float
    mel_max_diff: float
    mel_max_diff_interior: float
    encoder_diff_same_mel: tuple[float, float]
    encoder_diff_own_mel: tuple[float, float]
    fw_windows: int
    compared: int
    tokens_agree: int
    agree: int
    divergences: list[Divergence]
    ours: list[Window]
    theirs: list[Window]


def model_files(name: str) -> dict[str, bytes] | str:
    """The directory of a named CTranslate2 model, or its files in memory when model.bin comes in parts."""
    package, sub, parts, _ = NAMED_MODELS[name]
    folder = importlib.resources.files(package) / sub
    if parts == ["model.bin"]:
        return str(folder)
    files = {f.name: f.read_bytes() for f in folder.iterdir() if not f.name.startswith("model.bin")}
    files["model.bin"] = b"".join((importlib.resources.files(_PART_PACKAGES[p]) / sub / p if p in _PART_PACKAGES
                                   else folder / p).read_bytes() for p in parts)
    return files


class _RecordingCT2:
    """A CTranslate2 Whisper model that records its ``generate`` calls."""

    def __init__(self, model, calls: list) -> None:
        self._model = model
        self._calls = calls

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def generate(self, features, prompts, **kwargs):
        results = self._model.generate(features, prompts, **kwargs)
        self._calls.append((kwargs.get("sampling_temperature", 0.0), results[0]))
        return results


def faster_whisper_windows(model, audio: np.ndarray, language: str, beam: int) -> tuple[list[Window], np.ndarray]:
    """faster-whisper's windows over ``audio`` and its mel, from a subclass that records its long-form loop."""
    from faster_whisper import WhisperModel

    windows: list[Window] = []
    calls: list = []
    mel: list[np.ndarray] = []

    class Recording(WhisperModel):
        def __init__(self) -> None:  # shares the loaded model; only the recording is new
            self.__dict__.update(model.__dict__)
            self.model = _RecordingCT2(model.model, calls)

        def generate_segments(self, features, tokenizer, options, log_progress, encoder_output=None):
            mel.append(features)
            yield from super().generate_segments(features, tokenizer, options, log_progress, encoder_output)

        def encode(self, features):
            out = super().encode(features)
            windows.append(Window(-1, 0, mel=np.array(features), encoded=np.array(out)))
            return out

        def generate_with_fallback(self, encoder_output, prompt, tokenizer, options):
            first = len(calls)
            chosen = super().generate_with_fallback(encoder_output, prompt, tokenizer, options)
            window = windows[-1]
            window.prompt = prompt[1: prompt.index(tokenizer.sot)] if prompt[0] == tokenizer.sot_prev else []
            for temperature, result in calls[first:]:
                tokens = result.sequences_ids[0]
                window.attempts.append({
                    "temperature": temperature, "tokens": tokens, "no_speech_prob": result.no_speech_prob,
                    "avg_logprob": result.scores[0] * len(tokens) ** options.length_penalty / (len(tokens) + 1),
                    "compression_ratio": compression_ratio(tokenizer.decode(tokens).strip())})
            window.tokens = chosen[0].sequences_ids[0]
            window.temperature = chosen[2]
            return chosen

        def _split_segments_by_timestamps(self, tokenizer, tokens, time_offset, segment_size, segment_duration,
                                          seek):
            out = super()._split_segments_by_timestamps(tokenizer, tokens, time_offset, segment_size,
                                                        segment_duration, seek)
            windows[-1].seek, windows[-1].frames, windows[-1].next_seek = seek, segment_size, out[1]
            return out

    segments, _ = Recording().transcribe(audio, language=language, beam_size=beam, best_of=5)
    for _ in segments:
        pass
    content_frames = mel[0].shape[-1] - 1
    seek = 0
    for window in windows:  # a window skipped as no speech was never split: it spans its whole length
        if window.seek < 0:
            window.seek, window.frames, window.skipped = seek, min(N_FRAMES, content_frames - seek), "no_speech"
            window.next_seek = seek + window.frames
        seek = window.next_seek
    return windows, mel[0]


@contextlib.contextmanager
def recorded_decodes(attempts: list[DecodingResult]) -> Iterator[None]:
    """Record every decode our transcribe runs (each temperature of a fallback)."""
    original = decoding.decode

    def decode(*args, **kwargs):
        result = original(*args, **kwargs)
        attempts.append(result)
        return result

    decoding.decode = decode
    try:
        yield
    finally:
        decoding.decode = original


def our_windows(engine: Engine, audio: np.ndarray, language: str, beam: int) -> list[Window]:
    """Our transcribe's windows over ``audio``."""
    tokenizer = engine.tokenizer(language)
    attempts: list[DecodingResult] = []
    windows: list[Window] = []

    def trace(t: WindowTrace) -> None:
        initial, sot_index = initial_tokens(tokenizer, DecodingOptions(prompt=t.prompt))
        tried = [{"temperature": a.temperature, "tokens": a.tokens, "avg_logprob": a.avg_logprob,
                  "compression_ratio": a.compression_ratio, "no_speech_prob": a.no_speech_prob} for a in attempts]
        attempts.clear()
        windows.append(Window(t.seek, t.frames, initial[1:sot_index] if t.prompt else [], tried,
                              t.result.tokens if t.result else [], t.result.temperature if t.result else None,
                              t.seek + t.consumed, t.skipped))

    with recorded_decodes(attempts):
        transcribe(engine, audio, TranscribeOptions(language=language, beam_size=beam), trace=trace)
    return windows


def max_diff(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> tuple[float, float]:
    """Max absolute difference and that over the max magnitude of ``b``."""
    a, b = torch.as_tensor(np.asarray(a), dtype=torch.float32), torch.as_tensor(np.asarray(b), dtype=torch.float32)
    diff = float((a - b).abs().max())
    return diff, diff / float(b.abs().max())


class StepProbe:
    """Both engines' raw logits after a prompt and forced tokens, and their log-probabilities under the reference
    logit rules (:class:`streaming.engine.decoding.LogitRules`, which follow openai/whisper's)."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, ct2, options: DecodingOptions) -> None:
        self.engine, self.tok, self.ct2, self.options = engine, tokenizer, ct2, options

    def ours(self, features: torch.Tensor, initial: list[int], forced: list[int]) -> torch.Tensor:
        """Our decoder's logits [len(forced), vocab]: row j follows ``initial + forced[:j]``."""
        seq = initial + forced
        decoder = self.engine.model.decoder
        with torch.inference_mode():
            logits, _, _ = decoder(torch.tensor([seq]), decoder.new_cache(features),
                                   logits_at=slice(len(initial) - 1, len(seq) - 1))
        return logits[0].float()

    def theirs(self, encoded: np.ndarray, initial: list[int], forced: list[int]) -> torch.Tensor:
        """CTranslate2's logits [len(forced), vocab], like :meth:`ours`: with ``forced`` as a prefix and nothing
        suppressed, its logits at forced steps are the decoder's own (only <|notimestamps|> is masked)."""
        import ctranslate2

        start_step = len(initial) - 1
        max_length = min(448, max(start_step + len(forced) + 1, 2 * (len(forced) + 1)))
        result = self.ct2.generate(ctranslate2.StorageView.from_array(np.ascontiguousarray(encoded)),
                                   [initial + forced], beam_size=1, max_length=max_length,
                                   return_logits_vocab=True, suppress_blank=False, suppress_tokens=[])[0]
        rows = torch.from_numpy(np.array(result.logits[0])[: len(forced)]).float()
        if len(rows) < len(forced):
            raise RuntimeError(f"CTranslate2 gave {len(rows)} logit rows for {len(forced)} forced tokens")
        rows[rows < -1e30] = -float("inf")
        return rows

    def step(self, rows: torch.Tensor, initial: list[int], prefix: list[int]) -> tuple[torch.Tensor, bool]:
        """Log-probabilities after ``initial + prefix`` (``rows[len(prefix)]``) under the rules, and whether the
        timestamp-mass rule forced a timestamp (past the first step, where only timestamps are allowed, nothing
        else forbids every text token and end of text)."""
        logits = rows[len(prefix)].clone()[None]
        LogitRules(self.tok, self.options, len(initial), 30.0).apply(logits, [initial + prefix])
        forced = bool(prefix) and bool(torch.isinf(logits[0, : self.tok.timestamp_begin]).all())
        return logits[0].log_softmax(-1), forced

    def score(self, rows: torch.Tensor, initial: list[int], tokens: list[int]) -> float:
        """Sum log-probability of ``tokens`` and end of text under the rules (``rows`` cover them all), over
        their count: the length-normalised score both beam searches rank by."""
        ended = tokens + [self.tok.eot]
        total = sum(float(self.step(rows, initial, ended[:j])[0][t]) for j, t in enumerate(ended))
        return total / len(ended)


def top5(tok: Tokenizer, logprobs: torch.Tensor) -> str:
    values, ids = logprobs.topk(5)
    return ", ".join(f"{name(tok, int(i))} {float(v):.3f}" for v, i in zip(values, ids) if v > -float("inf"))


def name(tok: Tokenizer, token: int) -> str:
    if token == tok.eot:
        return "<eot>"
    if token >= tok.timestamp_begin:
        return f"<{(token - tok.timestamp_begin) * 0.02:.2f}>"
    return repr(tok.decode([token]))


class Comparer:
    """Pairs both engines' windows by seek and explains the first divergence of each pair."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, ct2, audio: np.ndarray, beam: int) -> None:
        self.engine, self.tok, self.beam = engine, tokenizer, beam
        self.mel = engine.mel(audio, padding=N_SAMPLES)
        self.probe = StepProbe(engine, tokenizer, ct2, DecodingOptions(language=tokenizer.language))

    def compare(self, ours: list[Window], theirs: list[Window]) -> tuple[int, int, int, list[Divergence]]:
        by_seek = {w.seek: w for w in ours}
        compared = tokens_agree = agree = 0
        divergences = []
        for i, fw in enumerate(theirs):
            our = by_seek.get(fw.seek)
            if our is None:
                continue
            compared += 1
            same_tokens = our.tokens == fw.tokens and our.skipped == fw.skipped
            tokens_agree += same_tokens
            if same_tokens and our.next_seek == fw.next_seek:
                agree += 1
                continue
            cause, detail = self.explain(our, fw) if not same_tokens else self.explain_seek(our, fw)
            divergences.append(Divergence(i, fw.seek, cause, detail))
        return compared, tokens_agree, agree, divergences

    def explain(self, our: Window, fw: Window) -> tuple[str, str]:
        if our.prompt != fw.prompt:
            return self.explain_prompt(our.prompt, fw.prompt)
        if our.skipped or fw.skipped:
            skipped = our.skipped or fw.skipped
            who = "ours" if our.skipped else "faster-whisper"
            probs = [(a["no_speech_prob"], a["avg_logprob"]) for a in (our.attempts[-1:] + fw.attempts[-1:])]
            return (f"skip_{skipped}", f"{who} skipped; (no-speech prob, avg logprob) ours/fw: {probs}")
        if our.temperature != fw.temperature:
            return self.explain_fallback(our, fw)
        if our.temperature:
            return "sampling", f"both at temperature {our.temperature}"
        return self.explain_tokens(our, fw, our.tokens, fw.tokens)

    def explain_prompt(self, ours: list[int], theirs: list[int]) -> tuple[str, str]:
        tb = self.tok.timestamp_begin
        text_o, text_f = [t for t in ours if t < tb], [t for t in theirs if t < tb]
        detail = (f"ours ...{self.tok.decode_with_timestamps(ours[-14:])!r} ({len(ours)} tokens), "
                  f"fw ...{self.tok.decode_with_timestamps(theirs[-14:])!r} ({len(theirs)} tokens)")
        if not ours or not theirs:
            return "prompt_reset", detail
        it = iter(ours)
        if all(t in it for t in theirs[len(theirs) // 2:]):
            return "prompt_open_segment", detail  # faster-whisper's recent prompt is a subsequence of ours
        if text_o == text_f:
            return "prompt_timestamps", detail
        return "prompt_text", detail

    def explain_fallback(self, our: Window, fw: Window) -> tuple[str, str]:
        def summary(w: Window) -> str:
            return "; ".join(f"T={a['temperature']:.1f} lp {a['avg_logprob']:.3f} cr {a['compression_ratio']:.2f}"
                             for a in w.attempts)
        detail = f"ours [{summary(our)}] -> T={our.temperature}; fw [{summary(fw)}] -> T={fw.temperature}"
        if len(fw.attempts) == len(our.attempts) == 6:
            return "fallback_exhausted", detail
        if our.attempts[0]["tokens"] == fw.attempts[0]["tokens"]:
            return "fallback_decision", detail
        cause, inner = self.explain_tokens(our, fw, our.attempts[0]["tokens"], fw.attempts[0]["tokens"])
        return "fallback_after_divergence", f"{detail}; at T=0: [{cause}] {inner}"

    def explain_tokens(self, our: Window, fw: Window, ours: list[int], theirs: list[int]) -> tuple[str, str]:
        k = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        a = ours[k] if k < len(ours) else self.tok.eot
        b = theirs[k] if k < len(theirs) else self.tok.eot
        prefix = theirs[:k]
        initial = [self.tok.sot_prev, *fw.prompt] if fw.prompt else []
        initial += list(self.tok.sot_sequence)
        own = self.engine.encode(self.mel[:, our.seek: our.seek + N_FRAMES])
        forced = prefix + [b]
        lp_o, forced_o = self.probe.step(self.probe.ours(own, initial, forced), initial, prefix)
        lp_f, forced_f = self.probe.step(self.probe.theirs(fw.encoded, initial, forced), initial, prefix)
        with_mel = self.probe.ours(self.engine.encode(torch.from_numpy(fw.mel)), initial, forced)
        lp_m, _ = self.probe.step(with_mel, initial, prefix)
        lp_e, _ = self.probe.step(self.probe.ours(torch.from_numpy(fw.encoded), initial, forced), initial, prefix)
        gap_o, gap_f = float(lp_o[a] - lp_o[b]), float(lp_f[b] - lp_f[a])
        detail = (f"step {k} after ...{self.tok.decode_with_timestamps(prefix)[-60:]!r}: ours "
                  f"{name(self.tok, a)}, fw {name(self.tok, b)}; each prefers its own by: ours {gap_o:.3f}, "
                  f"fw {gap_f:.3f}; ours top5 [{top5(self.tok, lp_o)}]; fw top5 [{top5(self.tok, lp_f)}]")
        best_o, best_f = int(lp_o.argmax()), int(lp_f.argmax())
        if self.beam == 1 and best_f != b:
            return "ct2_rules", f"{detail}; fw's logits under the reference rules give {name(self.tok, best_f)}"
        if self.beam > 1 and best_o == best_f:
            scores = []
            for tokens in (ours, theirs):
                ended = tokens + [self.tok.eot]
                scores.append((self.probe.score(self.probe.ours(own, initial, ended), initial, tokens),
                               self.probe.score(self.probe.theirs(fw.encoded, initial, ended), initial, tokens)))
            return "beam_search", (f"{detail}; scores (ours, ct2 logits) of our hypothesis {scores[0][0]:.4f}, "
                                   f"{scores[0][1]:.4f}, of fw's {scores[1][0]:.4f}, {scores[1][1]:.4f}")
        if int(lp_m.argmax()) == best_f:
            return ("mel_padding" if fw.frames < N_FRAMES else "mel"), (
                f"{detail}; with fw's mel ours gives {name(self.tok, best_f)} (window of {fw.frames} frames)")
        if int(lp_e.argmax()) == best_f:
            return "encoder_numerics", f"{detail}; with fw's encoder output ours gives {name(self.tok, best_f)}"
        if forced_o != forced_f:
            return "timestamp_rule_tie", f"{detail}; timestamp forced: ours {forced_o}, fw {forced_f}"
        return ("near_tie" if abs(gap_o) < NEAR_TIE and abs(gap_f) < NEAR_TIE else "logprob_gap"), detail

    def explain_seek(self, our: Window, fw: Window) -> tuple[str, str]:
        tb = self.tok.timestamp_begin
        tokens = our.tokens
        detail = f"next seek ours {our.next_seek}, fw {fw.next_seek} (window {fw.seek}+{fw.frames})"
        if len(tokens) >= 2 and tokens[-1] >= tb > tokens[-2] and our.next_seek < fw.next_seek:
            return "seek_rest", detail
        if tokens and tokens[-1] < tb and our.frames == N_FRAMES:
            return "seek_anchor", detail
        return "seek_other", detail


def run(engine: Engine, fw_model, stream: str, start: float, seconds: float, beam: int) -> Report | None:
    """Transcribe ``seconds`` of ``stream`` from ``start`` with both engines and compare them (None when the
    stream is over by ``start``)."""
    audio, reference = load_stream(stream)
    audio = audio[round(start * SAMPLE_RATE): round((start + seconds) * SAMPLE_RATE)]
    if len(audio) < SAMPLE_RATE:
        return None
    language = reference.get("language", "en") if engine.multilingual else "en"
    tokenizer = engine.tokenizer(language)
    theirs, fw_mel = faster_whisper_windows(fw_model, audio, language, beam)
    ours = our_windows(engine, audio, language, beam)
    comparer = Comparer(engine, tokenizer, fw_model.model, audio, beam)
    content = fw_mel.shape[-1] - 1
    mel_diff = max_diff(comparer.mel[:, :content], fw_mel[:, :content])[0]
    interior = max_diff(comparer.mel[:, : content - 2], fw_mel[:, : content - 2])[0]
    first = theirs[0]
    same_mel = max_diff(engine.encode(torch.from_numpy(first.mel)), first.encoded)
    own_mel = max_diff(engine.encode(comparer.mel[:, :N_FRAMES]), first.encoded)
    compared, tokens_agree, agree, divergences = comparer.compare(ours, theirs)
    return Report(stream, start, len(audio) / SAMPLE_RATE, mel_diff, interior, same_mel, own_mel, len(theirs),
                  compared, tokens_agree, agree, divergences, ours, theirs)


def load_engines(model: str, threads: int):
    """Our engine and faster-whisper's model over the same named model's files, both float32 on ``threads``."""
    from faster_whisper import WhisperModel

    configure_threads(threads)
    engine = Engine.load(model, dtype="float32")
    source = model_files(model)
    if isinstance(source, str):
        fw = WhisperModel(source, device="cpu", compute_type="float32", cpu_threads=threads)
    else:
        fw = WhisperModel(model, device="cpu", compute_type="float32", cpu_threads=threads, files=source)
    return engine, fw


def print_report(r: Report, tok: Tokenizer, verbose: bool) -> None:
    print(f"{r.stream:<11} {r.start:6g} {r.seconds:5.1f} {r.mel_max_diff:9.2e} {r.mel_max_diff_interior:9.2e} "
          f"{r.encoder_diff_same_mel[0]:8.2e} {r.encoder_diff_same_mel[1]:8.2e} {r.encoder_diff_own_mel[0]:8.2e} "
          f"{r.fw_windows:3d} {len(r.ours):4d} {r.compared:4d} {r.tokens_agree:4d} {r.agree:4d}  "
          f"{', '.join(f'{c} {n}' for c, n in Counter(d.cause for d in r.divergences).items())}", flush=True)
    if verbose:
        for label, windows in (("fw", r.theirs), ("ours", r.ours)):
            for w in windows:
                print(f"    {label:<4} seek {w.seek:5d}+{w.frames:4d} -> {w.next_seek:5d} T={w.temperature} "
                      f"prompt {len(w.prompt):3d} skip {w.skipped} {tok.decode_with_timestamps(w.tokens)!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", nargs="+", default=["en_prompts", "en_mixed"])
    parser.add_argument("--start", type=float, nargs="+", default=[0.0], help="excerpt starts, seconds")
    parser.add_argument("--seconds", type=float, default=60.0, help="excerpt length, seconds")
    parser.add_argument("--beam-size", type=int, default=1)
    parser.add_argument("--model", default="tiny.en", choices=sorted(NAMED_MODELS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--examples", type=int, default=3, help="examples printed per cause")
    parser.add_argument("--verbose", action="store_true", help="print every window of both engines")
    args = parser.parse_args()
    engine, fw = load_engines(args.model, args.threads)
    print(f"# parity {args.model}, beam {args.beam_size}, float32 both, {args.threads} thread(s)")
    print(f"{'stream':<11} {'from s':>6} {'s':>5} {'mel max':>9} {'mel int.':>9} {'enc same':>8} {'rel':>8} "
          f"{'enc own':>8} {'fw':>3} {'ours':>4} {'cmp':>4} {'tok=':>4} {'all=':>4}  first divergences")
    reports = []
    for stream in args.streams:
        for start in args.start:
            report = run(engine, fw, stream, start, args.seconds, args.beam_size)
            if report is None:
                print(f"{stream:<11} {start:6g}  (the stream ends before)")
                continue
            language = load_stream(stream)[1].get("language", "en") if engine.multilingual else "en"
            print_report(report, engine.tokenizer(language), args.verbose)
            reports.append(report)
    total = Counter(d.cause for r in reports for d in r.divergences)
    compared = sum(r.compared for r in reports)
    print(f"\nwindows: faster-whisper {sum(r.fw_windows for r in reports)}, compared (same seek) {compared}, "
          f"tokens agree {sum(r.tokens_agree for r in reports)}, tokens and next seek agree "
          f"{sum(r.agree for r in reports)}")
    print(f"{'cause':<26} {'count':>5}  meaning")
    for cause, count in total.most_common():
        print(f"{cause:<26} {count:5d}  {CAUSES[cause]}")
    for cause in total:
        print(f"\n[{cause}]")
        examples = [(r, d) for r in reports for d in r.divergences if d.cause == cause][: args.examples]
        for r, d in examples:
            print(f"  {r.stream} from {r.start:g} s, window {d.window} (seek {d.seek}): {d.detail}")


if __name__ == "__main__":
    main()
