"""`python -m llmpi.bench data [--json]`: how fast text becomes tokens, and what one batch costs.

Prepare throughput (input MB/s, best of a few runs) on the default stdlib corpus and on
tinyshakespeare (byte and char tokenizers, skipped when the file is absent); BPE: a
tokenizer learnt from the stdlib corpus, then prepare with it at 1 rank (in this process) and
at 4 ranks (an mpiexec job), against the library's own encode rate on the same documents
with the same threads (`bpe_ratio`), and the peak memory of a BPE prepare of a generated
corpus 5x and 21x the read size (bounded memory: the two peaks should match). Then the
host-side cost of one training batch (Sampler.starts + get_batch) in microseconds for the
laptop job (batch 8, block 64), the baby job (batch 12, block 64), and GPT-2's shape
(batch 8, block 1024) read window by window from the HDF5 dataset as for files too big to load.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from llmpi.bench._common import LAUNCHER_VARS, emit_json, machine, median_time
from llmpi.cli import ArgumentParser
from llmpi.data import Sampler, TokenFile, get_batch, prepare
from llmpi.data.bpe import train_bpe
from llmpi.data.inputs import READ_BYTES, default_corpus

SHAKESPEARE = "/work/shared/data/tinyshakespeare.txt"
BATCHES = {"laptop": (8, 64), "baby": (12, 64)}
BPE_VOCAB = 4096


def prepare_mb_s(inputs, tokenizer, out, repeats, **options):
    """Input megabytes per second of `prepare`, best of `repeats` (the first run warms the page cache)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        prepare(inputs, tokenizer, 0.1, out, progress=False, **options)
        best = min(best, time.perf_counter() - t0)
    with TokenFile(out, in_memory=False) as tf:
        n_bytes = sum(tf.source_bytes.values())
    return n_bytes / best / 1e6, n_bytes


def library_mb_s(tok, documents, repeats):
    """The tokenizers library's own rate: encode_batch_fast over the documents, in batches as big as prepare's."""
    batches, batch = [], []
    for doc in documents:
        batch.append(doc)
        if sum(map(len, batch)) >= READ_BYTES:
            batches.append(batch)
            batch = []
    batches.append(batch)
    n_bytes = sum(len(d.encode("utf-8")) for d in documents)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for b in batches:
            tok.library.encode_batch_fast(b, add_special_tokens=False)
        best = min(best, time.perf_counter() - t0)
    return n_bytes / best / 1e6


def _job_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_VARS)}
    env.update(extra)
    return env


