"""`python -m llmpi.bench data [--json]`: how fast text becomes tokens, and what one batch costs.

Prepare throughput (input MB/s, best of a few runs) on the default stdlib corpus and on
tinyshakespeare (byte and char tokenizers, skipped when the file is absent); then the
host-side cost of one training batch (Sampler.starts + get_batch) in microseconds for
the laptop job (batch 8, block 64) and the baby job (batch 12, block 64).
"""
import os
import tempfile
import time

import numpy as np

from llmpi.bench._common import emit_json, machine, median_time
from llmpi.cli import ArgumentParser
from llmpi.data import Sampler, TokenFile, get_batch, prepare

SHAKESPEARE = "/work/shared/data/tinyshakespeare.txt"
BATCHES = {"laptop": (8, 64), "baby": (12, 64)}


def prepare_mb_s(inputs, tokenizer, out, repeats):
    """Input megabytes per second of `prepare`, best of `repeats` (the first run warms the page cache)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        prepare(inputs, tokenizer, 0.1, out, progress=False)
        best = min(best, time.perf_counter() - t0)
    with TokenFile(out, in_memory=False) as tf:
        n_bytes = len(tf.tokenizer.to_bytes(np.concatenate([tf.train[...], tf.val[...]])))
    return n_bytes / best / 1e6, n_bytes


def batch_us(tokens, batch, block, strategy, iters=2000):
    """Median microseconds to draw one batch's starts and gather its (x, y) windows."""
    sampler = Sampler(len(tokens), block, seed=0, strategy=strategy)
    step = [0]

    def one():
        step[0] += 1
        get_batch(tokens, sampler.starts(step[0], batch), block)

    return median_time(lambda: [one() for _ in range(iters)], repeats=5) / iters * 1e6


def main(argv=None):
    p = ArgumentParser(prog="llmpi.bench data", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print a JSON line last")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
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
        train = TokenFile(default).train
        for job, (batch, block) in BATCHES.items():
            for strategy in ("random", "strided"):
                us = batch_us(train, batch, block, strategy)
                result[f"batch_us_{job}_b{batch}_t{block}_{strategy}"] = round(us, 2)
                print(f"one batch, {job} job (B={batch}, T={block}, {strategy}): {us:7.2f} us")
    emit_json(result, args.json)
    return 0
