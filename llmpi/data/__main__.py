"""`python -m llmpi.data`: prepare and inspect token files.

    [mpiexec -n N] python -m llmpi.data prepare [--input FILE_OR_DIR ...] [--tokenizer byte|char|bpe]
                   [--vocab-size N | --tokenizer-file tokenizer.json] [--text-key text]
                   [--val-fraction 0.1] [--out data/NAME.h5]
    python -m llmpi.data info|verify FILE
    python -m llmpi.data decode FILE [--split all|train|val] [--out FILE]
"""
import os
import signal
import sys

from ..cli import ArgumentParser, ranks_on_this_node, run_main
from ..comm.world import agree, rank, world
from ..errors import UserError
from .corpus import BPE_TRAIN_MB, default_data_path, prepare
from .tokenfile import TokenFile
from .tokenizers import TOKENIZERS


def _cmd_info(args):
    with TokenFile(args.file, in_memory=False, check_range=False) as tf:  # info shows even a damaged file
        for key in sorted(tf.attrs):
            value = tf.attrs[key]
            print(f"{key}: {value!r}" if key == "vocab" else f"{key}: {value}")
        if tf.tokenizer.name == "bpe":
            print(f"tokenizer_json: {len(tf.tokenizer.json)} bytes (byte-level BPE, "
                  f"end of text {tf.tokenizer.eot_token} = {tf.tokenizer.eot})")
        print(f"dtype: {tf.dtype}  chunks: {tf.train.chunks}  size: {os.path.getsize(args.file)} bytes  "
              f"bytes/token (val): {tf.bytes_per_token:.4f}")


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
    pp = sub.add_parser("prepare", help="tokenize text files into an HDF5 token file (under mpiexec: in parallel)")
    pp.add_argument("--input", nargs="+", action="extend",
                    help="files or directories: text, .jsonl, either .gz/.zst-compressed (default: stdlib sources)")
    pp.add_argument("--tokenizer", choices=TOKENIZERS, default=None,
                    help="byte (default), char, or bpe (the default with --vocab-size or --tokenizer-file)")
    pp.add_argument("--vocab-size", type=int, default=0, help="bpe: train a byte-level BPE of this many tokens")
    pp.add_argument("--tokenizer-file", default=None, help="bpe: use this tokenizer.json (e.g. GPT-2's)")
    pp.add_argument("--bpe-train-mb", type=float, default=BPE_TRAIN_MB,
                    help=f"bpe: learn the merges from the first this many MB of the corpus (default {BPE_TRAIN_MB})")
    pp.add_argument("--text-key", default="text", help="the key of the text in each .jsonl record")
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
    """`python -m llmpi.data`: under mpiexec, `prepare` shares the work among the ranks (one file
    comes out, the same at any rank count); the other commands run on rank 0 alone instead of N
    ranks printing the same. Every rank parses (so --help and a bad argument end them all alike),
    and a UserError on any rank reaches every rank (agree)."""
    args = _parser().parse_args(argv)
    # SIGTERM (timeout, Slurm, kill) and Ctrl-C unwind as an exit, so prepare and decode remove their
    # temporary files on every rank; a KeyboardInterrupt would abort the whole job (run_main) while
    # rank 0, still inside the tokenizer library, has yet to clean up
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
    if args.cmd == "prepare" and "RAYON_NUM_THREADS" not in os.environ:
        # the BPE library's thread pool takes every core by default: share the node's cores among its ranks
        os.environ["RAYON_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // ranks_on_this_node()))
    agree(lambda: _run(args) if args.cmd == "prepare" or rank() == 0 else None)
    return 0


def _shortfall(tf) -> str:
    """Why a trained BPE has fewer tokens than asked: its training text ran out of pairs to merge."""
    asked = int(tf.attrs.get("vocab_asked", 0))
    if tf.vocab_size >= asked:
        return ""
    return (f"note: the BPE reached vocab_size {tf.vocab_size} of the {asked} asked: its training text "
            f"({int(tf.attrs['bpe_train_bytes']) / 1e6:.1f} MB) has no more pairs of tokens to merge "
            "(every word in it is a single token already); a bigger corpus learns more\n")


def _run(args):
    if args.cmd == "prepare":
        tokenizer = args.tokenizer or ("bpe" if args.tokenizer_file or args.vocab_size else "byte")
        out = prepare(args.input, tokenizer, args.val_fraction, args.out, progress=not args.quiet,
                      vocab_size=args.vocab_size, tokenizer_file=args.tokenizer_file, text_key=args.text_key,
                      bpe_train_mb=args.bpe_train_mb, comm=world())
        if rank() == 0:
            with TokenFile(out, in_memory=False, check_range=False) as tf:  # just written and hashed
                sys.stderr.write(_shortfall(tf))
                print(f"wrote {out}: {tf.n_train} train + {tf.n_val} val tokens, {tf.tokenizer.name} "
                      f"tokenizer, vocab_size {tf.vocab_size}, {tf.attrs['documents']} documents, "
                      f"{tf.bytes_per_token:.3f} bytes/token")
    elif args.cmd == "info":
        _cmd_info(args)
    elif args.cmd == "verify":
        with TokenFile(args.file, in_memory=False, check_range=False) as tf:  # verify() reads it all
            tf.verify()
            print(f"{args.file}: ok ({tf.n_train + tf.n_val} tokens, checksum {tf.attrs['checksum'][:16]}...)")
    else:
        _cmd_decode(args)


if __name__ == "__main__":
    sys.exit(run_main(command, prog="llmpi.data") or 0)
