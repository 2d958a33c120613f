"""A corpus into an HDF5 token file (`python -m llmpi.data prepare`): text files, directories,
or the built-in stdlib sources, tokenized in bounded pieces and written atomically;
`ensure_prepared` makes the default file on first use under MPI. File layout and the default corpus: data/README.md.
"""
import codecs
import hashlib
import os
import sys
import sysconfig
import time

import h5py
import numpy as np

from ..comm.world import agree, world
from ..errors import UserError
from .tokenfile import FORMAT_VERSION, TokenFile
from .tokenizers import MAX_CODEPOINT, TOKENIZERS, ByteTokenizer, CharTokenizer, codepoints, mark_seen, token_dtype

DEFAULT_CORPUS_CAP = 8 << 20     # bytes of stdlib source in the default corpus: prepares in about a second
READ_BYTES = 4 << 20             # read inputs in pieces this big (bounded memory, steady progress)
CHUNK_TOKENS = 1 << 16           # HDF5 chunk: small enough that a random window reads little extra
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def default_data_path() -> str:
    return os.path.join("data", "stdlib_byte.h5")


def _default_corpus():
    """Sorted .py files of this Python's standard library, whole files up to DEFAULT_CORPUS_CAP."""
    root = sysconfig.get_paths()["stdlib"]
    files, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            size = os.path.getsize(path)
            if total + size > DEFAULT_CORPUS_CAP:
                return files, f"Python {sys.version.split()[0]} stdlib .py sources ({len(files)} files, {total} bytes)"
            files.append((path, size))
            total += size
    return files, f"Python {sys.version.split()[0]} stdlib .py sources ({len(files)} files, {total} bytes)"


def _gather(inputs):
    """(files, source description) for the --input list; directories are walked in sorted order."""
    if not inputs:
        return _default_corpus()
    files = []
    for item in inputs:
        if os.path.isdir(item):
            for dirpath, dirnames, filenames in os.walk(item):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                files += [os.path.join(dirpath, n) for n in sorted(filenames) if not n.startswith(".")]
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise UserError(f"input {item!r} does not exist; give existing text files or directories to --input")
    return [(p, os.path.getsize(p)) for p in files], ", ".join(str(i) for i in inputs)


class _Progress:
    """A bar on a terminal, a plain line every few seconds otherwise, nothing when disabled."""

    def __init__(self, total: int, enabled: bool, label: str):
        self.total, self.label, self.enabled = max(total, 1), label, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.done = self.tokens = 0
        self.t0 = self.last = time.perf_counter()

    def update(self, nbytes: int, ntokens: int):
        self.done += nbytes
        self.tokens += ntokens
        now = time.perf_counter()
        if self.enabled and now - self.last >= (0.1 if self.tty else 2.0):
            self.last = now
            self._show(now, end="" if self.tty else "\n")

    def close(self):
        if self.enabled:
            self._show(time.perf_counter(), end="\n")

    def _show(self, now, end):
        frac = min(self.done / self.total, 1.0)
        rate = self.tokens / max(now - self.t0, 1e-9)
        text = (f"{self.label}: {100 * frac:5.1f}% {self.done / 1e6:.1f}/{self.total / 1e6:.1f} MB "
                f"{rate / 1e6:.2f} Mtok/s")
        if self.tty:
            bar = "#" * int(30 * frac)
            text = f"\r{self.label}: [{bar:<30}] " + text.split(": ", 1)[1]
        sys.stderr.write(text + end)
        sys.stderr.flush()


def _read_pieces(files):
    """(path, offset, bytes) pieces of every input file in order."""
    for path, _ in files:
        try:
            with open(path, "rb") as f:
                offset = 0
                while piece := f.read(READ_BYTES):
                    yield path, offset, piece
                    offset += len(piece)
        except OSError as err:
            raise UserError(f"cannot read input {path!r}: {err.strerror}") from None


def _iter_codepoints(files):
    """(nbytes, code points) per piece; each file is decoded as strict UTF-8 on its own."""
    for path, offset, piece in _read_pieces(files):
        if offset == 0:
            decoder = codecs.getincrementaldecoder("utf-8")("strict")
        last = offset + len(piece) >= dict(files)[path]
        try:
            text = decoder.decode(piece, final=last)
        except UnicodeDecodeError as err:
            raise UserError(f"input {path!r} is not valid UTF-8 near byte {offset + max(err.start, 0)}; "
                            "use --tokenizer byte, which reads any bytes") from None
        if "\x00" in text:
            raise UserError(f"input {path!r} contains NUL characters, which the char tokenizer cannot store; "
                            "use --tokenizer byte")
        yield len(piece), codepoints(text)


