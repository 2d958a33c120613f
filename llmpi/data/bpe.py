"""Byte-level BPE (GPT-2's kind of tokenizer) on Hugging Face `tokenizers`: trained on the corpus
by `prepare`, or a tokenizer.json the user brings. Its JSON is stored in the token file, so
reading the file needs nothing else; nothing is ever downloaded. data/README.md.

Every byte string has a byte-level encoding, so encode -> to_bytes is exact for any text; special
tokens (<|endoftext|> between documents) stand for no source bytes.
"""
import json

import numpy as np

from ..errors import UserError

EOT = "<|endoftext|>"
EOT_NAMES = (EOT, "<|end_of_text|>", "</s>")  # the document separator, first one the tokenizer has
MIN_VOCAB = 257          # the 256 byte tokens and the end-of-text token
PIECE_CHARS = 1 << 16    # documents are encoded in pieces about this long (parallel, bounded memory)
MAX_UNCUT = 1 << 20      # ... and cut anyway after this many characters without a place to cut exactly


def _hf():
    try:
        import tokenizers
    except ImportError:
        raise UserError("the bpe tokenizer needs Hugging Face tokenizers: pip install tokenizers") from None
    return tokenizers


def _byte_alphabet():
    """GPT-2's byte <-> printable character table (bytes_to_unicode), as character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _is_byte_level(decoder) -> bool:
    kind = (decoder or {}).get("type")
    return kind == "ByteLevel" or (kind == "Sequence" and any(map(_is_byte_level, decoder.get("decoders", []))))


def _gather(blob, offsets, ids) -> bytes:
    """The byte strings of `ids` joined, from a table of all of them (blob, offsets), without a Python loop."""
    lengths = offsets[1:][ids] - offsets[:-1][ids]
    starts = np.cumsum(lengths) - lengths
    index = np.repeat(offsets[:-1][ids] - starts, lengths) + np.arange(int(lengths.sum()))
    return blob[index].tobytes()


class BPETokenizer:
    """A byte-level BPE from its tokenizer.json text. `to_bytes(ids)` gives the source bytes exactly
    (special tokens give none); `decode(ids)` gives text, special tokens written out. `library`:
    the `tokenizers.Tokenizer` underneath."""

    name = "bpe"
    vocab = ""

    def __init__(self, json_text: str, source: str = "the tokenizer"):
        hf = _hf()
        fix = "give a byte-level BPE tokenizer.json (GPT-2's, or one `prepare --tokenizer bpe` made)"
        try:
            self.library = hf.Tokenizer.from_str(json_text)
            spec = json.loads(json_text)
        except Exception as err:  # the library raises plain Exceptions for bad JSON or a bad layout
            raise UserError(f"{source} is not a tokenizers JSON file ({str(err).splitlines()[0]}); {fix}") from None
        model_type = (spec.get("model") or {}).get("type")
        if model_type != "BPE" or not _is_byte_level(spec.get("decoder")):
            raise UserError(f"{source} is a {model_type} tokenizer without a ByteLevel decoder, which cannot "
                            f"store every byte; {fix}")
        self.json, self.source = json_text, source
        # a document is encoded as it is: no truncation, padding or post-processor tokens, and text
        # that spells a special token is text (only prepare's document separators are specials)
        self.library.no_truncation()
        self.library.no_padding()
        self.library.encode_special_tokens = True
        self._tables()

    def _tables(self):
        vocab = self.library.get_vocab(with_added_tokens=True)
        if not vocab:
            raise UserError(f"{self.source} has an empty vocabulary; give a trained byte-level BPE tokenizer.json")
        self.vocab_size = max(vocab.values()) + 1
        added = self.library.get_added_tokens_decoder()
        alphabet = _byte_alphabet()
        source, shown = [b""] * self.vocab_size, [b""] * self.vocab_size
        for token, i in vocab.items():
            if i in added:  # special: no source bytes; a plain added token: its text
                shown[i] = added[i].content.encode("utf-8")
                source[i] = b"" if added[i].special else shown[i]
                continue
            try:
                source[i] = shown[i] = bytes(alphabet[c] for c in token)
            except KeyError:
                raise UserError(f"{self.source}: token {token!r} (id {i}) is not made of byte-level characters, so "
                                "the tokenizer is not a byte-level BPE; give a byte-level BPE tokenizer.json") from None
        specials = {t.content: i for i, t in added.items() if t.special}
        eot = next((name for name in EOT_NAMES if name in specials), None)
        if eot is None:
            raise UserError(f"{self.source} has none of the special tokens {', '.join(EOT_NAMES)} to separate "
                            f"documents; add {EOT} as a special token")
        self.eot_token, self.eot = eot, specials[eot]

        def table(strings):
            return (np.frombuffer(b"".join(strings), np.uint8),
                    np.concatenate([[0], np.cumsum([len(s) for s in strings])]).astype(np.int64))

        self._source, self._shown = table(source), table(shown)
        self.token_nbytes = np.diff(self._source[1])  # (V,) source bytes per token: for bits per byte

    def _ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids).astype(np.int64).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise UserError(f"token id out of range 0..{self.vocab_size - 1} for {self.source}")
        return ids

    def encode(self, text: str) -> np.ndarray:
        return np.array(self.library.encode(text, add_special_tokens=False).ids, dtype=np.uint32)

    def encode_batch(self, pieces) -> list:
        """uint32 ids of each text in `pieces`, encoded in parallel by the library's threads."""
        return [np.array(e.ids, dtype=np.uint32)
                for e in self.library.encode_batch_fast(pieces, add_special_tokens=False)]

    def to_bytes(self, ids) -> bytes:
        return _gather(*self._source, self._ids(ids))

    def decode(self, ids, errors: str = "replace") -> str:
        return _gather(*self._shown, self._ids(ids)).decode("utf-8", errors)


