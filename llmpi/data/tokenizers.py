"""Tokenizers for llmpi token files: byte (vocab 256), char (the corpus' own characters) and bpe
(byte-level BPE, llmpi.data.bpe).

All map text to integer ids and back exactly. `to_bytes(ids)` gives the original
bytes of the corpus; `decode(ids)` gives a str (for generated text, whose byte
sequences may not be valid UTF-8, invalid bytes become U+FFFD unless
errors="surrogateescape" is asked for, which round-trips exactly). `token_nbytes[i]` is the
number of source bytes token i stands for (bits per byte: llmpi.data.tokenfile).
"""
import numpy as np

from ..errors import UserError
from .bpe import BPETokenizer

TOKENIZERS = ("byte", "char", "bpe")
MAX_CODEPOINT = 0x10FFFF


def token_dtype(vocab_size: int) -> np.dtype:
    """Narrowest little-endian unsigned dtype that holds ids 0..vocab_size-1."""
    for dt in ("<u1", "<u2", "<u4"):
        if vocab_size <= np.iinfo(dt).max + 1:
            return np.dtype(dt)
    raise UserError(f"a vocabulary of {vocab_size} tokens is more than a token file can hold (32-bit ids); "
                    "use a smaller vocabulary")


def codepoints(text: str) -> np.ndarray:
    """Unicode code points of `text` as uint32, without a Python-level loop."""
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")


def mark_seen(seen: np.ndarray, cps: np.ndarray):
    """Set seen[c] for every code point c: an O(n) vocabulary scan (np.unique would sort)."""
    seen[cps] = True


class ByteTokenizer:
    """Token = one byte of the UTF-8 (or any) encoding: lossless for every input."""

    name = "byte"
    vocab_size = 256
    vocab = ""
    token_nbytes = np.ones(256, dtype=np.int64)

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", "surrogateescape"), dtype=np.uint8).copy()

    def to_bytes(self, ids) -> bytes:
        return np.asarray(ids).astype(np.uint8).tobytes()

    def decode(self, ids, errors: str = "replace") -> str:
        return self.to_bytes(ids).decode("utf-8", errors)


class CharTokenizer:
    """Token = one Unicode character; id = its rank in the sorted character set of the corpus."""

    name = "char"

    def __init__(self, chars: str, source: str = "the corpus"):
        self.vocab = chars
        self.vocab_size = len(chars)
        self.source = source
        self._table = codepoints(chars)
        self._lut = None
        self.token_nbytes = np.array([len(c.encode("utf-8")) for c in chars], dtype=np.int64)
        if self.vocab_size and np.any(np.diff(self._table.astype(np.int64)) <= 0):
            raise UserError(f"{source}: the char vocabulary is not sorted and unique; re-run llmpi.data prepare")

    @classmethod
    def from_seen(cls, seen: np.ndarray, source: str = "the corpus"):
        """From a bool mask over code points (see `mark_seen`)."""
        return cls(np.flatnonzero(seen).astype("<u4").tobytes().decode("utf-32-le"), source)

    def encode_codepoints(self, cps: np.ndarray) -> np.ndarray:
        if self._lut is None:  # code point -> id (-1 = unseen): one O(n) gather per encode
            self._lut = np.full(MAX_CODEPOINT + 1, -1, dtype=np.int32)
            self._lut[self._table] = np.arange(self.vocab_size, dtype=np.int32)
        ids = self._lut[cps]
        if ids.size and ids.min() < 0:
            c = chr(int(cps[np.argmax(ids < 0)]))
            raise UserError(f"character {c!r} (U+{ord(c):04X}) is not in the {self.vocab_size}-character "
                            f"vocabulary of {self.source}; use only characters of the training corpus "
                            "or prepare the data with --tokenizer byte")
        return ids.astype(token_dtype(self.vocab_size))

    def encode(self, text: str) -> np.ndarray:
        return self.encode_codepoints(codepoints(text))

    def to_bytes(self, ids) -> bytes:
        return self.decode(ids).encode("utf-8")

    def decode(self, ids, errors: str = "strict") -> str:
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise UserError(f"token id out of range 0..{self.vocab_size - 1} for the vocabulary of {self.source}")
        return self._table[ids.astype(np.int64)].astype("<u4").tobytes().decode("utf-32-le")


def make_tokenizer(name: str, vocab: str = "", source: str = "the corpus", tokenizer_json: str = None):
    """The tokenizer stored in a token file: its name, vocab string and (bpe) tokenizer JSON."""
    if name == "byte":
        return ByteTokenizer()
    if name == "char":
        return CharTokenizer(vocab, source)
    if name == "bpe":
        return BPETokenizer(tokenizer_json or "", f"the tokenizer of {source}")
    raise UserError(f"{source}: unknown tokenizer {name!r}; choose one of: {', '.join(TOKENIZERS)}")
