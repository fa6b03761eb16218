"""Held-out evaluation streams of real recorded speech, built locally from Debian's Asterisk core sounds.

The public streams in ../shared/eval/streams are what the recogniser has been tuned on; these streams use
other recordings of the same kind (the Asterisk English prompts, one professional speaker, CC-BY-SA 3.0) to
check that results carry over. Every English clip that any public stream uses is excluded, as are clips whose
transcript is empty, annotated ([...], (...), <...>, quotes, symbols) or under 3 words, and clips outside
1.5 to 12 s. The output has the public format (NAME.wav: 16 kHz mono 16-bit PCM; NAME.json: audio,
sample_rate, language, duration, segments with start, end, text, source) and goes to --out, never the repo:

  heldout_continuous  clips rejoined with 50 to 250 ms pauses over a -45 dBFS low-pass room tone
  heldout_clean       other clips with 0.3 to 1.5 s pauses of digital silence
  heldout_noisy       heldout_clean under French babble (prompts end to end, looped) 10 dB below the speech
                      and white noise at 20 dB SNR

Clips are normalised to the same active-speech RMS (-20 dBFS over the 20 ms frames within 35 dB of the
clip's loudest); SNRs are relative to it. Clip order, pauses and noise come from --seed: the same packages
and seed give the same files. Audio is decoded with the `wave` module (-wav packages, resampled from 8 kHz)
or the ffmpeg binary (-g722 packages, 16 kHz wideband like the public streams; the default).

Needs: apt-get install asterisk-core-sounds-en-g722 asterisk-core-sounds-fr-g722 (or pass --install as root).
Usage: python benchmarks/heldout.py [--out benchmarks/out/heldout] [--codec g722|wav] [--seed 1234] [--install]
Then e.g.: python benchmarks/stream_eval.py --streams benchmarks/out/heldout/heldout_noisy.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import subprocess
import sys
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SR = 16000
ROOT = Path(__file__).resolve().parent.parent
PUBLIC = Path(os.environ.get("WHISPER_STREAM_EVAL", ROOT.parent / "shared" / "eval")) / "streams"
LEVEL_DB, ROOM_DB, BABBLE_DB, NOISE_DB = -20.0, -45.0, -30.0, -40.0  # dBFS: speech, room tone, babble, noise
LEAD_S, TAIL_S = 0.5, 1.0
ANNOTATION = re.compile(r"[\[\](){}<>\"=$+@_]")
SOUND_FILE = re.compile(r"/sounds/[^/\s]+/(\S+)\.(?:g722|wav|gsm|ulaw|alaw|sln16)\b")


@dataclass
class Clip:
    name: str  # path under the voice folder without extension, e.g. "vm-intro" or "followme/options"
    path: Path
    text: str
    source: str
    audio: np.ndarray | None = None


def package_version(pkg: str) -> str | None:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}|${Version}", pkg], capture_output=True, text=True)
    status, _, version = r.stdout.partition("|")
    return version if r.returncode == 0 and status.endswith(" installed") else None


def ensure_packages(pkgs: list[str], install: bool) -> None:
    missing = [p for p in pkgs if package_version(p) is None]
    if not missing:
        return
    cmd = ["apt-get", "install", "-y", *missing]
    if not install:
        sys.exit(f"error: missing package(s) {' '.join(missing)}; run: {' '.join(cmd)} (or pass --install as root)")
    if os.geteuid() != 0:
        sys.exit(f"error: --install needs root; run: sudo {' '.join(cmd)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(cmd, env=env).returncode != 0:  # stale package lists: refresh once and retry
        subprocess.run(["apt-get", "update"], env=env, check=True)
        subprocess.run(cmd, env=env, check=True)


def transcripts(lang: str) -> dict[str, str]:
    """{clip name: text} from the core-sounds-LANG.txt(.gz) that asterisk-core-sounds-LANG ships."""
    files = subprocess.run(["dpkg", "-L", f"asterisk-core-sounds-{lang}"], capture_output=True, text=True).stdout
    found = [f for f in files.split() if re.search(rf"/core-sounds-{lang}\.txt(\.gz)?$", f)]
    if not found:
        sys.exit(f"error: no transcript file in asterisk-core-sounds-{lang}; run: apt-get install -y "
                 f"asterisk-core-sounds-{lang}")
    opener = gzip.open if found[0].endswith(".gz") else open
    with opener(found[0], "rt", encoding="utf-8") as f:
        pairs = (line.partition(":") for line in f if not line.startswith(";"))
        return {name.strip(): " ".join(text.split()) for name, sep, text in pairs if sep}


def clip_seconds(path: Path) -> float:
    if path.suffix == ".wav":
        with wave.open(str(path)) as w:
            return w.getnframes() / w.getframerate()
    return path.stat().st_size / 8000  # G.722 is 64 kbit/s


def candidates(lang: str, codec: str, exclude: set[str]) -> list[Clip]:
    """The package's clips with a usable transcript, 1.5 to 12 s long, not in `exclude`, sorted by name."""
    pkg = f"asterisk-core-sounds-{lang}-{codec}"
    source = f"{pkg} {package_version(pkg)} (Debian): "
    texts = transcripts(lang)
    listing = subprocess.run(["dpkg", "-L", pkg], capture_output=True, text=True, check=True).stdout.split()
    clips = []
    for f in sorted(listing):
        m = SOUND_FILE.search(f)
        text = texts.get(m.group(1), "") if m and f.endswith("." + codec) else ""
        if (text and not ANNOTATION.search(text) and len(text.split()) >= 3 and m.group(1) not in exclude
                and 1.5 <= clip_seconds(Path(f)) <= 12):
            clips.append(Clip(m.group(1), Path(f), text, source + f))
    return clips


