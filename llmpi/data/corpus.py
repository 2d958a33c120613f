"""A corpus into an HDF5 token file (`python -m llmpi.data prepare`), on one rank or many.

Every rank tokenizes its share of the documents (llmpi.data.inputs) into a scratch file of raw
tokens next to the output; rank 0 then joins the scratch files in rank order into the .h5,
hashing as it writes, so the file is the same whatever the rank count. The output is written
under a temporary name and renamed, so an error, Ctrl-C or SIGTERM leaves no partial file.
`ensure_prepared` makes the default file on first use under MPI. Layout and why: data/README.md.
"""
import errno
import hashlib
import os
import re
import shutil
import sys

import h5py
import numpy as np

from ..comm.world import agree, world
from ..errors import UserError
from .bpe import BPETokenizer, load_tokenizer_file, train_bpe
from .encode import bpe_pieces, check_no_nul, encoded
from .inputs import READ_BYTES, gather, pieces, split_shares, texts
from .names import check_file, check_prepare
from .progress import Progress, across_ranks, from_root
from .tokenfile import FORMAT_VERSION, TokenFile
from .tokenizers import MAX_CODEPOINT, TOKENIZERS, ByteTokenizer, CharTokenizer, codepoints, mark_seen, token_dtype
from .writers import clean_stale, mark

CHUNK_TOKENS = 1 << 16           # HDF5 chunk: small enough that a random window reads little extra
BPE_TRAIN_MB = 256               # BPE merges are learnt from the first this many MB of the corpus
RESERVE_SLACK = 1 << 20          # room reserved for the token file's metadata beyond its tokens


def default_data_path() -> str:
    return os.path.join("data", "stdlib_byte.h5")


def _check_options(tokenizer, vocab_size, tokenizer_file, val_fraction, bpe_train_mb):
    if tokenizer not in TOKENIZERS:
        raise UserError(f"unknown tokenizer {tokenizer!r}; choose one of: {', '.join(TOKENIZERS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1) (got {val_fraction})")
    if tokenizer != "bpe" and (vocab_size or tokenizer_file):
        raise UserError(f"--vocab-size and --tokenizer-file are for --tokenizer bpe, not {tokenizer}")
    if tokenizer == "bpe" and bool(vocab_size) == bool(tokenizer_file):
        raise UserError("--tokenizer bpe needs either --vocab-size N (train a BPE on the corpus) or "
                        "--tokenizer-file tokenizer.json (use that one)")
    if vocab_size:
        token_dtype(vocab_size)  # a vocabulary no token file could hold fails before any work
    if not bpe_train_mb > 0:
        raise UserError(f"--bpe-train-mb must be positive (got {bpe_train_mb})")


class _SplitWriter:
    """Streams tokens into `train` then `val`, hashing them in the stored byte order and counting
    the source bytes of each split."""

    def __init__(self, f, n_train, n_val, dtype, token_nbytes):
        self.dsets = [self._create(f, "train", n_train, dtype), self._create(f, "val", n_val, dtype)]
        self.n_train, self.n_total, self.pos = n_train, n_train + n_val, 0
        self.dtype, self.sha, self.token_nbytes = dtype, hashlib.sha256(), token_nbytes
        self.source_bytes = [0, 0]
        self.pending, self.n_pending = [], 0

    @staticmethod
    def _create(f, name, n, dtype):
        chunks = (min(n, CHUNK_TOKENS),) if n else None  # HDF5 refuses chunks on an empty dataset
        return f.create_dataset(name, shape=(n,), dtype=dtype, chunks=chunks)

    def write(self, ids):
        """Buffer small pieces so HDF5 sees few large writes."""
        self.pending.append(ids)
        self.n_pending += len(ids)
        if self.n_pending >= READ_BYTES:
            self.flush()

    def flush(self):
        ids = np.concatenate(self.pending).astype(self.dtype, copy=False) if self.pending else np.zeros(0)
        self.pending, self.n_pending = [], 0
        self.sha.update(ids.tobytes())
        i = 0
        while i < len(ids):
            split = 0 if self.pos < self.n_train else 1
            lo = self.pos - split * self.n_train
            take = min(len(ids) - i, (self.n_train if split == 0 else self.n_total) - self.pos)
            self.dsets[split][lo:lo + take] = ids[i:i + take]
            counts = np.bincount(ids[i:i + take], minlength=len(self.token_nbytes))  # cheaper than a gather
            self.source_bytes[split] += int(counts @ self.token_nbytes)
            i += take
            self.pos += take