def load_tokenizer_file(path) -> BPETokenizer:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read --tokenizer-file {path!r} ({getattr(err, 'strerror', None) or err}); "
                        "give the path of a tokenizer.json") from None
    return BPETokenizer(text, f"--tokenizer-file {path!r}")


def train_bpe(texts, vocab_size, show_progress=False) -> BPETokenizer:
    """A byte-level BPE (GPT-2's pre-tokenizer, <|endoftext|> special) learnt from the strings
    `texts`; it has fewer than vocab_size tokens when the text runs out of pairs to merge."""
    if vocab_size < MIN_VOCAB:
        raise UserError(f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least {MIN_VOCAB} "
                        f"(256 bytes and {EOT})")
    hf = _hf()
    tok = hf.Tokenizer(hf.models.BPE())
    tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = hf.decoders.ByteLevel()
    trainer = hf.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=show_progress,
                                     initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return BPETokenizer(tok.to_str(), "the trained BPE")


def _next_cut(text, lo, hi) -> int:
    """The first i in [lo, hi) with text[i] a space between two ASCII letters or digits, or -1."""
    i = text.find(" ", max(lo, 1), hi)
    while i != -1 and i + 1 < len(text):
        before, after = text[i - 1], text[i + 1]
        if before.isascii() and before.isalnum() and after.isascii() and after.isalnum():
            return i
        i = text.find(" ", i + 1, hi)
    return -1


def cut_pieces(text, final):
    """(pieces, rest): `text` cut into pieces of about PIECE_CHARS characters, each cut just before
    a space between two ASCII letters or digits. Byte-level pre-tokenizers (GPT-2's regex and its
    successors) split there too, so the pieces encode to exactly the tokens of the whole. `rest` is
    the tail to prepend to the next text (none when final). A stretch of MAX_UNCUT characters with
    no such space is cut anyway: that may change the tokens at that cut, the same at any rank count."""
    pieces, start = [], 0
    while len(text) - start > PIECE_CHARS:
        cut = _next_cut(text, start + PIECE_CHARS, start + MAX_UNCUT)
        if cut < 0:
            if len(text) - start <= MAX_UNCUT:  # wait for more text: the cut must not depend on where reads end
                break
            cut = start + MAX_UNCUT
        pieces.append(text[start:cut])
        start = cut
    rest = text[start:]
    if final and rest:
        pieces.append(rest)
        rest = ""
    return pieces, rest
