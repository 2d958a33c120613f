"""Reliability of the data files (issue 21, failures 8-11): temporaries of killed prepares, a full
disk during prepare, the fix advice for a missing file and a file whose contents differ from its
name, and the id-range check of a token file too big to load."""
import hashlib
import json
import os
import socket
import subprocess
import sys
import time

import h5py
import pytest
from mpi4py import MPI

from cli import clean_env, single_process_only
from llmpi.data import TokenFile, ensure_prepared, prepare, tokenfile, writers
from llmpi.data.names import prepare_command
from llmpi.errors import UserError

TEXT = "To be, or not to be, that is the question:\n" * 200


def _text(path, content=TEXT):
    with open(path, "w", encoding="utf-8") as f:
        f.write(content)
    return str(path)


# names of scratch directories with pids above any pid_max (2**22): no such process runs here


def _dead_pid():
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


def _scratch(folder, out, pid, owner):
    path = os.path.join(str(folder), f"{out}.tmp{pid}")
    os.mkdir(path)
    with open(os.path.join(path, "part00000"), "wb") as f:
        f.write(b"x" * 1000)
    if owner is not None:
        with open(os.path.join(path, writers.OWNER), "w") as f:
            json.dump(owner, f)
    return path


def test_temporaries_of_dead_prepares_go_and_those_of_live_ones_stay(tmp_path):
    dead = _dead_pid()
    here = socket.gethostname()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = writers.me() | {"pid": sleeper.pid, "start": writers.process_start(sleeper.pid)[1]}
        gone = _scratch(tmp_path, "t.h5", dead, {"host": here, "pid": dead, "start": None})
        running = _scratch(tmp_path, "t.h5", sleeper.pid, live)
        reused = _scratch(tmp_path, "t.h5", 9_000_001, live | {"start": "1"})  # pid not this process
        elsewhere = _scratch(tmp_path, "t.h5", 9_000_002, {"host": "another-node", "pid": dead, "start": None})
        old = _scratch(tmp_path, "t.h5", 9_000_003, None)  # an older llmpi's, untouched for an hour
        old_file = tmp_path / "t.h5.tmp9000004"
        old_file.write_bytes(b"y")
        for path in (old, old_file, os.path.join(old, "part00000")):
            os.utime(path, (time.time() - 3600,) * 2)
        fresh = _scratch(tmp_path, "t.h5", 9_000_005, None)  # no owner yet, just created: may be starting
        other = _scratch(tmp_path, "u.h5", dead, {"host": here, "pid": dead, "start": None})  # another output
        prepare([_text(tmp_path / "a.txt")], "byte", 0.1, str(tmp_path / "t.h5"), progress=False)
        left = set(os.listdir(tmp_path))
    finally:
        sleeper.kill()
        sleeper.wait()
    for path in (gone, reused, old, old_file):
        assert os.path.basename(path) not in left
    for path in (running, elsewhere, fresh, other):
        assert os.path.basename(path) in left
    # and at the start of training (ensure_prepared), whether or not the file needs preparing
    again = _scratch(tmp_path, "t.h5", dead, {"host": here, "pid": dead, "start": None})
    ensure_prepared(str(tmp_path / "t.h5"), progress=False, comm=MPI.COMM_SELF).close()
    assert not os.path.exists(again)


def test_a_scratch_directory_names_its_writer(tmp_path, monkeypatch):
    from llmpi.data import corpus
    seen = {}

    def spy(*args, **kwargs):
        scratch = next(os.path.join(tmp_path, n) for n in os.listdir(tmp_path) if ".tmp" in n)
        with open(os.path.join(scratch, writers.OWNER)) as f:
            seen.update(json.load(f))
        return real(*args, **kwargs)
    real = corpus._write
    monkeypatch.setattr(corpus, "_write", spy)
    prepare([_text(tmp_path / "a.txt")], "byte", 0.1, str(tmp_path / "t.h5"), progress=False)
    assert seen["pid"] == os.getpid() and seen["host"] == socket.gethostname() and not writers.gone(seen)


