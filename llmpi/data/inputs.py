"""What `prepare` reads: the input files, how they are shared among ranks, and their documents.

A document is one text file (any name but *.jsonl) or one record of a .jsonl file; either kind
may be .gz- or .zst-compressed. Each rank takes a contiguous run of documents: a plain .jsonl
file may be divided at line starts, a text file or a compressed file never. So the ranks' shares,
joined in rank order, are the corpus in input order whatever the rank count. data/README.md.
"""
import codecs
import gzip
import json
import os
import sys
import sysconfig
import zlib
from bisect import bisect_right
from collections import namedtuple

from ..errors import UserError

DEFAULT_CORPUS_CAP = 8 << 20     # bytes of stdlib source in the default corpus: prepares in about a second
READ_BYTES = 4 << 20             # read inputs in pieces this big (bounded memory, steady progress)
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}

# One piece of a document: `data` its bytes, `first` whether it starts the document, `disk` the
# input bytes consumed (compressed bytes for compressed files: what progress and ETA count),
# `path` and `offset` (of `data` in the document's text) for error messages.
Piece = namedtuple("Piece", "data first disk path offset")


def default_corpus():
    """Sorted .py files of this Python's standard library, whole files up to DEFAULT_CORPUS_CAP."""
    root = sysconfig.get_paths()["stdlib"]
    files, total = [], 0

    def described():
        return files, f"Python {sys.version.split()[0]} stdlib .py sources ({len(files)} files, {total} bytes)"

    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            size = os.path.getsize(path)
            if total + size > DEFAULT_CORPUS_CAP:
                return described()
            files.append((path, size))
            total += size
    return described()


def gather(inputs):
    """(files as (path, size), source description) for the --input list; None = the default corpus.
    Directories are walked in sorted order, hidden entries skipped."""
    if not inputs:
        return default_corpus()
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


def _compression(path):
    return next((ext for ext in (".gz", ".zst") if path.endswith(ext)), "")


def is_jsonl(path) -> bool:
    return path[:len(path) - len(_compression(path))].endswith(".jsonl")