def prepare_mb_s_ranks(n_ranks, tokenizer_file, out):
    """Input MB/s of a BPE prepare of the stdlib corpus as an mpiexec job (timed inside, without start-up)."""
    mpiexec = shutil.which("mpiexec") or os.path.join(os.path.dirname(sys.executable), "mpiexec")
    threads = str(max(1, (os.cpu_count() or 1) // n_ranks))  # as `python -m llmpi.data prepare` gives each rank
    cmd = [mpiexec, "-n", str(n_ranks), sys.executable, "-m", "llmpi.bench", "data", "--time-prepare",
           tokenizer_file, out]
    proc = subprocess.run(cmd, env=_job_env(RAYON_NUM_THREADS=threads), capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["MB_s"]


def time_prepare(tokenizer_file, out):
    """--time-prepare: run under mpiexec by prepare_mb_s_ranks."""
    from llmpi.comm.world import world
    comm = world()
    comm.Barrier()
    t0 = time.perf_counter()
    prepare(None, "bpe", 0.1, out, progress=False, tokenizer_file=tokenizer_file, comm=comm)
    comm.Barrier()
    seconds = time.perf_counter() - t0
    if comm.Get_rank() == 0:
        with TokenFile(out, in_memory=False) as tf:
            print(json.dumps({"MB_s": sum(tf.source_bytes.values()) / seconds / 1e6}))


def peak_rss_mb(corpus, tokenizer_file, out):
    """Peak resident MB of a fresh process that prepares `corpus` with the BPE `tokenizer_file`
    (VmHWM: ru_maxrss would include this process' own peak, carried over by Linux across exec)."""
    code = ("import sys; from llmpi.data import prepare; "
            "prepare([sys.argv[1]], 'bpe', 0.1, sys.argv[3], progress=False, tokenizer_file=sys.argv[2]); "
            "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])")
    proc = subprocess.run([sys.executable, "-c", code, corpus, tokenizer_file, out], env=_job_env(),
                          capture_output=True, text=True, timeout=1800, check=True)
    return int(proc.stdout.split()[-1]) / 1024


def generated_jsonl(path, n_bytes):
    """A jsonl corpus of n_bytes: records of random words of the stdlib corpus, one block repeated."""
    rng = np.random.default_rng(0)
    words = sorted({w for path, _ in default_corpus()[0][:50] for w in open(path, encoding="utf-8").read().split()})
    block = "".join(json.dumps({"text": " ".join(rng.choice(words, 300))}) + "\n" for _ in range(400))
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(max(1, n_bytes // len(block))):
            f.write(block)
    return path


def batch_us(tokens, batch, block, strategy, iters=2000):
    """Median microseconds to draw one batch's starts and gather its (x, y) windows."""
    sampler = Sampler(len(tokens), block, seed=0, strategy=strategy)
    step = [0]

    def one():
        step[0] += 1
        get_batch(tokens, sampler.starts(step[0], batch), block)

    return median_time(lambda: [one() for _ in range(iters)], repeats=5) / iters * 1e6


def bench_bpe(tmp, result, repeats):
    files = [path for path, _ in default_corpus()[0]]
    t0 = time.perf_counter()
    documents = [open(p, encoding="utf-8").read() for p in files]
    tok = train_bpe(iter(documents), BPE_VOCAB)
    result["bpe_train_s"] = round(time.perf_counter() - t0, 2)
    tokenizer_file = os.path.join(tmp, "stdlib_bpe.json")
    with open(tokenizer_file, "w", encoding="utf-8") as f:
        f.write(tok.json)
    out = os.path.join(tmp, "stdlib_bpe.h5")
    mb_s, n = prepare_mb_s(None, "bpe", out, repeats, tokenizer_file=tokenizer_file)
    library = library_mb_s(tok, documents, repeats)
    result.update(bpe_mb_per_s=round(mb_s, 2), bpe_library_mb_per_s=round(library, 2),
                  bpe_ratio=round(mb_s / library, 3), bpe_threads=os.environ.get("RAYON_NUM_THREADS", os.cpu_count()))
    print(f"BPE (vocab {BPE_VOCAB}) learnt from stdlib in {result['bpe_train_s']} s; prepare stdlib "
          f"({n / 1e6:.1f} MB): {mb_s:.2f} MB/s, the library's encode_batch_fast: {library:.2f} MB/s, "
          f"ratio {mb_s / library:.3f}")
    mb_s4 = prepare_mb_s_ranks(4, tokenizer_file, os.path.join(tmp, "stdlib_bpe4.h5"))
    result["bpe_mb_per_s_4ranks"] = round(mb_s4, 2)
    print(f"prepare stdlib (BPE) at 4 ranks: {mb_s4:.2f} MB/s")
    for times in (5, 21):
        corpus = generated_jsonl(os.path.join(tmp, f"gen{times}.jsonl"), times * READ_BYTES)
        peak = peak_rss_mb(corpus, tokenizer_file, os.path.join(tmp, f"gen{times}.h5"))
        result[f"bpe_peak_rss_mb_{times}x_read"] = round(peak, 1)
        print(f"peak RSS, BPE prepare of a {os.path.getsize(corpus) / 1e6:.0f} MB generated jsonl: {peak:.0f} MB")
        os.remove(corpus)
    return out


def main(argv=None):
    p = ArgumentParser(prog="llmpi.bench data", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print a JSON line last")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--time-prepare", nargs=2, metavar=("TOKENIZER_JSON", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.time_prepare:
        time_prepare(*args.time_prepare)
        return 0
    result = {"bench": "data", "machine": machine()}
    print(f"machine: {result['machine']}")
    with tempfile.TemporaryDirectory() as tmp:
        default = os.path.join(tmp, "stdlib_byte.h5")
        mb_s, n = prepare_mb_s(None, "byte", default, args.repeats)
        result["prepare_stdlib_byte_MB_s"] = round(mb_s, 1)
        print(f"prepare stdlib (byte, {n / 1e6:.1f} MB): {mb_s:8.1f} MB/s")
        if os.path.exists(SHAKESPEARE):
            for tok in ("byte", "char"):
                mb_s, n = prepare_mb_s([SHAKESPEARE], tok, os.path.join(tmp, f"sh_{tok}.h5"), args.repeats)
                result[f"prepare_shakespeare_{tok}_MB_s"] = round(mb_s, 1)
                print(f"prepare tinyshakespeare ({tok}, {n / 1e6:.1f} MB): {mb_s:8.1f} MB/s")
        else:
            print(f"tinyshakespeare: skipped ({SHAKESPEARE} not found)")
        bpe_file = bench_bpe(tmp, result, args.repeats)
        train = TokenFile(default).train
        for job, (batch, block) in BATCHES.items():
            for strategy in ("random", "strided"):
                us = batch_us(train, batch, block, strategy)
                result[f"batch_us_{job}_b{batch}_t{block}_{strategy}"] = round(us, 2)
                print(f"one batch, {job} job (B={batch}, T={block}, {strategy}): {us:7.2f} us")
        with TokenFile(bpe_file, in_memory=False) as lazy:
            us = batch_us(lazy.train, 8, 1024, "random", iters=200)
        result["batch_us_gpt2_b8_t1024_hdf5"] = round(us, 1)
        print(f"one batch, GPT-2 shape (B=8, T=1024) read from the HDF5 dataset: {us:7.1f} us")
    emit_json(result, args.json)
    return 0
