"""HDF5 token files: prepare them from text, open and validate them, shard and sample windows.

    python -m llmpi.data prepare [--input FILE_OR_DIR ...] [--tokenizer byte|char]
                                 [--val-fraction 0.1] [--out data/NAME.h5]
    python -m llmpi.data info|verify FILE
    python -m llmpi.data decode FILE [--split all|train|val] [--out FILE]

File layout and the default corpus are documented in data/README.md.
"""
import codecs
import hashlib
import os
import signal
import sys
import sysconfig
import time

import h5py
import numpy as np

from .comm.util import ArgumentParser, agree, rank
from .errors import UserError
from .sampler import STRATEGIES, Sampler, get_batch, splitmix64  # noqa: F401  (re-exported: the data API)
from .tokenizers import (MAX_CODEPOINT, TOKENIZERS, ByteTokenizer, CharTokenizer, codepoints, make_tokenizer,
                         mark_seen, token_dtype)

FORMAT_VERSION = 1
DEFAULT_CORPUS_CAP = 8 << 20     # bytes of stdlib source in the default corpus: prepares in about a second
READ_BYTES = 4 << 20             # read inputs in pieces this big (bounded memory, steady progress)
CHUNK_TOKENS = 1 << 16           # HDF5 chunk: small enough that a random window reads little extra
IN_MEMORY_BYTES = 256 << 20      # files below this are loaded (and checksummed) when opened
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def default_data_path() -> str:
    return os.path.join("data", "stdlib_byte.h5")


# ---------------------------------------------------------------- prepare

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


# ---------------------------------------------------------------- read

class TokenFile:
    """A validated, read-only token file. `.train`/`.val` are NumPy arrays for files under
    IN_MEMORY_BYTES (checksum verified on open) and h5py datasets otherwise (`verify()`)."""

    def __init__(self, path, block_size=None, vocab_size=None, in_memory=None):
        self.path = str(path)
        if not os.path.exists(self.path):
            raise UserError(f"data file {self.path!r} not found; create it with "
                            f"`python -m llmpi.data prepare --out {self.path}`")
        try:
            self._f = h5py.File(self.path, "r")
        except OSError:
            raise UserError(f"{self.path!r} is not an HDF5 file (or is damaged); "
                            "re-create it with `python -m llmpi.data prepare`") from None
        try:
            self._open(block_size, vocab_size, in_memory)
        except BaseException:
            self.close()
            raise

    def _fail(self, problem, fix="re-create it with `python -m llmpi.data prepare`"):
        raise UserError(f"data file {self.path!r}: {problem}; {fix}")

    def _open(self, block_size, vocab_size, in_memory):
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
        self.tokenizer = make_tokenizer(a["tokenizer"], a["vocab"], self.path)
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

    @staticmethod
    def _digest(arrays):
        sha, top = hashlib.sha256(), -1
        for arr in arrays:
            for lo in range(0, len(arr), 1 << 22):
                piece = np.ascontiguousarray(arr[lo:lo + (1 << 22)]).astype(arr.dtype.newbyteorder("<"))
                sha.update(piece.tobytes())
                top = max(top, int(piece.max()))
        return sha.hexdigest(), top

    def _check(self, digest):
        sha, top = digest
        if sha != self.attrs["checksum"]:
            self._fail("checksum mismatch (the tokens were changed or damaged)")
        if top >= self.vocab_size:
            self._fail(f"token id {top} is out of range for vocab_size {self.vocab_size}")

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


def ensure_prepared(path=None, comm=None, *, block_size=None, vocab_size=None, inputs=None,
                    tokenizer="byte", progress=True) -> TokenFile:
    """Open `path` on every rank, preparing it first on rank 0 if it is missing.

    Preparation happens only for the default path or when `inputs` is given (a missing
    user-named file is an error, not a reason to write the stdlib corpus there). Rank 0's
    outcome is broadcast, so a failure there is a UserError on every rank, never a hang."""
    from .comm.util import agree, world
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


