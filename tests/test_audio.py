"""Tests for streaming.core.audio: WAV reading, resampling and live PCM decoding."""

import io
import os
import struct
import wave
from pathlib import Path

import av
import numpy as np
import pytest

from streaming.audiofile import decode_audio, read_audio
from streaming.core import audio
from streaming.core.audio import SAMPLE_RATE, AudioFormatError, PcmDecoder, resample


def write_wav(path: Path, frames: bytes, rate: int, channels: int, width: int) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(frames)
    return path


def riff_wav(tag: int, rate: int, channels: int, bits: int, data: bytes, extensible: bool = False) -> bytes:
    """Hand-built RIFF/WAVE bytes, optionally with a WAVE_FORMAT_EXTENSIBLE fmt chunk."""
    block = channels * bits // 8
    head = struct.pack("<HHIIHH", 0xFFFE if extensible else tag, channels, rate, rate * block, block, bits)
    if extensible:
        guid_tail = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
        head += struct.pack("<HHI", 22, bits, 0x3) + struct.pack("<H", tag) + guid_tail
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(head)) + head
    body += b"LIST" + struct.pack("<I", 3) + b"abc\x00"  # odd-sized chunk to skip, with pad byte
    body += b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def sine(freq: float, rate: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    return amp * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)


def peak(x: np.ndarray, rate: int) -> tuple[float, float]:
    """(frequency, amplitude) of the strongest Hann-windowed FFT bin."""
    win = np.hanning(len(x))
    spec = np.abs(np.fft.rfft(x * win))
    k = int(np.argmax(spec))
    return k * rate / len(x), 2 * spec[k] / win.sum()


def test_wav_16bit_mono(tmp_path):
    ints = np.array([0, 16384, -16384, 32767, -32768], dtype="<i2")
    out = read_audio(write_wav(tmp_path / "a.wav", ints.tobytes(), 16000, 1, 2))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ints / 32768.0, atol=1e-7)


def test_wav_16bit_stereo_averaged(tmp_path):
    frames = np.array([[16384, 0], [-16384, -16384], [32767, -32768]], dtype="<i2")
    out = read_audio(write_wav(tmp_path / "s.wav", frames.tobytes(), 16000, 2, 2))
    np.testing.assert_allclose(out, frames.mean(axis=1) / 32768.0, atol=1e-6)


def test_wav_8bit_unsigned(tmp_path):
    out = read_audio(write_wav(tmp_path / "u8.wav", bytes([128, 192, 64, 255, 0]), 16000, 1, 1))
    np.testing.assert_allclose(out, [0.0, 0.5, -0.5, 127 / 128, -1.0], atol=1e-7)


def test_wav_24bit(tmp_path):
    values = [0, 1 << 22, -(1 << 22), (1 << 23) - 1, -(1 << 23)]
    data = b"".join(v.to_bytes(3, "little", signed=True) for v in values)
    out = read_audio(write_wav(tmp_path / "24.wav", data, 16000, 1, 3))
    np.testing.assert_allclose(out, np.array(values) / 2.0**23, atol=1e-7)


def test_wav_32bit_int(tmp_path):
    ints = np.array([0, 1 << 30, -(1 << 30), -(1 << 31)], dtype="<i4")
    out = read_audio(write_wav(tmp_path / "32.wav", ints.tobytes(), 16000, 1, 4))
    np.testing.assert_allclose(out, [0.0, 0.5, -0.5, -1.0], atol=1e-7)


@pytest.mark.parametrize("extensible", [False, True])
def test_wav_float32_clipped(tmp_path, extensible):
    frames = np.array([[0.25, 0.75], [-0.5, -0.5], [3.0, 1.0]], dtype="<f4")
    path = tmp_path / "f.wav"
    path.write_bytes(riff_wav(3, 16000, 2, 32, frames.tobytes(), extensible))
    np.testing.assert_allclose(read_audio(path), [0.5, -0.5, 1.0], atol=1e-7)


def test_wav_extensible_pcm(tmp_path):
    ints = np.array([[8192, -8192, 16384]], dtype="<i2")
    path = tmp_path / "e.wav"
    path.write_bytes(riff_wav(1, 16000, 3, 16, ints.tobytes(), extensible=True))
    np.testing.assert_allclose(read_audio(path), [16384 / 3 / 32768], atol=1e-7)