class _SplitWriter:
    """Streams tokens into `train` then `val`, hashing them in the stored byte order."""

    def __init__(self, f, n_train, n_val, dtype):
        self.dsets = [self._create(f, "train", n_train, dtype), self._create(f, "val", n_val, dtype)]
        self.n_train, self.n_total, self.pos = n_train, n_train + n_val, 0
        self.dtype, self.sha = dtype, hashlib.sha256()
        self.pending, self.n_pending = [], 0

    @staticmethod
    def _create(f, name, n, dtype):
        chunks = (min(n, CHUNK_TOKENS),) if n else None  # HDF5 refuses chunks on an empty dataset
        return f.create_dataset(name, shape=(n,), dtype=dtype, chunks=chunks)

    def write(self, ids):
        """Buffer small pieces (one per small file) so HDF5 sees few large writes."""
        self.pending.append(ids)
        self.n_pending += len(ids)
        if self.n_pending >= READ_BYTES:
            self.flush()

    def flush(self):
        ids = np.concatenate(self.pending).astype(self.dtype, copy=False) if self.pending else np.zeros(0)
        self.pending, self.n_pending = [], 0
        if self.pos + len(ids) > self.n_total:
            raise UserError("an input file grew while it was being read; prepare again")
        self.sha.update(ids.tobytes())
        i = 0
        while i < len(ids):
            split = 0 if self.pos < self.n_train else 1
            lo = self.pos - split * self.n_train
            take = min(len(ids) - i, (self.n_train if split == 0 else self.n_total) - self.pos)
            self.dsets[split][lo:lo + take] = ids[i:i + take]
            i += take
            self.pos += take


def prepare(inputs=None, tokenizer="byte", val_fraction=0.1, out=None, progress=True) -> str:
    """Tokenize `inputs` (files/dirs; None = the stdlib corpus) into the HDF5 token file `out`.

    The last `val_fraction` of the tokens is the validation split. The file is written under a
    temporary name and renamed into place, so an error or Ctrl-C leaves no partial file."""
    out = out or default_data_path()
    if tokenizer not in TOKENIZERS:
        raise UserError(f"unknown tokenizer {tokenizer!r}; choose one of: {', '.join(TOKENIZERS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1) (got {val_fraction})")
    files, source = _gather(inputs)
    total = sum(size for _, size in files)
    if total == 0:
        raise UserError(f"{out}: the corpus is empty ({source or 'no files'}); give --input files that contain text")
    if tokenizer == "char":
        bar = _Progress(total, progress, "scan")
        seen, n_total = np.zeros(MAX_CODEPOINT + 1, dtype=bool), 0
        for nbytes, cps in _iter_codepoints(files):
            mark_seen(seen, cps)
            n_total += len(cps)
            bar.update(nbytes, len(cps))
        bar.close()
        tok = CharTokenizer.from_seen(seen, out)
        pieces = ((n, tok.encode_codepoints(cps)) for n, cps in _iter_codepoints(files))
    else:
        tok, n_total = ByteTokenizer(), total
        pieces = ((len(p), np.frombuffer(p, np.uint8)) for _, _, p in _read_pieces(files))
    n_val = int(n_total * val_fraction)
    n_train = n_total - n_val
    parent = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the output directory {parent!r}: {err.strerror}") from None
    tmp = f"{out}.tmp{os.getpid()}"
    try:
        with h5py.File(tmp, "w") as f:
            writer = _SplitWriter(f, n_train, n_val, token_dtype(tok.vocab_size))
            bar = _Progress(total, progress, "tokenize")
            for nbytes, ids in pieces:
                writer.write(ids)
                bar.update(nbytes, len(ids))
            writer.flush()
            bar.close()
            if writer.pos != n_total:
                raise UserError(f"an input file shrank while it was being read ({source}); prepare again")
            f.attrs.update(format_version=FORMAT_VERSION, tokenizer=tok.name, vocab=tok.vocab,
                           vocab_size=tok.vocab_size, n_train=n_train, n_val=n_val, source=source,
                           checksum=writer.sha.hexdigest())
        os.replace(tmp, out)
    except OSError as err:
        raise UserError(f"cannot write {out!r}: {err}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out



def ensure_prepared(path=None, comm=None, *, block_size=None, vocab_size=None, inputs=None,
                    tokenizer="byte", progress=True) -> TokenFile:
    """Open `path` on every rank, preparing it first on rank 0 if it is missing.

    Preparation happens only for the default path or when `inputs` is given (a missing
    user-named file is an error, not a reason to write the stdlib corpus there). Rank 0's
    outcome is broadcast, so a failure there is a UserError on every rank, never a hang."""
    comm = comm or world()
    path = path or default_data_path()
    may_prepare = inputs is not None or os.path.abspath(path) == os.path.abspath(default_data_path())
    error = None
    if comm.Get_rank() == 0 and may_prepare and not os.path.exists(path):
        try:
            prepare(inputs, tokenizer, out=path, progress=progress)
        except UserError as err:
            error = str(err)
        except Exception as err:  # a bug: tell the others, then let it abort the job with its traceback
            comm.bcast(f"rank 0 failed to prepare {path!r}: {err!r}", root=0)
            raise
    error = comm.bcast(error, root=0)
    if error is not None:
        raise UserError(error)
    return agree(lambda: TokenFile(path, block_size, vocab_size), comm)