def public_clips(folder: Path) -> set[str]:
    """Names of the Asterisk English clips that the public streams use (from their `source` fields)."""
    if not folder.is_dir():
        sys.exit(f"error: public streams not found at {folder} (their clips must be excluded); set WHISPER_STREAM_EVAL")
    used = set()
    for f in sorted(folder.glob("*.json")):
        for seg in json.loads(f.read_text())["segments"]:
            m = SOUND_FILE.search(seg.get("source", ""))
            if m and "asterisk-core-sounds-en" in seg["source"]:
                used.add(m.group(1))
    return used


def decode(path: Path) -> np.ndarray:
    """16 kHz mono float64 in [-1, 1]."""
    if path.suffix == ".wav":
        with wave.open(str(path)) as w:
            if w.getsampwidth() != 2 or w.getnchannels() != 1:
                sys.exit(f"error: {path}: expected mono 16-bit PCM")
            x, rate = np.frombuffer(w.readframes(w.getnframes()), "<i2") / 32768.0, w.getframerate()
        if rate != SR:
            from streaming.core.audio import resample  # band-limited (windowed sinc), the server's own resampler

            x = resample(x, rate, SR).astype(np.float64)
        return x
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-f", path.suffix[1:], "-i", str(path), "-f", "s16le", "-ac", "1",
           "-ar", str(SR), "-"]
    return np.frombuffer(subprocess.run(cmd, capture_output=True, check=True).stdout, "<i2") / 32768.0