def _io_reason(err):
    """What the system said about a failed write: h5py's RuntimeError from closing a file whose
    write failed carries the errno only in its text."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    found = re.search(r"errno = (\d+)", str(err))
    if found:
        return os.strerror(int(found.group(1)))
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _full(what, err):
    return UserError(f"cannot write {what}: {_io_reason(err)}; free disk space (or raise the quota or "
                     "file-size limit) next to the output and prepare again")


def _reserve(tmp, nbytes):
    """An empty HDF5 file at `tmp` with `nbytes` of disk allocated to it, so that a full disk or
    quota is one clean OSError here, before HDF5 writes: HDF5 fails a write half-way with errors it
    cannot recover from (its close fails, its objects' deallocation reports more, even crashes).
    HDF5 then writes into the reserved space and cuts the file to its contents on close."""
    with h5py.File(tmp, "w"):
        pass
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(tmp, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # those: no reserving here
            raise
    finally:
        os.close(fd)


def clean_temporaries(out):
    """Rank 0: remove what prepares of `out` killed mid-way left beside it (their writers are dead)."""
    for path in clean_stale(out):
        sys.stderr.write(f"removed {path}, left by a prepare that was killed\n")


def _make_scratch(scratch, out):
    parent = os.path.dirname(scratch)
    try:
        os.makedirs(parent, exist_ok=True)
        clean_temporaries(out)
        shutil.rmtree(scratch, ignore_errors=True)  # left by a killed run whose rank 0 had our pid
        os.mkdir(scratch)
        mark(scratch)  # so that a later prepare knows whether its writer still runs
        return scratch
    except OSError as err:
        raise UserError(f"cannot create the output directory {parent!r} or a scratch directory in it: "
                        f"{err.strerror}") from None


def _train(files, text_key, vocab_size, sample_mb, progress):
    """Rank 0: a BPE learnt from the corpus' first `sample_mb` MB of text, in input order."""
    limit = int(sample_mb * 1e6)
    bar = Progress(min(sum(size for _, size in files), limit), progress, "bpe sample")
    learnt = {"bytes": 0}

    def sample():
        for text, _, _ in bpe_pieces(texts(pieces(split_shares(files, 1)[0], text_key))):
            learnt["bytes"] += len(text.encode("utf-8"))  # text, not input bytes: .gz/.zst hold more
            bar.show(learnt["bytes"], 0)
            yield text
            if learnt["bytes"] >= limit:
                break
        bar.close()
        if progress:
            print("bpe: learning merges", file=sys.stderr, flush=True)

    tok = train_bpe(sample(), vocab_size, show_progress=progress and sys.stderr.isatty())
    return tok.json, learnt["bytes"]


def _char_vocabulary(comm, share, total, text_key, progress, source):
    """The char tokenizer of the corpus: each rank marks the characters of its share, then an OR over ranks."""
    from mpi4py import MPI

    def scan(exchange):
        seen = np.zeros(MAX_CODEPOINT + 1, dtype=bool)
        for text, piece in texts(pieces(share, text_key)):
            check_no_nul(text, piece)
            cps = codepoints(text)
            mark_seen(seen, cps)
            if exchange.add(piece.disk, len(cps)):
                break
        return seen

    seen = across_ranks(comm, scan, Progress(total, progress, "scan"))
    comm.Allreduce(MPI.IN_PLACE, seen, op=MPI.LOR)
    return CharTokenizer.from_seen(seen, source)


def _tokenize(share, tok, text_key, part, dtype, exchange):
    """This rank's share into its scratch file; (tokens, documents) written."""
    n_tokens = n_docs = 0
    with open(part, "wb") as f:
        for disk, ids, docs in encoded(pieces(share, text_key), tok):
            try:
                ids.astype(dtype, copy=False).tofile(f)
            except OSError as err:
                raise _full(f"the scratch file {part!r}", err) from None
            n_tokens, n_docs = n_tokens + len(ids), n_docs + docs
            if exchange.add(disk, len(ids)):
                break
    return n_tokens, n_docs


def _write(out, parts, counts, tok, dtype, val_fraction, source, attrs, progress):
    """Rank 0: the scratch files, in rank order, into the token file `out` (via a temporary name)."""
    n_total = sum(n for n, _ in counts)
    if n_total == 0:
        raise UserError(f"{out}: the corpus has no text ({source}); give --input files that contain text")
    n_val = int(n_total * val_fraction)
    n_train = n_total - n_val
    tmp = os.path.join(os.path.dirname(parts[0]), "tokens.h5")
    bar = Progress(n_total * dtype.itemsize, progress, "write")
    json_bytes = len(tok.json.encode("utf-8")) if isinstance(tok, BPETokenizer) else 0
    try:
        _reserve(tmp, n_total * dtype.itemsize * 65 // 64 + json_bytes + RESERVE_SLACK)
        with h5py.File(tmp, "r+") as f:
            writer = _SplitWriter(f, n_train, n_val, dtype, tok.token_nbytes)
            done = 0
            for part in parts:
                with open(part, "rb") as src:
                    while (ids := np.fromfile(src, dtype=dtype, count=READ_BYTES)).size:
                        writer.write(ids)
                        done += ids.size
                        bar.show(done * dtype.itemsize, done)
            writer.flush()
            bar.close()
            f.attrs.update(format_version=FORMAT_VERSION, tokenizer=tok.name, vocab=tok.vocab,
                           vocab_size=tok.vocab_size, n_train=n_train, n_val=n_val, source=source,
                           checksum=writer.sha.hexdigest(), source_bytes_train=writer.source_bytes[0],
                           source_bytes_val=writer.source_bytes[1], documents=sum(d for _, d in counts), **attrs)
            if isinstance(tok, BPETokenizer):
                f.create_dataset("tokenizer_json", data=np.frombuffer(tok.json.encode("utf-8"), np.uint8))
        os.replace(tmp, out)
    except OSError as err:
        raise _full(repr(out), err) from None
    except RuntimeError as err:  # h5py closing a file whose write failed (disk full): the errno is in the text
        if "errno" not in str(err):
            raise
        raise _full(repr(out), err) from None


def prepare(inputs=None, tokenizer="byte", val_fraction=0.1, out=None, progress=True, *, vocab_size=0,
            tokenizer_file=None, text_key="text", bpe_train_mb=BPE_TRAIN_MB, comm=None) -> str:
    """Tokenize `inputs` (files/dirs; None = the stdlib corpus) into the HDF5 token file `out`.

    The last `val_fraction` of the tokens is the validation split. `comm`: the ranks that share
    the work (default: this process alone); every one of them must call prepare alike."""
    from mpi4py import MPI
    comm = comm or MPI.COMM_SELF
    rank, root = comm.Get_rank(), comm.Get_rank() == 0
    out = out or default_data_path()
    agree(lambda: _check_options(tokenizer, vocab_size, tokenizer_file, val_fraction, bpe_train_mb), comm)
    files, source = agree(lambda: gather(inputs), comm)
    check_prepare(out, tokenizer, source)  # the same on every rank: no collective needed
    total = sum(size for _, size in files)
    if total == 0:
        raise UserError(f"{out}: the corpus is empty ({source or 'no files'}); give --input files that contain text")
    tok = agree(lambda: load_tokenizer_file(tokenizer_file) if tokenizer_file else None, comm)
    share = split_shares(files, comm.Get_size())[rank]
    # named before it exists, so that a signal at any point after its creation removes it (rank 0's name is used)
    scratch, parts = os.path.abspath(f"{out}.tmp{os.getpid()}"), None
    attrs = {}
    try:
        scratch = from_root(comm, lambda: _make_scratch(scratch, out))
        parts = [os.path.join(scratch, f"part{r:05d}") for r in range(comm.Get_size())]
        if tokenizer == "bpe" and tok is None:
            tok_json, learnt = from_root(comm, lambda: _train(files, text_key, vocab_size, bpe_train_mb,
                                                              progress and root))
            tok = BPETokenizer(tok_json, "the trained BPE")
            attrs.update(vocab_asked=vocab_size, bpe_train_bytes=learnt)
        elif tokenizer == "char":
            tok = _char_vocabulary(comm, share, total, text_key, progress and root, out)
        elif tokenizer == "byte":
            tok = ByteTokenizer()
        if isinstance(tok, BPETokenizer):
            attrs.update(eot_token=tok.eot)
        dtype = token_dtype(tok.vocab_size)
        counts = across_ranks(comm, lambda ex: _tokenize(share, tok, text_key, parts[rank], dtype, ex),
                              Progress(total, progress and root, "tokenize"))
        counts = comm.allgather(counts)
        from_root(comm, lambda: _write(out, parts, counts, tok, dtype, val_fraction, source, attrs, progress))
    finally:
        if root:
            shutil.rmtree(scratch, ignore_errors=True)
        elif parts and os.path.exists(parts[rank]):
            os.remove(parts[rank])
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
    if comm.Get_rank() == 0:
        clean_temporaries(path)
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
    return agree(lambda: _open_for_training(path, block_size, vocab_size, comm.Get_rank() == 0), comm)


def _open_for_training(path, block_size, vocab_size, check_range):
    """The token file, refused if its contents differ from what its name promises; a big file's
    ids are range-checked by one rank only (agree tells the others), not read N times over."""
    tf = TokenFile(path, block_size, vocab_size, check_range=check_range)
    try:
        check_file(tf)
    except UserError:
        tf.close()
        raise
    return tf