def test_wav_resampled_on_read(tmp_path):
    x = sine(440, 44100, 1.0)
    path = write_wav(tmp_path / "r.wav", np.round(x * 32767).astype("<i2").tobytes(), 44100, 1, 2)
    out = read_audio(path)
    assert len(out) == 16000
    freq, amp = peak(out[2000:14000], SAMPLE_RATE)
    assert freq == pytest.approx(440, abs=2) and amp == pytest.approx(0.5, rel=0.01)
    assert len(read_audio(path, sample_rate=8000)) == 8000


def test_missing_file(tmp_path):
    path = tmp_path / "nope.wav"
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        read_audio(path)


def test_truncated_wav(tmp_path):
    full = riff_wav(1, 16000, 1, 16, b"\x00\x01" * 1000)
    path = tmp_path / "cut.wav"
    path.write_bytes(full[:-500])
    with pytest.raises(AudioFormatError, match="cut.wav.*truncated"):
        read_audio(path)
    path.write_bytes(full[:30])
    with pytest.raises(AudioFormatError, match="cut.wav"):
        read_audio(path)
    path.write_bytes(b"RIFF\x00")
    with pytest.raises(AudioFormatError, match="cut.wav.*truncated"):
        read_audio(path)


def test_garbage_and_empty(tmp_path):
    path = tmp_path / "junk.bin"
    path.write_bytes(os.urandom(300))
    with pytest.raises(AudioFormatError, match="junk.bin.*not a WAV.*could not be decoded as audio"):
        read_audio(path)
    path.write_bytes(b"")
    with pytest.raises(AudioFormatError, match="junk.bin.*empty"):
        read_audio(path)


