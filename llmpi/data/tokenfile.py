"""Reading HDF5 token files: open, validate (attributes, lengths, checksum, id range), expose
the train and val splits and how many source bytes a token stands for. Layout: data/README.md.

A file under IN_MEMORY_BYTES is loaded and checksummed when opened. A bigger one stays on disk
(h5py datasets); its ids are still range-checked when opened, streamed in RANGE_CHUNK pieces, so a
token beyond the vocabulary is one line at the start instead of an IndexError mid-run (the full
checksum of a big file is `python -m llmpi.data verify`, which reads it all again).
"""
import hashlib
import os

import h5py
import numpy as np

from ..errors import UserError
from .names import prepare_command
from .tokenizers import make_tokenizer

FORMAT_VERSION = 1
IN_MEMORY_BYTES = 256 << 20      # files below this are loaded (and checksummed) when opened
RANGE_CHUNK = 1 << 24            # tokens per piece of a big file's id-range check (bounded memory)


class TokenFile:
    """A validated, read-only token file. `.train`/`.val` are NumPy arrays for files under
    IN_MEMORY_BYTES (checksum verified on open) and h5py datasets otherwise (ids range-checked on
    open unless check_range is False, `verify()` for the checksum)."""

    def __init__(self, path, block_size=None, vocab_size=None, in_memory=None, check_range=True):
        self.path = str(path)
        if not os.path.exists(self.path):
            raise UserError(f"data file {self.path!r} not found; create it with `{prepare_command(self.path)}`")
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as err:
            if "unable to lock file" in str(err).lower():  # HDF5's own locking: a writer has it open
                raise UserError(f"data file {self.path!r} is locked by another process ({err}); if no job "
                                "writes it, on file systems without flock set HDF5_USE_FILE_LOCKING=FALSE") from None
            raise UserError(f"{self.path!r} is not an HDF5 file (or is damaged); "
                            "re-create it with `python -m llmpi.data prepare`") from None
        try:
            self._open(block_size, vocab_size, in_memory, check_range)
        except BaseException:
            self.close()
            raise

    def _fail(self, problem, fix="re-create it with `python -m llmpi.data prepare`"):
        raise UserError(f"data file {self.path!r}: {problem}; {fix}")

    def _open(self, block_size, vocab_size, in_memory, check_range):
        f = self._f
        for name in ("train", "val"):
            if not isinstance(f.get(name), h5py.Dataset) or f[name].ndim != 1:
                self._fail(f"no 1-D dataset {name!r}, so it is not an llmpi token file")
        a = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        missing = [k for k in ("format_version", "tokenizer", "vocab", "vocab_size", "n_train", "n_val",
                               "checksum") if k not in a]
        if missing:
            self._fail(f"missing attribute(s) {', '.join(missing)}")
        if int(a["format_version"]) != FORMAT_VERSION:
            self._fail(f"format_version {a['format_version']} is not the {FORMAT_VERSION} this llmpi reads")
        self.attrs = a
        tokenizer_json = None
        if a["tokenizer"] == "bpe":
            if not isinstance(f.get("tokenizer_json"), h5py.Dataset):
                self._fail("a bpe token file without its tokenizer_json dataset")
            tokenizer_json = f["tokenizer_json"][...].tobytes().decode("utf-8")
        self.tokenizer = make_tokenizer(a["tokenizer"], a["vocab"], self.path, tokenizer_json)
        self.vocab_size = int(a["vocab_size"])
        self.n_train, self.n_val = int(a["n_train"]), int(a["n_val"])
        if self.tokenizer.vocab_size != self.vocab_size:
            self._fail(f"vocab_size {self.vocab_size} disagrees with its {a['tokenizer']} vocabulary "
                       f"of {self.tokenizer.vocab_size}")
        if (f["train"].shape[0], f["val"].shape[0]) != (self.n_train, self.n_val):
            self._fail("dataset lengths disagree with n_train/n_val (truncated file?)")
        if vocab_size and int(vocab_size) != self.vocab_size:
            self._fail(f"vocab_size is {self.vocab_size} but the model config says {vocab_size}",
                       f"set model.vocab_size = {self.vocab_size} (or 0 to take it from the data)")
        if self.n_train == 0:
            self._fail("the training split is empty", "prepare it from a non-empty corpus")
        if block_size:
            for name, n, fix in (("train", self.n_train, "a smaller --val-fraction"),
                                 ("val", self.n_val, "a larger --val-fraction")):
                if n < block_size + 1:  # training evaluates on val, so neither split may be short
                    self._fail(f"the {name} split has {n} tokens, fewer than block_size + 1 = {block_size + 1}",
                               f"prepare it again from a bigger corpus or with {fix}, or use a smaller block_size")
        self.dtype = f["train"].dtype
        nbytes = (self.n_train + self.n_val) * self.dtype.itemsize
        if in_memory if in_memory is not None else nbytes < IN_MEMORY_BYTES:
            self.train, self.val = f["train"][...], f["val"][...]
            self.close()
            self._check(self._digest([self.train, self.val]))
        else:
            self.train, self.val = f["train"], f["val"]
            if check_range:
                self._check_range()

    @staticmethod
    def _digest(arrays):
        sha, top = hashlib.sha256(), -1
        for arr in arrays:
            for lo in range(0, len(arr), 1 << 22):
                piece = np.ascontiguousarray(arr[lo:lo + (1 << 22)]).astype(arr.dtype.newbyteorder("<"))
                sha.update(piece.tobytes())
                top = max(top, int(piece.max()))
        return sha.hexdigest(), top

    def _check_range(self):
        """Every id below vocab_size, read in RANGE_CHUNK pieces (memory stays bounded)."""
        top = max((int(split[lo:lo + RANGE_CHUNK].max()) for split in (self.train, self.val)
                   for lo in range(0, len(split), RANGE_CHUNK)), default=-1)
        if top >= self.vocab_size:
            self._fail(f"token id {top} is out of range for vocab_size {self.vocab_size}")

    def _check(self, digest):
        sha, top = digest
        if sha != self.attrs["checksum"]:
            self._fail("checksum mismatch (the tokens were changed or damaged)")
        if top >= self.vocab_size:
            self._fail(f"token id {top} is out of range for vocab_size {self.vocab_size}")

    @property
    def source_bytes(self) -> dict:
        """{"train": n, "val": n}: the bytes of source text each split stands for (end-of-text tokens
        stand for none). Files written before this was stored get it counted from their tokens."""
        if "source_bytes_train" not in self.attrs:
            self.attrs["source_bytes_train"], self.attrs["source_bytes_val"] = (
                sum(int(self.tokenizer.token_nbytes[split[lo:lo + (1 << 22)]].sum())
                    for lo in range(0, len(split), 1 << 22)) for split in (self.train, self.val))
        return {"train": int(self.attrs["source_bytes_train"]), "val": int(self.attrs["source_bytes_val"])}

    @property
    def bytes_per_token(self) -> float:
        """Source bytes per token of the val split (the train split's if val is empty), for bits per
        byte = nats per token / bytes_per_token / ln 2: 1.0 exactly for byte files."""
        split, n = ("val", self.n_val) if self.n_val else ("train", self.n_train)
        return self.source_bytes[split] / n

    def verify(self):
        """Re-read every token: checksum and id range. Raises UserError on a mismatch."""
        self._check(self._digest([self.train, self.val]))

    def close(self):
        if getattr(self, "_f", None) is not None:
            self._f.close()
            self._f = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
