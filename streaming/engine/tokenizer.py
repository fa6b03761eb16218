"""Whisper tokenizer: a tiktoken BPE encoding built from a model's own vocabulary files.

Supported sources: CTranslate2 ``vocabulary.txt`` / ``vocabulary.json`` and Hugging Face ``tokenizer.json`` or
``vocab.json`` (+ ``added_tokens.json``). Token ids equal the model's ids: ordinary BPE tokens rank by id, and
every ``<|...|>`` token is a tiktoken special token with its exact id.
"""

from __future__ import annotations

import copy
import enum
import functools
import json
import os
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

import tiktoken

from ..core.languages import LANGUAGES, check_task

# Vocabularies this large hold the language tokens: the model is multilingual (as Whisper decides).
MULTILINGUAL_VOCAB = 51865

__all__ = ["LANGUAGES", "TIME_PRECISION", "Tokenizer", "load_tokenizer"]

_LANGUAGE_ALIASES: dict[str, str] = {
    **{name: code for code, name in LANGUAGES.items()},
    "burmese": "my", "valencian": "ca", "flemish": "nl", "haitian": "ht", "letzeburgesch": "lb",
    "pushto": "ps", "panjabi": "pa", "moldavian": "ro", "moldovan": "ro", "sinhalese": "si",
    "castilian": "es", "mandarin": "zh", "iw": "he",
}  # fmt: skip

# Older vocabularies (e.g. the English-only models') name some language tokens by a legacy code.
_LEGACY_TOKEN_CODES = {"he": "iw"}

# Languages written without spaces between words: word splitting falls back to unicode characters.
_UNSPACED_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "my", "yue"})

TIME_PRECISION = 0.02  # seconds per timestamp token
_N_TIMESTAMPS = 1501  # <|0.00|> ... <|30.00|>

# GPT-2 pre-tokenization pattern (also used by Whisper's tiktoken encodings).
_PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

_VOCAB_FILES = ("vocabulary.txt", "vocabulary.json", "tokenizer.json", "vocab.json")

# Symbols Whisper suppresses by default (see Tokenizer.non_speech_tokens).
_SYMBOLS = [
    *'"#()*+/:;<=>@[\\]^_`{|}~「」『』',
    *"<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split(),
]
_MUSIC_SYMBOLS = "♩♪♫♬♭♮♯"


class _Keep(enum.Enum):
    KEEP = 0


_KEEP = _Keep.KEEP


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-unicode table used to store byte-level BPE tokens as printable text."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]  # "!".."~", "¡".."¬", "®".."ÿ"
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update((chr(256 + n), b) for n, b in enumerate(others))
    return table


def _is_special(token: str) -> bool:
    return token.startswith("<|") and token.endswith("|>")