# ---------------------------------------------------------------- CLI

def _cmd_info(args):
    with TokenFile(args.file, in_memory=False) as tf:
        for key in sorted(tf.attrs):
            value = tf.attrs[key]
            print(f"{key}: {value!r}" if key == "vocab" else f"{key}: {value}")
        print(f"dtype: {tf.dtype}  chunks: {tf.train.chunks}  size: {os.path.getsize(args.file)} bytes")


def _cmd_decode(args):
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise UserError(f"--out {args.out}: its directory does not exist; create it or choose another path")
    with TokenFile(args.file, in_memory=False) as tf:
        splits = {"all": [tf.train, tf.val], "train": [tf.train], "val": [tf.val]}[args.split]
        tmp = f"{args.out}.tmp{os.getpid()}" if args.out else None  # no half-written --out file
        sink = open(tmp, "wb") if tmp else sys.stdout.buffer
        try:
            for ds in splits:
                for lo in range(0, ds.shape[0], 1 << 22):
                    sink.write(tf.tokenizer.to_bytes(ds[lo:lo + (1 << 22)]))
            if tmp:
                sink.close()
                os.replace(tmp, args.out)
        finally:
            if tmp:
                sink.close()
                if os.path.exists(tmp):
                    os.remove(tmp)


def _parser():
    p = ArgumentParser(prog="llmpi.data", description="Prepare and inspect llmpi token files.")
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="tokenize text files into an HDF5 token file")
    pp.add_argument("--input", nargs="+", action="extend", help="files or directories (default: stdlib sources)")
    pp.add_argument("--tokenizer", choices=TOKENIZERS, default="byte")
    pp.add_argument("--val-fraction", type=float, default=0.1)
    pp.add_argument("--out", default=None, help=f"output .h5 (default {default_data_path()})")
    pp.add_argument("--quiet", action="store_true", help="no progress output")
    for name, text in (("info", "print a token file's attributes"),
                       ("verify", "re-read all tokens and check the checksum")):
        sub.add_parser(name, help=text).add_argument("file")
    pd = sub.add_parser("decode", help="write the text back (exactly the prepared bytes)")
    pd.add_argument("file")
    pd.add_argument("--split", choices=("all", "train", "val"), default="all")
    pd.add_argument("--out", default=None, help="output file (default stdout)")
    return p


def main(argv=None):
    _run(_parser().parse_args(argv))
    return 0


def command(argv=None):
    """`python -m llmpi.data`: a one-process tool, so under mpiexec rank 0 does the work instead
    of N ranks writing and printing the same file. Every rank parses (so --help and a bad
    argument end them all alike), and a UserError on rank 0 reaches every rank (agree)."""
    args = _parser().parse_args(argv)
    # SIGTERM (timeout, Slurm, kill) unwinds like Ctrl-C, so prepare and decode remove their
    # temporary files instead of leaving them behind
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    agree(lambda: _run(args) if rank() == 0 else None)
    return 0


def _run(args):
    if args.cmd == "prepare":
        out = prepare(args.input, args.tokenizer, args.val_fraction, args.out, progress=not args.quiet)
        with TokenFile(out, in_memory=False) as tf:
            print(f"wrote {out}: {tf.n_train} train + {tf.n_val} val tokens, {tf.tokenizer.name} "
                  f"tokenizer, vocab_size {tf.vocab_size}")
    elif args.cmd == "info":
        _cmd_info(args)
    elif args.cmd == "verify":
        with TokenFile(args.file, in_memory=False) as tf:
            tf.verify()
            print(f"{args.file}: ok ({tf.n_train + tf.n_val} tokens, checksum {tf.attrs['checksum'][:16]}...)")
    else:
        _cmd_decode(args)


if __name__ == "__main__":
    from llmpi.comm.util import run_main
    sys.exit(run_main(command, prog="llmpi.data") or 0)
