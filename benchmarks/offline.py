"""Offline accuracy and speed of our engine next to faster-whisper, on the eval streams.

Usage: python benchmarks/offline.py [--streams en_prompts en_mixed] [--beam-size 5] [--threads 2]
                                   [--start 0 23 32] [--show-text] [--dtype bfloat16] [--model base]
Each engine runs in its own process so that peak memory (max RSS) is its own. ``--dtype`` and ``--model``
apply to our engine (default float32 and tiny.en; ``auto`` is what ``serve`` uses); faster-whisper runs the
same model files, told the language of an English-only model and detecting it otherwise, as ours does.
``--start`` transcribes each stream from those seconds on (cut in the silence before a clip; scored against the
clips after it). ``--streams`` takes eval stream names or paths of NAME.json files (the held-out streams).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from evalkit import load_stream, machine, score_text


def run_engine(engine: str, stream: str, beam: int, threads: int, start: float = 0.0, dtype: str = "float32",
               model_name: str = "tiny.en") -> dict:
    audio, reference = load_stream(stream)
    audio = audio[round(start * 16000):]
    reference = dict(reference, segments=[s for s in reference["segments"] if s["start"] >= start])
    if engine == "whisper-stream":
        from streaming.engine import Engine, configure_threads
        from streaming.engine.transcribe import TranscribeOptions, transcribe

        configure_threads(threads)
        model = Engine.load(model_name, dtype=dtype)
        started = time.perf_counter()
        text = transcribe(model, audio, TranscribeOptions(beam_size=beam, best_of=beam)).text
    else:
        from faster_whisper import WhisperModel
        from parity import model_files  # the same weights as ours

        source = model_files(model_name)
        compute = engine.split("-")[-1]
        model = WhisperModel(source if isinstance(source, str) else model_name, device="cpu", compute_type=compute,
                             cpu_threads=threads, files=None if isinstance(source, str) else source)
        started = time.perf_counter()
        # an English-only model is told its language; a multilingual one detects it, as ours does
        segments, _ = model.transcribe(audio, beam_size=beam, language="en" if model_name.endswith(".en") else None)
        text = " ".join(s.text for s in segments)
    elapsed = time.perf_counter() - started
    result = score_text(reference, text)
    return {"engine": engine, "stream": stream, "start": start, "text": text, "wer": result["wer"],
            "words": result["words"], "seconds": elapsed,
            "rtf": elapsed / (len(audio) / 16000),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", nargs="+", default=["en_prompts", "en_mixed"])
    parser.add_argument("--engines", nargs="+", default=["whisper-stream", "faster-whisper-int8",
                                                         "faster-whisper-float32"])
    parser.add_argument("--beam-size", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--start", type=float, nargs="+", default=[0.0],
                        help="transcribe from these seconds of each stream on (default: 0)")
    parser.add_argument("--show-text", action="store_true", help="print each transcript")
    parser.add_argument("--dtype", default="float32", help="our engine's dtype: float32, bfloat16 or auto")
    parser.add_argument("--model", default="tiny.en", help="the model of both engines (tiny.en or base)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_engine(args.engines[0], args.streams[0], args.beam_size, args.threads, args.start[0],
                                    args.dtype, args.model)))
        return
    print(f"# offline, our model {args.model}, beam {args.beam_size}, {args.threads} threads, our dtype {args.dtype}, "
          f"{machine()}")
    print(f"{'stream':<12} {'from s':>6} {'engine':<24} {'words':>5} {'WER %':>6} {'RTF':>7} {'peak MB':>8}")
    for stream in args.streams:
        for start in args.start:
            for engine in args.engines:
                cmd = [sys.executable, __file__, "--child", "--engines", engine, "--streams", stream,
                       "--beam-size", str(args.beam_size), "--threads", str(args.threads), "--start", str(start),
                       "--dtype", args.dtype, "--model", args.model]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"{stream:<12} {start:6g} {engine:<24} failed: {proc.stderr.strip().splitlines()[-1:]}")
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                print(f"{stream:<12} {start:6g} {engine:<24} {r['words']:5d} {100 * r['wer']:6.2f} {r['rtf']:7.3f} "
                      f"{r['peak_rss_mb']:8.0f}", flush=True)
                if args.show_text:
                    print(f"    {r['text'].strip()}", flush=True)


if __name__ == "__main__":
    main()