class Tokenizer:
    """Whisper tokenizer over a tiktoken ``Encoding`` whose ids match the model's vocabulary."""

    def __init__(
        self,
        encoding: tiktoken.Encoding,
        *,
        multilingual: bool,
        language: str | None = None,
        task: str = "transcribe",
    ) -> None:
        self.encoding = encoding
        self.multilingual = multilingual
        self.n_vocab: int = encoding.n_vocab
        specials = encoding.special_tokens_set
        self.eot = self._special("<|endoftext|>")
        self.sot = self._special("<|startoftranscript|>")
        self.sot_prev = self._special("<|startofprev|>")
        self.sot_lm = self._special("<|startoflm|>")
        self.no_speech = self._special("<|nospeech|>" if "<|nospeech|>" in specials else "<|nocaptions|>")
        self.no_timestamps = self._special("<|notimestamps|>")
        self.timestamp_begin = self._special("<|0.00|>")
        self.transcribe = self._special("<|transcribe|>")
        self.translate = self._special("<|translate|>")
        self._language_ids: dict[str, int] = {}
        for code in LANGUAGES:
            token = f"<|{code}|>"
            if token not in specials and code in _LEGACY_TOKEN_CODES:
                token = f"<|{_LEGACY_TOKEN_CODES[code]}|>"
            if token in specials:
                self._language_ids[code] = self._special(token)
        self.all_language_codes: tuple[str, ...] = tuple(self._language_ids)
        self.all_language_tokens: tuple[int, ...] = tuple(self._language_ids.values())
        self._configure(language, task)

    def _special(self, token: str) -> int:
        if token not in self.encoding.special_tokens_set:
            raise ValueError(f"vocabulary {self.encoding.name!r} has no {token} token")
        return self.encoding.encode_single_token(token)

    def _configure(self, language: str | None, task: str) -> None:
        check_task(task)
        if not self.multilingual:
            if language is not None and _language_code(language) != "en":
                raise ValueError(f"English-only vocabulary cannot use language {language!r}")
            if task != "transcribe":
                raise ValueError("English-only vocabulary supports only task='transcribe'")
            self.language: str | None = "en"
            self.task = task
            self.sot_sequence: tuple[int, ...] = (self.sot,)
            return
        self.language = None if language is None else self._supported_code(language)
        self.task = task
        lang = () if self.language is None else (self.language_token(self.language),)
        self.sot_sequence = (self.sot, *lang, self.transcribe if task == "transcribe" else self.translate)

    def _supported_code(self, language: str) -> str:
        code = _language_code(language)
        if code not in self.all_language_codes:
            raise ValueError(f"language {code!r} ({LANGUAGES[code]}) is not in this model's vocabulary")
        return code

    def with_options(self, *, language: str | None | _Keep = _KEEP, task: str | _Keep = _KEEP) -> Tokenizer:
        """Copy sharing the encoding with a different language and/or task (omitted ones are kept)."""
        new = copy.copy(self)
        new._configure(self.language if language is _KEEP else language, self.task if task is _KEEP else task)
        return new

    @property
    def sot_sequence_including_notimestamps(self) -> tuple[int, ...]:
        """``sot_sequence`` followed by ``<|notimestamps|>``."""
        return (*self.sot_sequence, self.no_timestamps)

    def language_token(self, language: str) -> int:
        """Id of the ``<|xx|>`` token for a language code or English name."""
        return self._language_ids[self._supported_code(language)]

    def encode(self, text: str) -> list[int]:
        """Encode ordinary text; special-token strings in ``text`` are encoded as plain text."""
        return self.encoding.encode_ordinary(text)

    def decode(self, tokens: Iterable[int]) -> str:
        """Decode text tokens, dropping special and timestamp tokens (ids >= eot)."""
        return self.encoding.decode([int(t) for t in tokens if t < self.eot])

    def decode_with_timestamps(self, tokens: Iterable[int]) -> str:
        """Decode all tokens, rendering timestamps as ``<|1.08|>`` and other special tokens by name."""
        return self.encoding.decode([int(t) for t in tokens])

    def timestamp_token(self, seconds: float) -> int:
        """Id of the timestamp token nearest to ``seconds`` (0.00 to 30.00)."""
        index = round(seconds / TIME_PRECISION)
        if not 0 <= index < _N_TIMESTAMPS:
            raise ValueError(f"timestamp {seconds} s is outside 0.00-30.00 s")
        return self.timestamp_begin + index

    @cached_property
    def non_speech_tokens(self) -> tuple[int, ...]:
        """Sorted ids of symbol tokens Whisper suppresses by default so they are not transcribed.

        Symbols count when they encode to a single token (with or without a leading space); the music
        symbols always contribute their first token. " -" and " '" are included too.
        """
        ids = {self.encode(" -")[0], self.encode(" '")[0]}
        for symbol in (*_SYMBOLS, *_MUSIC_SYMBOLS):
            for tokens in (self.encode(symbol), self.encode(" " + symbol)):
                if len(tokens) == 1 or symbol in _MUSIC_SYMBOLS:
                    ids.add(tokens[0])
        return tuple(sorted(ids))

    def split_to_word_tokens(self, tokens: list[int]) -> tuple[list[str], list[list[int]]]:
        """Group tokens into words for word-level timestamps; returns (words, tokens of each word).

        Space-delimited languages: a word starts at a token beginning with a space, so punctuation without
        a leading space stays with the previous word. zh/ja/th/lo/my/yue: each complete unicode piece is a
        word. Special tokens (ids >= eot, e.g. a trailing eot) always form their own word.
        """
        pieces, groups = self._split_on_unicode(tokens)
        if self.language in _UNSPACED_LANGUAGES:
            return pieces, groups
        words: list[str] = []
        word_tokens: list[list[int]] = []
        for piece, group in zip(pieces, groups, strict=True):
            special = group[0] >= self.eot
            if not words or special or piece.startswith(" ") or word_tokens[-1][0] >= self.eot:
                words.append(piece)
                word_tokens.append(list(group))
            else:
                words[-1] += piece
                word_tokens[-1].extend(group)
        return words, word_tokens

    def _split_on_unicode(self, tokens: list[int]) -> tuple[list[str], list[list[int]]]:
        """Split into the shortest token runs that decode to complete characters of the full text."""
        full = self.decode_with_timestamps(tokens)
        pieces: list[str] = []
        groups: list[list[int]] = []
        group: list[int] = []
        offset = 0
        for token in tokens:
            group.append(int(token))
            piece = self.decode_with_timestamps(group)
            # An unfinished UTF-8 sequence decodes to U+FFFD where the full text has the real character.
            if full.startswith(piece, offset):
                pieces.append(piece)
                groups.append(group)
                offset += len(piece)
                group = []
        if group:
            pieces.append(self.decode_with_timestamps(group))
            groups.append(group)
        return pieces, groups