def frame_energy(x: np.ndarray, frame: int = SR // 50) -> np.ndarray:
    return np.mean(x[: len(x) // frame * frame].reshape(-1, frame) ** 2, axis=1)


def active_mask(x: np.ndarray) -> np.ndarray:
    e = frame_energy(x)
    return e > e.max() * 10 ** -3.5


def active_rms(x: np.ndarray) -> float:
    return float(np.sqrt(frame_energy(x)[active_mask(x)].mean()))


def at_level(x: np.ndarray, db: float) -> np.ndarray:
    return x * (10 ** (db / 20) / active_rms(x))


def load(clip: Clip, trim: bool = False) -> Clip:
    x = decode(clip.path)
    if trim:  # drop leading/trailing silence (20 ms frames outside the active range)
        idx = np.flatnonzero(active_mask(x))
        x = x[idx[0] * SR // 50 : (idx[-1] + 1) * SR // 50]
    clip.audio = at_level(x, LEVEL_DB)
    return clip


def place(
    pool: list[Clip], pause: tuple[float, float], minutes: float, rng: np.random.Generator
) -> tuple[list[tuple[Clip, int]], int]:
    """Takes clips from the end of `pool` until the stream reaches `minutes`: [(clip, start sample)], length."""
    placed: list[tuple[Clip, int]] = []
    t = round(LEAD_S * SR)
    while t < (minutes * 60 - TAIL_S) * SR:
        if not pool:
            sys.exit("error: ran out of usable clips; ask for fewer --minutes")
        if placed:
            t += round(rng.uniform(*pause) * SR)
        clip = load(pool.pop())
        placed.append((clip, t))
        t += len(clip.audio)
    return placed, t + round(TAIL_S * SR)


def render(placed: list[tuple[Clip, int]], n: int) -> np.ndarray:
    y = np.zeros(n)
    for clip, start in placed:
        y[start : start + len(clip.audio)] += clip.audio
    return y


def room_tone(n: int, rng: np.random.Generator, cutoff_hz: float = 1000.0) -> np.ndarray:
    """Stationary Gaussian noise through a 2nd-order Butterworth-shaped low-pass (applied in frequency)."""
    spec = np.fft.rfft(rng.standard_normal(n))
    spec /= np.sqrt(1 + (np.fft.rfftfreq(n, 1 / SR) / cutoff_hz) ** 4)
    x = np.fft.irfft(spec, n)
    return x * (10 ** (ROOM_DB / 20) / np.sqrt(np.mean(x**2)))


def babble(pool: list[Clip], n: int) -> tuple[np.ndarray, float]:
    """French clips, trimmed and levelled, end to end with no gaps up to n samples, looped; unique seconds."""
    parts, total = [], 0
    while pool and total < n:
        parts.append(load(pool.pop(), trim=True).audio)
        total += len(parts[-1])
    x = np.concatenate(parts)
    return np.resize(at_level(x, BABBLE_DB), n), len(x) / SR


def write(out: Path, name: str, audio: np.ndarray, placed: list[tuple[Clip, int]]) -> int:
    """Writes NAME.wav and NAME.json; returns the number of samples clipped to 16 bits."""
    pcm = np.round(audio * 32768)
    clipped = int(np.sum((pcm > 32767) | (pcm < -32768)))
    with wave.open(str(out / f"{name}.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes(np.clip(pcm, -32768, 32767).astype("<i2").tobytes())
    segments = [{"start": round(s / SR, 3), "end": round((s + len(c.audio)) / SR, 3), "text": c.text,
                 "source": c.source} for c, s in placed]
    meta = {"audio": f"{name}.wav", "sample_rate": SR, "language": "en", "duration": round(len(audio) / SR, 3),
            "segments": segments}
    (out / f"{name}.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    return clipped


def db(x: np.ndarray) -> float:
    return float(20 * np.log10(np.sqrt(np.mean(x**2)) + 1e-12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "heldout")
    parser.add_argument("--codec", choices=["g722", "wav"], default="g722",
                        help="which package variant to read: g722 (16 kHz, default) or wav (8 kHz, resampled)")
    parser.add_argument("--minutes", type=float, default=4.5, help="length of each stream (default 4.5)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--install", action="store_true", help="apt-get install the packages if missing (root)")
    args = parser.parse_args()
    ensure_packages([f"asterisk-core-sounds-{lang}-{args.codec}" for lang in ("en", "fr")], args.install)

    exclude = public_clips(PUBLIC)
    english, french = candidates("en", args.codec, exclude), candidates("fr", args.codec, set())
    rng = np.random.default_rng(args.seed)
    rng.shuffle(english)
    rng.shuffle(french)
    print(f"{len(english)} usable English clips after excluding the {len(exclude)} in {PUBLIC}; "
          f"{len(french)} French clips for babble")
    args.out.mkdir(parents=True, exist_ok=True)

    placed, n = place(english, (0.05, 0.25), args.minutes, rng)
    speech = render(placed, n)
    report = [("heldout_continuous", placed, speech + room_tone(n, rng), f"room tone {ROOM_DB:.0f} dBFS")]

    placed, n = place(english, (0.3, 1.5), args.minutes, rng)
    clean = render(placed, n)
    bab, unique = babble(french, n)
    noise = rng.standard_normal(n) * 10 ** (NOISE_DB / 20)
    report.append(("heldout_clean", placed, clean, "digital silence"))
    report.append(("heldout_noisy", placed, clean + bab + noise,
                   f"babble {db(bab):.1f} dBFS ({unique:.0f} s looped), noise {db(noise):.1f} dBFS"))

    print(f"speech {LEVEL_DB:.0f} dBFS active RMS per clip; written to {args.out}")
    for name, placed, audio, what in report:
        clipped = write(args.out, name, audio, placed)
        print(f"  {name}: {len(placed)} clips, {len(audio) / SR / 60:.2f} min, {what}"
              + (f", {clipped} samples clipped" if clipped else ""))


if __name__ == "__main__":
    main()