def split_shares(files, n_ranks):
    """Per rank, the (path, lo, hi) ranges it reads: equal slices of the corpus' bytes, moved to
    document boundaries. A plain .jsonl range holds the lines that start in [lo, hi) (hi None: to
    the end); any other file goes whole to the rank whose slice holds its middle byte."""
    total = sum(size for _, size in files)
    bounds = [r * total // n_ranks for r in range(n_ranks + 1)]
    shares = [[] for _ in range(n_ranks)]
    start = 0
    for path, size in files:
        if size and is_jsonl(path) and not _compression(path):
            for r in range(n_ranks):
                lo, hi = max(bounds[r], start) - start, min(bounds[r + 1], start + size) - start
                if lo < hi:
                    shares[r].append((path, lo, None if hi == size else hi))
        elif size:
            owner = min(bisect_right(bounds, start + size // 2) - 1, n_ranks - 1)
            shares[owner].append((path, 0, None))
        start += size
    return shares


def _zstandard():
    try:
        import zstandard
    except ImportError:
        raise UserError("reading .zst inputs needs the zstandard package: pip install zstandard "
                        "(or pip install 'llmpi[zstd]')") from None
    return zstandard


def _open(path):
    """(raw file, decompressed stream): raw.tell() is how far into the input file we are."""
    try:
        raw = open(path, "rb")
    except OSError as err:
        raise UserError(f"cannot read input {path!r}: {err.strerror}") from None
    kind = _compression(path)
    if kind == ".gz":
        return raw, gzip.GzipFile(fileobj=raw, mode="rb")
    if kind == ".zst":
        return raw, _zstandard().ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    return raw, raw


def _read_errors():
    """What reading a damaged compressed (or unreadable) input raises."""
    errors = (OSError, EOFError, zlib.error)
    if "zstandard" in sys.modules:
        errors += (sys.modules["zstandard"].ZstdError,)
    return errors


def pieces(share, text_key="text"):
    """The Pieces of one rank's share, in order."""
    for path, lo, hi in share:
        raw, stream = _open(path)
        try:
            with raw:
                yield from (_records(raw, stream, path, lo, hi, text_key) if is_jsonl(path)
                            else _text_file(raw, stream, path))
        except UserError:
            raise
        except _read_errors() as err:
            kind = {".gz": "gzip", ".zst": "zstd"}.get(_compression(path))
            what = f"is not a valid {kind} file" if kind else "cannot be read"
            raise UserError(f"input {path!r} {what} ({err}); fix or remove it") from None


def _text_file(raw, stream, path):
    offset, done = 0, 0
    while data := stream.read(READ_BYTES):
        now = raw.tell()
        yield Piece(data, offset == 0, now - done, path, offset)
        offset, done = offset + len(data), now


def _lines(stream):
    """(line without its newline, bytes it took) of a binary stream, read in READ_BYTES blocks."""
    partial = []
    while block := stream.read(READ_BYTES):
        parts = block.split(b"\n")
        if len(parts) > 1:
            head = b"".join(partial + [parts[0]])
            yield head, len(head) + 1
            for line in parts[1:-1]:
                yield line, len(line) + 1
            partial = []
        partial.append(parts[-1])
    last = b"".join(partial)
    if last:
        yield last, len(last)


def _records(raw, stream, path, lo, hi, text_key):
    """Each jsonl record's text, as one whole-document Piece; records are the lines that start in [lo, hi)."""
    lines = _lines(stream)
    pos = 0
    if lo:  # the line running through byte lo - 1 belongs to the previous range
        raw.seek(lo - 1)
        pos = lo - 1 + next(lines, (b"", 0))[1]
    # progress counts line bytes in a plain file (ranges read past their end) and input bytes in a compressed one
    consumed = (lambda: pos) if stream is raw else raw.tell
    done = consumed()
    for line, nbytes in lines:
        if hi is not None and pos >= hi:
            break
        at, pos = pos, pos + nbytes
        if not line.strip():
            continue
        text = _record_text(line, path, at, text_key)
        if text:
            now = consumed()
            yield Piece(text, True, now - done, path, 0)
            done = now
    yield Piece(b"", False, consumed() - done, path, 0)  # the progress of skipped lines and the tail


def _record_text(line, path, at, key):
    where = f"input {path!r}: the line at byte {at}"
    try:
        record = json.loads(line)
    except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8
        raise UserError(f"{where} is not valid JSON ({err}); each line of a .jsonl file must be one "
                        "JSON object") from None
    if not isinstance(record, dict) or key not in record:
        keys = ", ".join(map(repr, record)) if isinstance(record, dict) else f"a JSON {type(record).__name__}"
        raise UserError(f"{where} has no {key!r} key (it has {keys or 'no keys'}); name the text's key "
                        "with --text-key")
    text = record[key]
    if not isinstance(text, str):
        raise UserError(f"{where}: {key!r} is a {type(text).__name__}, not a string; name the text's key "
                        "with --text-key")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{where}: {key!r} holds a lone surrogate escape (\\ud8xx), which is not text; "
                        "fix the record") from None


def texts(share_pieces):
    """(text, piece) of Pieces decoded as strict UTF-8, each document on its own."""
    decoder = last = None
    for piece in share_pieces:
        if piece.first:
            if decoder is not None:
                _finish(decoder, last)
            decoder = codecs.getincrementaldecoder("utf-8")("strict")
        text = ""
        if piece.data:
            last = piece
            try:
                text = decoder.decode(piece.data)
            except UnicodeDecodeError as err:
                _not_utf8(piece, err)
        yield text, piece
    if decoder is not None:
        _finish(decoder, last)


def _finish(decoder, piece):
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as err:
        _not_utf8(piece, err, at_end=True)


def _not_utf8(piece, err, at_end=False):
    where = "at its end" if at_end else f"near byte {piece.offset + max(err.start, 0)}"
    raise UserError(f"input {piece.path!r} is not valid UTF-8 {where}; use --tokenizer byte, "
                    "which reads any bytes") from None