def _language_code(language: str) -> str:
    key = language.strip().lower()
    if key in LANGUAGES:
        return key
    if key in _LANGUAGE_ALIASES:
        return _LANGUAGE_ALIASES[key]
    raise ValueError(
        f"unknown language {language!r}; use a code such as 'en', 'es' or 'zh' ({', '.join(LANGUAGES)}) "
        "or an English name such as 'spanish'"
    )


def _read_tokens(path: Path) -> dict[int, str]:
    """Map id -> token string (GPT-2 byte-level text, or ``<|...|>``) from a vocabulary file."""
    if path.suffix == ".txt":  # CTranslate2: one token per line, in id order
        lines = path.read_text(encoding="utf-8").split("\n")
        if lines[-1] == "":
            lines.pop()
        return dict(enumerate(lines))
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, list):  # CTranslate2 vocabulary.json
        return dict(enumerate(data))
    if isinstance(data, dict) and isinstance(data.get("model"), dict):  # HF tokenizer.json
        vocab = data["model"].get("vocab")
        if data["model"].get("type") != "BPE" or not isinstance(vocab, dict):
            raise ValueError(f"{path}: expected a byte-level BPE tokenizer.json")
        tokens = {i: tok for tok, i in vocab.items()}
        tokens.update((added["id"], added["content"]) for added in data.get("added_tokens", []))
        return tokens
    if isinstance(data, dict):  # HF slow format: vocab.json plus optional added_tokens.json
        tokens = {i: tok for tok, i in data.items()}
        added = path.with_name("added_tokens.json")
        if added.is_file():
            tokens.update((i, tok) for tok, i in json.loads(added.read_text(encoding="utf-8")).items())
        return tokens
    raise ValueError(f"{path}: unrecognized vocabulary format")


@functools.lru_cache(maxsize=8)
def _build_encoding(path: str) -> tiktoken.Encoding:
    """Build (once per file) the tiktoken encoding for a vocabulary file."""
    try:
        tokens = _read_tokens(Path(path))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: cannot parse vocabulary: {exc}") from exc
    eot = next((i for i, tok in tokens.items() if tok == "<|endoftext|>"), None)
    if eot is None:
        raise ValueError(f"{path}: vocabulary has no <|endoftext|> token; is it a Whisper vocabulary?")
    to_byte = _unicode_to_byte()
    ranks: dict[bytes, int] = {}
    specials: dict[str, int] = {}
    for i, tok in tokens.items():
        if i >= eot and _is_special(tok):
            specials[tok] = i
        elif i < eot and all(c in to_byte for c in tok):
            ranks[bytes(to_byte[c] for c in tok)] = i
        else:
            raise ValueError(f"{path}: token {i} {tok!r} is not a byte-level BPE or <|...|> token")
    if "<|0.00|>" not in specials:  # some tokenizer.json files omit the timestamp tokens
        if "<|notimestamps|>" not in specials:
            raise ValueError(f"{path}: vocabulary has no <|notimestamps|> token")
        first = specials["<|notimestamps|>"] + 1
        if first <= max(specials.values()):
            raise ValueError(f"{path}: no room for timestamp tokens after <|notimestamps|>")
        specials.update((f"<|{k * TIME_PRECISION:.2f}|>", first + k) for k in range(_N_TIMESTAMPS))
    n_vocab = max(specials.values()) + 1
    if len(ranks) + len(specials) != n_vocab:
        raise ValueError(f"{path}: token ids are not unique and contiguous (0..{n_vocab - 1})")
    return tiktoken.Encoding(
        name=f"whisper:{path}",
        pat_str=_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens=specials,
        explicit_n_vocab=n_vocab,
    )


def _vocabulary_file(source: str | os.PathLike[str]) -> Path:
    path = Path(source)
    expected = ", ".join(_VOCAB_FILES)
    if path.is_dir():
        for name in _VOCAB_FILES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"no tokenizer vocabulary in directory {path}: expected one of {expected}")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (expected a directory with {expected})")
    if path.suffix not in (".txt", ".json"):
        raise ValueError(f"tokenizer source {path} is not a vocabulary file: expected one of {expected}")
    return path


def load_tokenizer(
    source: str | os.PathLike[str],
    *,
    multilingual: bool | None = None,
    language: str | None = None,
    task: str = "transcribe",
) -> Tokenizer:
    """Load the tokenizer of a model directory or vocabulary file.

    ``multilingual`` defaults to the vocabulary size (see ``MULTILINGUAL_VOCAB``).
    """
    encoding = _build_encoding(str(_vocabulary_file(source).resolve()))
    if multilingual is None:
        multilingual = encoding.n_vocab >= MULTILINGUAL_VOCAB
    return Tokenizer(encoding, multilingual=multilingual, language=language, task=task)
