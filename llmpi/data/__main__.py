"""`python -m llmpi.data`: prepare and inspect token files.

    python -m llmpi.data prepare [--input FILE_OR_DIR ...] [--tokenizer byte|char]
                                 [--val-fraction 0.1] [--out data/NAME.h5]
    python -m llmpi.data info|verify FILE
    python -m llmpi.data decode FILE [--split all|train|val] [--out FILE]
"""
import os
import signal
import sys

from ..cli import ArgumentParser, run_main
from ..comm.world import agree, rank
from ..errors import UserError
from .corpus import default_data_path, prepare
from .tokenfile import TokenFile
from .tokenizers import TOKENIZERS


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
    sys.exit(run_main(command, prog="llmpi.data") or 0)
