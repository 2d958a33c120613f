"""`prepare` on many ranks: the same file at every rank count, an error or a signal on a
multi-rank job ends it cleanly with nothing left behind, and memory bounded by the read size.

The job-launching tests run `mpiexec -n K python -m llmpi.data prepare` as a user would, in
the plain pytest pass (they skip under mpiexec); the mpi-marked test prepares in-process on
the pytest ranks themselves.
"""
import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cli import clean_env, mpiexec, run, single_process_only
from llmpi.data import TokenFile, prepare
from llmpi.data.inputs import READ_BYTES

PARAGRAPH = "The quick brown fox — ünïcödé 日本語 — jumps over the lazy dog {i}.\n"


def corpus(base):
    """Documents of every kind: a plain .jsonl (ranks split it), a .jsonl.gz, text files in a directory."""
    os.makedirs(os.path.join(base, "dir"), exist_ok=True)
    with open(os.path.join(base, "a.jsonl"), "w", encoding="utf-8") as f:
        for i in range(3000):
            f.write(json.dumps({"text": PARAGRAPH.format(i=i) * (1 + i % 5)}) + "\n")
    with gzip.open(os.path.join(base, "b.jsonl.gz"), "wt", encoding="utf-8") as f:
        for i in range(500):
            f.write(json.dumps({"text": PARAGRAPH.format(i=-i)}) + "\n")
    for i in range(7):
        with open(os.path.join(base, "dir", f"{i}.txt"), "w", encoding="utf-8") as f:
            f.write(PARAGRAPH.format(i=i * 100) * (50 * i + 1))
    return [os.path.join(base, n) for n in ("a.jsonl", "b.jsonl.gz", "dir")]


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@single_process_only
@pytest.mark.parametrize("tokenizer, ranks", [(["--vocab-size", "400"], (1, 2, 4)),
                                               (["--tokenizer", "char"], (1, 3)),
                                               (["--tokenizer", "byte"], (1, 3))])
def test_same_file_at_every_rank_count(tmp_path, tokenizer, ranks):
    inputs = corpus(str(tmp_path))
    digests = []
    for n in ranks:
        out = str(tmp_path / f"out{n}.h5")
        proc = run(["-m", "llmpi.data", "prepare", "--input", *inputs, *tokenizer, "--out", out], np=n)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.count("wrote") == 1 and "3507 documents" in proc.stdout  # rank 0 alone prints
        digests.append(sha256(out))  # the whole HDF5 file, not only its tokens
    assert len(set(digests)) == 1
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


@single_process_only
def test_error_on_one_rank_ends_every_rank(tmp_path):
    tokenizer = tmp_path / "tokenizer.json"
    small = prepare([str(corpus(str(tmp_path))[2])], "bpe", 0.1, str(tmp_path / "small.h5"), progress=False,
                    vocab_size=300)
    tokenizer.write_text(TokenFile(small).tokenizer.json, encoding="utf-8")
    big = str(tmp_path / "big.txt")
    with open(big, "w") as f:
        f.write(PARAGRAPH.format(i=0) * 200_000)  # rank 0's share: seconds of BPE work
    bad = str(tmp_path / "bad.jsonl")
    with open(bad, "w") as f:
        f.write('{"text": "fine"}\n' * 1000 + '{"body": "no text key"}\n')  # rank 1's share
    before = set(os.listdir(tmp_path))
    proc = run(["-m", "llmpi.data", "prepare", "--input", big, bad, "--tokenizer-file", str(tokenizer),
                "--out", str(tmp_path / "o.h5")], np=2)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "bad.jsonl': the line at byte 17000 has no 'text' key" in errors[0]
    assert "Traceback" not in proc.stderr and set(os.listdir(tmp_path)) == before
    last_bar = [line for line in proc.stderr.splitlines() if line.startswith("tokenize:")][-1]
    assert float(last_bar.split()[1].rstrip("%")) < 100  # rank 0 stopped before the end of its share


@single_process_only
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_leaves_no_file(tmp_path, sig):
    src = str(tmp_path / "in.txt")
    with open(src, "w") as f:
        f.write(PARAGRAPH.format(i=1) * 400_000)
    out = str(tmp_path / "o.h5")
    cmd = [mpiexec(), "-n", "2", sys.executable, "-m", "llmpi.data", "prepare", "--input", src,
           "--tokenizer", "char", "--out", out, "--quiet"]
    proc = subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not [p for p in os.listdir(tmp_path) if ".tmp" in p] and time.time() < deadline:
        time.sleep(0.05)  # the scratch directory exists: the ranks are at work
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and os.listdir(tmp_path) == ["in.txt"], (proc.returncode, os.listdir(tmp_path), err)


@single_process_only
def test_memory_bounded_by_the_read_size(tmp_path):
    """Peak RSS of prepare in a fresh process: a corpus 21x the read size peaks like one of 2x.
    (VmHWM, not ru_maxrss, which Linux carries over from the forking parent across exec.)"""
    block = (json.dumps({"text": PARAGRAPH.format(i=7) * 40}) + "\n") * 100
    code = ("import sys; from llmpi.data import prepare; "
            "prepare([sys.argv[1]], 'byte', 0.1, sys.argv[2], progress=False); "
            "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])")
    peaks = []
    for times in (2, 21):
        src = str(tmp_path / f"c{times}.jsonl")
        with open(src, "w", encoding="utf-8") as f:
            for _ in range(times * READ_BYTES // len(block)):
                f.write(block)
        proc = subprocess.run([sys.executable, "-c", code, src, str(tmp_path / f"c{times}.h5")],
                              env=clean_env(), capture_output=True, text=True, timeout=120, check=True)
        peaks.append(int(proc.stdout.split()[-1]) / 1024)  # MiB
        os.remove(src)
    assert peaks[1] - peaks[0] < 16, peaks  # the bigger corpus is 76 MiB more: none of it is held


@pytest.mark.mpi(min_size=2)
def test_prepare_on_the_pytest_ranks(tmp_path):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    base = comm.bcast(str(tmp_path) if comm.Get_rank() == 0 else None, root=0)
    inputs = corpus(base) if comm.Get_rank() == 0 else None
    inputs = comm.bcast(inputs, root=0)
    together = prepare(inputs, "bpe", 0.1, os.path.join(base, "all.h5"), progress=False, vocab_size=300, comm=comm)
    alone = None
    if comm.Get_rank() == 0:
        alone = prepare(inputs, "bpe", 0.1, os.path.join(base, "one.h5"), progress=False, vocab_size=300)
    alone = comm.bcast(alone, root=0)
    same = np.array_equal(np.concatenate([TokenFile(together).train, TokenFile(together).val]),
                          np.concatenate([TokenFile(alone).train, TokenFile(alone).val]))
    assert all(comm.allgather(same))