DISK_FULL = """
import resource, signal, sys
from mpi4py import MPI  # before the limit: MPI's shared-memory segments are files too
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so that a write past the limit fails with EFBIG
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv = ["llmpi.data", *sys.argv[2:]]
from llmpi.cli import run_main
from llmpi.data.__main__ import command
sys.exit(run_main(command, prog="llmpi.data") or 0)
"""


@single_process_only
@pytest.mark.parametrize("limit", [250_000, 200_000])  # the token file fails; the scratch file fails
def test_a_full_disk_during_prepare_is_one_line_and_leaves_nothing(tmp_path, limit):
    """A file-size limit stands in for a full disk (no root needed): 240 kB of text makes a 240 kB
    scratch file and a slightly bigger token file."""
    src = _text(tmp_path / "in.txt", "hello world\n" * 20000)
    proc = subprocess.run([sys.executable, "-c", DISK_FULL, str(limit), "prepare", "--input", src, "--out",
                           str(tmp_path / "o.h5"), "--quiet"], cwd=str(tmp_path), env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "free disk space" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and os.listdir(tmp_path) == ["in.txt"]


def test_a_missing_file_gets_the_command_that_makes_it(tmp_path):
    with pytest.raises(UserError) as err:
        TokenFile(str(tmp_path / "shakespeare_char.h5"))
    assert "--tokenizer char" in str(err.value) and "tinyshakespeare.txt" in str(err.value)
    assert prepare_command("data/stdlib_byte.h5") == "python -m llmpi.data prepare --tokenizer byte --out data/stdlib_byte.h5"
    assert "--input YOUR_TEXT_FILES" in prepare_command("mine.h5")
    assert "--tokenizer bpe --vocab-size N" in prepare_command("wiki_bpe.h5")


def test_a_file_whose_contents_differ_from_its_name_is_refused(tmp_path):
    with pytest.raises(UserError, match="its name promises tinyshakespeare"):  # the old advice: stdlib bytes
        prepare(None, "char", 0.1, str(tmp_path / "shakespeare_char.h5"), progress=False)
    with pytest.raises(UserError, match="promises the char tokenizer"):
        prepare([_text(tmp_path / "shakespeare.txt")], "byte", 0.1, str(tmp_path / "shakespeare_char.h5"),
                progress=False)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".h5") or ".tmp" in n]
    made = prepare([_text(tmp_path / "tinyshakespeare.txt")], "byte", 0.1, str(tmp_path / "x.h5"), progress=False)
    os.rename(made, tmp_path / "shakespeare_char.h5")  # e.g. written under that name by an older llmpi
    with pytest.raises(UserError, match="promises the char tokenizer, it holds byte tokens"):
        ensure_prepared(str(tmp_path / "shakespeare_char.h5"), progress=False, comm=MPI.COMM_SELF)
    os.rename(tmp_path / "shakespeare_char.h5", tmp_path / "shakespeare_byte.h5")
    ensure_prepared(str(tmp_path / "shakespeare_byte.h5"), progress=False, comm=MPI.COMM_SELF).close()  # what it holds: fine


def _with_big_id(path):
    with h5py.File(path, "r+") as f:
        f["val"][3] = 255
        f.attrs["checksum"] = hashlib.sha256(f["train"][...].tobytes() + f["val"][...].tobytes()).hexdigest()
    return path


def test_a_file_too_big_to_load_is_range_checked_when_opened(tmp_path, monkeypatch):
    path = prepare([_text(tmp_path / "a.txt")], "char", 0.1, str(tmp_path / "c.h5"), progress=False)
    monkeypatch.setattr(tokenfile, "IN_MEMORY_BYTES", 64)  # the file is "big": left on disk
    monkeypatch.setattr(tokenfile, "RANGE_CHUNK", 1000, raising=False)  # and read in several pieces
    tf = TokenFile(path)
    assert isinstance(tf.train, h5py.Dataset)
    tf.close()
    _with_big_id(path)
    with pytest.raises(UserError, match="token id 255 is out of range for vocab_size"):
        TokenFile(path)
    with pytest.raises(UserError, match="token id 255 is out of range"):
        ensure_prepared(path, progress=False, comm=MPI.COMM_SELF)
    TokenFile(path, check_range=False).close()  # `info` still shows it