def encoded(audio: np.ndarray, container: str, codec: str, rate: int) -> bytes:
    """``audio`` (mono float at ``rate``) encoded as stereo with PyAV."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as output:
        stream = output.add_stream(codec, rate=rate, layout="stereo")
        frame = av.AudioFrame.from_ndarray(np.stack([audio, audio]).astype(np.float32), format="fltp",
                                           layout="stereo")
        frame.rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            output.mux(packet)
    return buf.getvalue()


@pytest.mark.parametrize(("container", "codec", "rate"), [("mp3", "libmp3lame", 16000), ("flac", "flac", 22050),
                                                          ("ogg", "libopus", 48000), ("webm", "libopus", 48000),
                                                          ("ipod", "aac", 16000)])
def test_compressed_formats_are_decoded_in_process(tmp_path, monkeypatch, container, codec, rate):
    monkeypatch.setenv("PATH", str(tmp_path))  # no ffmpeg executable needed
    t = np.arange(rate) / rate
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    path = tmp_path / f"tone.{container}"
    path.write_bytes(encoded(tone, container, codec, rate))
    audio = read_audio(path)
    assert audio.dtype == np.float32 and abs(len(audio) - SAMPLE_RATE) < 0.1 * SAMPLE_RATE
    assert 0.4 < float(np.abs(audio[2000:-2000]).max()) < 0.6  # the channels averaged, not summed
    spectrum = np.abs(np.fft.rfft(audio[2000:-2000]))
    assert abs(np.argmax(spectrum) * SAMPLE_RATE / (len(audio) - 4000) - 440) < 5


def test_a_wav_encoding_not_decoded_natively_goes_to_pyav(tmp_path):
    path = tmp_path / "ulaw.wav"
    path.write_bytes(encoded(np.zeros(8000, np.float32), "wav", "pcm_mulaw", 8000))
    audio = read_audio(path)
    assert abs(len(audio) - SAMPLE_RATE) < 100 and float(np.abs(audio).max()) < 0.01


def test_a_length_limit_is_enforced_while_decoding():
    tone = np.zeros(3 * 16000, np.float32)
    with pytest.raises(AudioFormatError, match="longer than 2 s"):
        decode_audio(encoded(tone, "flac", "flac", 16000), max_seconds=2)


def test_real_wav(shared_eval: Path):
    real_wav = shared_eval / "streams" / "en_mixed.wav"
    out = read_audio(real_wav)
    with wave.open(str(real_wav)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        expected = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2") / 32768.0
    assert out.dtype == np.float32 and out.shape == expected.shape
    np.testing.assert_allclose(out, expected, atol=1e-7)
    assert 0 < np.abs(out).max() <= 1


def test_resample_identity():
    x = np.random.default_rng(0).standard_normal(100)
    out = resample(x, 16000, 16000)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, x, rtol=1e-6)


@pytest.mark.parametrize("freq", [440.0, 1000.0, 6000.0])
def test_resample_44k_keeps_frequency_and_amplitude(freq):
    out = resample(sine(freq, 44100, 1.5), 44100)
    assert len(out) == 24000
    f, amp = peak(out[4000:20000], SAMPLE_RATE)
    assert f == pytest.approx(freq, abs=1.5)
    assert amp == pytest.approx(0.5, rel=0.005)


@pytest.mark.parametrize("freq", [8500.0, 12000.0, 20000.0])
def test_resample_44k_attenuates_above_nyquist(freq):
    out = resample(sine(freq, 44100, 1.0), 44100)
    assert np.abs(out[1000:-1000]).max() < 0.5e-3  # > 60 dB below the input


def test_resample_upsample_and_short_chunks():
    out = resample(sine(1000, 8000, 1.0), 8000)
    assert len(out) == 16000
    f, amp = peak(out[2000:14000], SAMPLE_RATE)
    assert f == pytest.approx(1000, abs=1.5) and amp == pytest.approx(0.5, rel=0.005)
    assert len(resample(np.ones(3), 48000)) == 1
    assert len(resample(np.ones(1), 8000)) == 2
    assert resample(np.zeros(0), 44100).shape == (0,)


def test_resample_rejects_bad_input():
    with pytest.raises(ValueError, match="1-D"):
        resample(np.zeros((2, 10)), 44100)
    with pytest.raises(ValueError, match="orig_sr"):
        resample(np.zeros(10), 0)


def decode_in_chunks(dec: PcmDecoder, data: bytes, rng: np.random.Generator) -> np.ndarray:
    out, pos = [], 0
    while pos < len(data):
        n = int(rng.integers(0, 700)) * dec.frame_size
        out.append(dec.decode(data[pos : pos + n]))
        pos += n
    return np.concatenate(out + [dec.flush()])


@pytest.mark.parametrize(
    ("rate", "encoding", "channels"),
    [
        (16000, "pcm_s16le", 1),
        (48000, "pcm_s16le", 2),
        (44100, "pcm_f32le", 1),
        (8000, "pcm_f32le", 3),
        (22050, "pcm_s16le", 1),
        (44101, "pcm_s16le", 1),
    ],
)
def test_decoder_chunking_invariance(rate, encoding, channels):
    rng = np.random.default_rng(rate + channels)
    x = np.clip(rng.standard_normal((int(rate * 0.4), channels)) * 0.3, -1, 1)
    data = (x * 32767).astype("<i2").tobytes() if encoding == "pcm_s16le" else x.astype("<f4").tobytes()
    whole = PcmDecoder(rate, encoding, channels)
    reference = np.concatenate([whole.decode(data), whole.flush()])
    assert reference.dtype == np.float32 and len(reference) == -(-len(x) * 16000 // rate)
    dec = PcmDecoder(rate, encoding, channels)
    for _ in range(3):  # flush resets, so the decoder can be reused
        np.testing.assert_allclose(decode_in_chunks(dec, data, rng), reference, atol=1e-5)
    mono = x.mean(axis=1) if encoding == "pcm_f32le" else ((x * 32767).astype("<i2") / 32768).mean(axis=1)
    np.testing.assert_allclose(reference, np.clip(resample(mono, rate), -1, 1), atol=1e-5)


def test_decoder_latency():
    assert PcmDecoder(16000).latency == 0
    assert 0 < PcmDecoder(48000).latency < 0.003
    assert 0 < PcmDecoder(8000).latency < 0.005
    dec = PcmDecoder(48000)
    out = dec.decode(np.zeros(4800, dtype="<i2").tobytes())
    held = int(round(dec.latency * 16000))
    assert abs(len(out) - (1600 - held)) <= 1
    assert len(out) + len(dec.flush()) == 1600


def test_decoder_rejects_partial_frames_without_consuming():
    rng = np.random.default_rng(1)
    data = (rng.standard_normal((2000, 2)) * 8000).astype("<i2").tobytes()
    ref = PcmDecoder(44100, channels=2)
    expected = np.concatenate([ref.decode(data), ref.flush()])
    dec = PcmDecoder(44100, channels=2)
    first = dec.decode(data[:400])
    for bad in (data[400:401], data[400:403], data[400:406]):
        with pytest.raises(AudioFormatError, match="4-byte frames"):
            dec.decode(bad)
    rest = np.concatenate([dec.decode(data[400:]), dec.flush()])
    np.testing.assert_allclose(np.concatenate([first, rest]), expected, atol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_decoder_rejects_non_finite_without_consuming(bad):
    x = np.linspace(-0.5, 0.5, 960).astype("<f4")
    ref = PcmDecoder(48000, "pcm_f32le")
    expected = np.concatenate([ref.decode(x.tobytes()), ref.flush()])
    dec = PcmDecoder(48000, "pcm_f32le")
    first = dec.decode(x[:480].tobytes())
    poisoned = x[480:].copy()
    poisoned[7] = bad
    with pytest.raises(AudioFormatError, match="NaN or infinite"):
        dec.decode(poisoned.tobytes())
    rest = np.concatenate([dec.decode(x[480:].tobytes()), dec.flush()])
    np.testing.assert_allclose(np.concatenate([first, rest]), expected, atol=1e-6)


def test_decoder_clips_float_input():
    dec = PcmDecoder(16000, "pcm_f32le", channels=2)
    out = dec.decode(np.array([[2.0, 1.0], [-5.0, 0.0], [0.25, 0.25]], dtype="<f4").tobytes())
    np.testing.assert_allclose(out, [1.0, -0.5, 0.25])


def test_decoder_empty_chunk():
    for rate in (16000, 44100):
        dec = PcmDecoder(rate)
        for chunk in (b"", bytearray(), memoryview(b"")):
            out = dec.decode(chunk)
            assert out.dtype == np.float32 and out.shape == (0,)


def test_decoder_s16_passthrough_at_16k():
    ints = np.array([0, 32767, -32768, 100], dtype="<i2")
    np.testing.assert_allclose(PcmDecoder(16000).decode(ints.tobytes()), ints / 32768.0)


def test_the_detector_hears_the_16_bit_pcm_the_client_sent():
    """16-bit PCM at 16 kHz reaches webrtcvad bit for bit: decoding to float and back loses nothing."""
    pcm = np.random.default_rng(0).integers(-32768, 32768, 48000).astype("<i2").tobytes()
    assert audio.to_pcm16(PcmDecoder(16000).decode(pcm)) == pcm


@pytest.mark.parametrize("width", sorted(audio.INTEGER_ENCODINGS))
def test_decoder_integer_widths_read_as_wav_files_do(tmp_path, width):
    """Each integer encoding decodes, in chunks and resampled, exactly as a WAV file of that width reads."""
    rng = np.random.default_rng(width)
    frames = rng.integers(0, 256, size=44100 // 10 * 2 * width, dtype=np.uint8).tobytes()  # 0.1 s, stereo
    expected = read_audio(write_wav(tmp_path / "x.wav", frames, 44100, 2, width))
    decoder = PcmDecoder(44100, audio.INTEGER_ENCODINGS[width], channels=2)
    cut = 2 * width * 1001
    out = np.concatenate([decoder.decode(frames[:cut]), decoder.decode(frames[cut:]), decoder.flush()])
    np.testing.assert_allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sample_rate": 7999}, "8000 to 192000"),
        ({"sample_rate": 192001}, "8000 to 192000"),
        ({"sample_rate": 44100.0}, "8000 to 192000"),
        ({"sample_rate": 16000, "encoding": "mulaw"}, "pcm_f32le, pcm_s16le"),
        ({"sample_rate": 16000, "channels": 0}, "1 to 8"),
        ({"sample_rate": 16000, "channels": 9}, "1 to 8"),
    ],
)
def test_decoder_rejects_unsupported_settings(kwargs, message):
    with pytest.raises(AudioFormatError, match=message):
        PcmDecoder(**kwargs)


def test_audio_format_error_is_value_error():
    assert issubclass(audio.AudioFormatError, ValueError)
