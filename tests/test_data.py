"""llmpi.data: prepare -> file layout -> TokenFile -> Sampler/get_batch, and every bad input.

Runs under plain pytest and under `mpiexec -n 4 python -m pytest --with-mpi`: each rank
then runs the plain tests in its own tmp_path; the mpi-marked test coordinates the ranks.
"""
import hashlib
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from llmpi import data
from llmpi.data import __main__ as data_cli
from llmpi.data import corpus
from llmpi.data.tokenizers import token_dtype
from llmpi.data import Sampler, TokenFile, ensure_prepared, get_batch, prepare
from llmpi.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "Hello, wörld! ünïcödé → 日本語 ✓ emoji 🚀\nline two\ttab\n" * 40


def write(path, content):
    mode = "wb" if isinstance(content, bytes) else "w"
    with open(path, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as f:
        f.write(content)
    return str(path)


def run_cli(*args, cwd=None):
    """The CLI in a clean subprocess: MPI launcher variables removed, so that under
    mpiexec the child starts as its own singleton instead of joining the job."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "PMIX_", "MPIR_", "HYDRA_", "OMPI_", "MPI_LOCALNRANKS"))}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "llmpi.data", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("tokenizer", ["byte", "char"])
def test_round_trip_non_ascii(tmp_path, tokenizer):
    a = write(tmp_path / "a.txt", TEXT)
    b = write(tmp_path / "b.txt", "second file ÆØÅ\n" * 30)
    out = prepare([a, b], tokenizer, 0.25, str(tmp_path / "t.h5"), progress=False)
    tf = TokenFile(out)
    original = TEXT + "second file ÆØÅ\n" * 30
    ids = np.concatenate([tf.train, tf.val])
    assert tf.tokenizer.decode(ids) == original
    assert tf.tokenizer.to_bytes(ids) == original.encode("utf-8")
    assert np.array_equal(tf.tokenizer.encode(original), ids)
    if tokenizer == "char":
        assert tf.vocab_size == len(set(original)) and tf.tokenizer.vocab == "".join(sorted(set(original)))


def test_byte_tokenizer_takes_any_bytes(tmp_path):
    raw = bytes(range(256)) * 3 + b"\xff\xfe invalid utf-8 \xc3"
    out = prepare([write(tmp_path / "raw.bin", raw)], "byte", 0.1, str(tmp_path / "r.h5"), progress=False)
    tf = TokenFile(out)
    assert tf.tokenizer.to_bytes(np.concatenate([tf.train, tf.val])) == raw


def test_file_layout_and_attributes(tmp_path):
    out = prepare([write(tmp_path / "a.txt", TEXT)], "char", 0.1, str(tmp_path / "t.h5"), progress=False)
    with h5py.File(out, "r") as f:
        a = dict(f.attrs)
        assert a["format_version"] == data.tokenfile.FORMAT_VERSION and a["tokenizer"] == "char"
        assert a["vocab_size"] == len(a["vocab"]) and f["train"].dtype == np.uint8
        n = len(TEXT)
        assert (a["n_val"], a["n_train"]) == (int(n * 0.1), n - int(n * 0.1))
        assert f["train"].shape == (a["n_train"],) and f["train"].chunks is not None
        sha = hashlib.sha256(f["train"][...].tobytes() + f["val"][...].tobytes()).hexdigest()
        assert a["checksum"] == sha and str(tmp_path / "a.txt") in a["source"]
    assert not any(".tmp" in p for p in os.listdir(tmp_path))
    assert token_dtype(256) == np.uint8 and token_dtype(257) == np.uint16
    assert token_dtype(70000) == np.uint32


def test_lazy_datasets_and_verify(tmp_path):
    out = prepare([write(tmp_path / "a.txt", TEXT)], "byte", 0.2, str(tmp_path / "t.h5"), progress=False)
    mem = TokenFile(out, block_size=16)
    with TokenFile(out, block_size=16, in_memory=False) as lazy:
        assert isinstance(lazy.train, h5py.Dataset)
        lazy.verify()
        starts = Sampler(lazy.n_train, 16, seed=1).starts(0, 8)
        for a, b in zip(get_batch(lazy.train, starts, 16), get_batch(mem.train, starts, 16)):
            assert a.dtype == np.int64 and a.shape == (8, 16) and np.array_equal(a, b)


def test_get_batch_shifted_windows():
    tokens = np.arange(100, dtype=np.uint16)
    x, y = get_batch(tokens, np.array([0, 50, 7]), 5)
    assert x.shape == (3, 5) and x.dtype == np.int64 and x.flags.c_contiguous
    assert np.array_equal(x[1], np.arange(50, 55)) and np.array_equal(y, x + 1)
    assert get_batch(tokens, np.zeros(0, np.int64), 5)[0].shape == (0, 5)


def test_random_sampler_deterministic_and_world_independent():
    one = Sampler(10_000, 32, seed=7, strategy="random")
    assert np.array_equal(one.starts(3, 12), Sampler(10_000, 32, seed=7).starts(3, 12))
    assert not np.array_equal(one.starts(3, 12), one.starts(4, 12))
    s = one.starts(5, 12)
    assert s.min() >= 0 and s.max() <= 10_000 - 33
    offsets, counts = [0, 2, 7], [2, 5, 5]  # an uneven allocation over 3 ranks
    parts = [Sampler(10_000, 32, seed=7, rank=r, world=3).starts(5, 12, o, c)
             for r, (o, c) in enumerate(zip(offsets, counts))]
    assert np.array_equal(np.concatenate(parts), s)


@pytest.mark.parametrize("strategy", ["contiguous", "strided", "hashed"])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_shards_disjoint_and_complete(strategy, world):
    n_tokens, T = 1001, 10  # 100 windows
    seen = []
    for r in range(world):
        s = Sampler(n_tokens, T, seed=3, rank=r, world=world, strategy=strategy)
        epoch = s.starts(0, 0, 0, len(s.shard))
        assert sorted(epoch) == sorted(s.shard * T) and s.state_dict()["epoch"] == 1
        seen.append(epoch)
    allw = np.concatenate(seen)
    assert len(allw) == len(set(allw.tolist())) == 100
    assert np.array_equal(np.sort(allw), np.arange(100) * T) and allw.max() + T + 1 <= n_tokens
    if strategy == "contiguous":
        assert all(np.all(np.diff(np.sort(p)) == T) for p in seen)
    if strategy == "strided":
        assert all(np.all(np.sort(p) // T % world == r) for r, p in enumerate(seen))


@pytest.mark.parametrize("strategy", ["contiguous", "strided", "hashed"])
def test_varying_count_no_repeats_within_epoch(strategy):
    s = Sampler(2001, 10, seed=1, rank=1, world=2, strategy=strategy)
    n = len(s.shard)
    got, step, rng = [], 0, np.random.default_rng(0)
    while sum(map(len, got)) < 3 * n:
        got.append(s.starts(step, 0, 0, int(rng.integers(0, 9))))
        step += 1
    flat = np.concatenate(got)
    for e in range(3):
        epoch = flat[e * n:(e + 1) * n]
        assert len(set(epoch.tolist())) == n and set(epoch.tolist()) == set((s.shard * 10).tolist())
    assert not np.array_equal(flat[:n], flat[n:2 * n])  # a fresh shuffle each epoch


def test_sampler_state_round_trip():
    a = Sampler(5001, 10, seed=2, rank=0, world=2, strategy="hashed")
    a.starts(0, 0, 0, 7)
    b = Sampler(5001, 10, seed=2, rank=0, world=2, strategy="hashed")
    state = a.state_dict()
    assert all(type(v) is int for v in state.values())
    b.load_state_dict(state)
    assert np.array_equal(a.starts(1, 0, 0, 300), b.starts(1, 0, 0, 300))
    with pytest.raises(UserError, match="world"):
        Sampler(5001, 10, seed=2, rank=0, world=3, strategy="hashed").load_state_dict(state)
    with pytest.raises(UserError, match="used sharding 'hashed'"):  # a position in another order
        Sampler(5001, 10, seed=2, rank=0, world=2, strategy="strided").load_state_dict(state)


def test_val_starts_same_set_at_any_world_size():
    one = Sampler(3000, 16, seed=4)
    ref = np.concatenate([one.val_starts(k, 6) for k in range(4)])
    assert ref.min() >= 0 and ref.max() <= 3000 - 17
    two = Sampler(3000, 16, seed=4, rank=0, world=2)
    split = np.concatenate([two.val_starts(k, 3, r) for k in range(4) for r in range(2)])
    assert np.array_equal(np.sort(split), np.sort(ref))


# ---------------------------------------------------------------- bad input

def test_cli_prepare_decode_and_errors(tmp_path, capsys):
    src = write(tmp_path / "in.txt", TEXT)
    r = run_cli("prepare", "--input", src, "--tokenizer", "char", "--out", "d/t.h5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "tokenize" in r.stderr and "wrote d/t.h5" in r.stdout  # plain progress lines off a terminal
    h5 = str(tmp_path / "d" / "t.h5")
    assert data_cli.main(["decode", h5, "--out", str(tmp_path / "back.txt")]) == 0  # in-process: subprocesses are slow
    assert open(tmp_path / "back.txt", encoding="utf-8").read() == TEXT
    data_cli.main(["info", h5])
    assert "tokenizer: char" in capsys.readouterr().out
    r = run_cli("prepare", "--input", "nope.txt", "--out", "d/x.h5", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("llmpi.data: error: input 'nope.txt' does not exist")
    assert "Traceback" not in r.stderr and not os.path.exists(tmp_path / "d" / "x.h5")
    r = run_cli("verify", write(tmp_path / "junk.h5", b"not hdf5"), cwd=tmp_path)
    assert r.returncode == 2 and "is not an HDF5 file" in r.stderr and len(r.stderr.splitlines()) == 1


def tamper(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)
    return path


@pytest.fixture
def good(tmp_path):
    return prepare([write(tmp_path / "a.txt", TEXT)], "char", 0.1, str(tmp_path / "g.h5"), progress=False)


@pytest.mark.parametrize("problem, match", [
    (lambda f: f.__delitem__("val"), "no 1-D dataset 'val'"),
    (lambda f: f.attrs.__setitem__("format_version", 99), "format_version 99"),
    (lambda f: f["train"].__setitem__(slice(0, 1), 3), "checksum mismatch"),
])
def test_damaged_files(good, problem, match):
    tamper(good, problem)
    with pytest.raises(UserError, match=match) as err:
        TokenFile(good)
    assert good in str(err.value) and "\n" not in str(err.value)


def test_token_id_out_of_range(good):
    def corrupt(f):
        f["train"][0] = 250
        tokens = np.concatenate([f["train"][...], f["val"][...]])
        f.attrs["checksum"] = hashlib.sha256(tokens.tobytes()).hexdigest()
    tamper(good, corrupt)
    with pytest.raises(UserError, match="token id 250 is out of range"):
        TokenFile(good)


def test_missing_empty_short_vocab_unseen(tmp_path, good):
    with pytest.raises(UserError, match="not found; create it with"):
        TokenFile(str(tmp_path / "missing.h5"))
    with pytest.raises(UserError, match="corpus is empty"):
        prepare([write(tmp_path / "empty.txt", "")], "byte", 0.1, str(tmp_path / "e.h5"), progress=False)
    assert not os.path.exists(tmp_path / "e.h5")
    short = prepare([write(tmp_path / "s.txt", "tiny corpus")], "byte", 0.0, str(tmp_path / "s.h5"), progress=False)
    with pytest.raises(UserError, match="fewer than block_size"):
        TokenFile(short, block_size=64)
    with pytest.raises(UserError, match="model config says 256"):
        TokenFile(good, vocab_size=256)
    assert TokenFile(good, vocab_size=0).vocab_size == len(set(TEXT))
    with pytest.raises(UserError, match=r"'Q' \(U\+0051\) is not in the"):
        TokenFile(good).tokenizer.encode("Quit")
    with pytest.raises(UserError, match="not valid UTF-8"):
        prepare([write(tmp_path / "bad.txt", b"ok \xff")], "char", 0.1, str(tmp_path / "b.h5"), progress=False)
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p or p == "b.h5"]


def test_no_partial_file_on_interrupt(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(corpus._SplitWriter, "flush", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare([write(tmp_path / "a.txt", TEXT)], "byte", 0.1, str(tmp_path / "k.h5"), progress=False)
    assert os.listdir(tmp_path) == ["a.txt"]


# ---------------------------------------------------------------- MPI

@pytest.mark.mpi(min_size=2)
def test_ensure_prepared_rank0_prepares(tmp_path):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    base = comm.bcast(str(tmp_path) if comm.Get_rank() == 0 else None, root=0)
    src = write(os.path.join(base, "in.txt"), TEXT) if comm.Get_rank() == 0 else None
    src = comm.bcast(src, root=0)
    path = os.path.join(base, "shared.h5")
    tf = ensure_prepared(path, comm, block_size=8, inputs=[src], progress=False)
    digests = comm.allgather(hashlib.sha256(tf.train.tobytes()).hexdigest())
    err = None
    try:
        ensure_prepared(os.path.join(base, "bad.h5"), comm, inputs=[os.path.join(base, "absent.txt")])
    except UserError as e:
        err = str(e)
    errors = comm.allgather(err)
    assert len(set(digests)) == 1 and tf.n_train + tf.n_val == len(TEXT.encode("utf-8"))
    assert all(e is not None and "absent.txt" in e for e in errors)
