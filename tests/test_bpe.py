"""BPE token files: train/encode/decode round trips, exact piecewise encoding, a user's
tokenizer.json, jsonl/gz/zst inputs, bytes per token, and every bad input as one line.

Plain tests: under `mpiexec -n 4 pytest --with-mpi` every rank runs them in its own tmp_path.
"""
import gzip
import json
import os

import h5py
import numpy as np
import pytest

from llmpi.data import TokenFile, prepare
from llmpi.data import __main__ as data_cli
from llmpi.data.bpe import EOT, PIECE_CHARS, cut_pieces
from llmpi.data.inputs import default_corpus
from llmpi.errors import UserError

SHAKESPEARE = "/work/shared/data/tinyshakespeare.txt"
NON_ASCII = ("Hello, wörld! ünïcödé → 日本語 ✓ emoji 🚀\nline two\ttab\r\n  spaces  and "
             f"{EOT} spelt in the text\n") * 40
SAMPLE_BYTES = 300_000   # of the default corpus: enough files for a real vocabulary, quick to train


def write(path, content):
    mode = "wb" if isinstance(content, bytes) else "w"
    with open(path, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as f:
        f.write(content)
    return str(path)


def tokens(tf):
    return np.concatenate([tf.train, tf.val])


@pytest.fixture(scope="module")
def stdlib_sample():
    files, total = [], 0
    for path, size in default_corpus()[0]:
        if total + size > SAMPLE_BYTES:
            break
        files.append(path)
        total += size
    return files


@pytest.fixture(scope="module")
def stdlib_bpe(tmp_path_factory, stdlib_sample):
    out = str(tmp_path_factory.mktemp("bpe") / "stdlib_bpe.h5")
    return prepare(stdlib_sample, "bpe", 0.1, out, progress=False, vocab_size=600)


def test_round_trip_on_the_default_corpus(stdlib_bpe, stdlib_sample):
    tf = TokenFile(stdlib_bpe)
    ids, tok = tokens(tf), tf.tokenizer
    documents = [open(p, "rb").read() for p in stdlib_sample]
    assert tf.vocab_size == 600 and tf.dtype == np.uint16 and tf.attrs["vocab_asked"] == 600
    assert tok.to_bytes(ids) == b"".join(documents)
    starts = np.flatnonzero(ids == tok.eot)  # one end-of-text token before every document
    assert len(starts) == len(documents) == tf.attrs["documents"] and starts[0] == 0
    for doc, ids_doc in zip(documents, np.split(ids, starts[1:])):
        assert np.array_equal(tok.encode(doc.decode("utf-8")), ids_doc[1:])  # as if encoded whole
    assert sum(tf.source_bytes.values()) == sum(map(len, documents))
    assert tf.bytes_per_token == tf.source_bytes["val"] / tf.n_val > 2


def test_round_trip_non_ascii(tmp_path):
    a = write(tmp_path / "a.txt", NON_ASCII)
    records = "".join(json.dumps({"text": t}) + "\n" for t in ("ÆØÅ æøå", "Ελληνικά 🚀"))
    b = write(tmp_path / "b.jsonl", records)
    tf = TokenFile(prepare([a, b], "bpe", 0.2, str(tmp_path / "t.h5"), progress=False, vocab_size=400))
    ids, tok = tokens(tf), tf.tokenizer
    assert tok.to_bytes(ids) == (NON_ASCII + "ÆØÅ æøå" + "Ελληνικά 🚀").encode("utf-8")
    assert tok.decode(ids).count(EOT) == 3 + NON_ASCII.count(EOT)  # separators shown, text kept
    assert np.count_nonzero(ids == tok.eot) == 3  # the spelt-out one is text, not a separator
    assert tok.to_bytes(tok.encode(NON_ASCII)) == NON_ASCII.encode("utf-8")


def test_pieces_encode_like_the_whole(stdlib_bpe):
    tok = TokenFile(stdlib_bpe).tokenizer
    text = open(SHAKESPEARE, encoding="utf-8").read() if os.path.exists(SHAKESPEARE) else NON_ASCII * 60
    pieces, rest = cut_pieces(text, final=True)
    assert rest == "" and "".join(pieces) == text and len(pieces) > 2
    assert max(map(len, pieces)) < 2 * PIECE_CHARS
    assert np.array_equal(np.concatenate(tok.encode_batch(pieces)), tok.encode(text))
    head, rest = cut_pieces(text[:3 * PIECE_CHARS], final=False)  # streaming: the tail waits for more text
    assert "".join(head) + rest == text[:3 * PIECE_CHARS] and rest


def gpt2_like_tokenizer(path, text):
    """A byte-level BPE saved as GPT-2's tokenizer.json is: <|endoftext|> added last."""
    hf = pytest.importorskip("tokenizers")
    tok = hf.Tokenizer(hf.models.BPE())
    tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = hf.decoders.ByteLevel()
    trainer = hf.trainers.BpeTrainer(vocab_size=350, show_progress=False,
                                     initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    tok.add_special_tokens([EOT])
    tok.save(str(path))
    return tok


def test_user_tokenizer_file(tmp_path):
    library = gpt2_like_tokenizer(tmp_path / "tokenizer.json", NON_ASCII)
    src = write(tmp_path / "in.txt", NON_ASCII)
    out = prepare([src], "bpe", 0.1, str(tmp_path / "u.h5"), progress=False,
                  tokenizer_file=str(tmp_path / "tokenizer.json"))
    tf = TokenFile(out)
    assert tf.tokenizer.eot == tf.vocab_size - 1 == library.token_to_id(EOT)
    assert tf.tokenizer.json == open(tmp_path / "tokenizer.json", encoding="utf-8").read()  # stored as given
    library.encode_special_tokens = True
    assert tokens(tf)[1:].tolist() == library.encode(NON_ASCII).ids
    os.remove(tmp_path / "tokenizer.json")  # the token file needs nothing else
    assert TokenFile(out).tokenizer.to_bytes(tokens(tf)) == NON_ASCII.encode("utf-8")


def test_info_decode_and_shortfall(tmp_path, capsys):
    src = write(tmp_path / "in.txt", NON_ASCII)
    out = prepare([src], "bpe", 0.1, str(tmp_path / "s.h5"), progress=False, vocab_size=100_000)
    tf = TokenFile(out)
    assert 257 < tf.vocab_size < 1000 and tf.dtype == np.uint16  # a small text runs out of pairs to merge
    assert f"reached vocab_size {tf.vocab_size} of the 100000 asked" in data_cli._shortfall(tf)
    data_cli.main(["info", out])
    assert "tokenizer: bpe" in capsys.readouterr().out
    assert data_cli.main(["decode", out, "--out", str(tmp_path / "back.txt")]) == 0
    assert open(tmp_path / "back.txt", "rb").read() == NON_ASCII.encode("utf-8")


def test_bytes_per_token(tmp_path):
    src = write(tmp_path / "in.txt", NON_ASCII)
    byte = TokenFile(prepare([src], "byte", 0.1, str(tmp_path / "b.h5"), progress=False))
    assert byte.bytes_per_token == 1.0
    char_path = prepare([src], "char", 0.5, str(tmp_path / "c.h5"), progress=False)
    half = NON_ASCII[len(NON_ASCII) - int(len(NON_ASCII) * 0.5):]
    assert TokenFile(char_path).bytes_per_token == len(half.encode("utf-8")) / len(half)
    with h5py.File(char_path, "r+") as f:  # a file written before the source bytes were stored
        del f.attrs["source_bytes_train"], f.attrs["source_bytes_val"]
    assert TokenFile(char_path).bytes_per_token == len(half.encode("utf-8")) / len(half)


def test_jsonl_gz_zst_inputs(tmp_path):
    records = ["first record", "second ünï", "", "third"]
    lines = "".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(records)) + "\n"
    plain = write(tmp_path / "a.jsonl", lines)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines)
    with gzip.open(tmp_path / "c.txt.gz", "wb") as f:
        f.write(b"a gzipped text file")
    inputs = [plain, str(tmp_path / "b.jsonl.gz"), str(tmp_path / "c.txt.gz")]
    expected = "".join(records) * 2 + "a gzipped text file"
    try:
        import zstandard
        with open(tmp_path / "d.jsonl.zst", "wb") as f:
            f.write(zstandard.ZstdCompressor().compress(lines.encode("utf-8")))
        inputs.append(str(tmp_path / "d.jsonl.zst"))
        expected += "".join(records)
    except ImportError:
        pass
    tf = TokenFile(prepare(inputs, "byte", 0.1, str(tmp_path / "j.h5"), progress=False, text_key="body"))
    assert tf.tokenizer.to_bytes(tokens(tf)) == expected.encode("utf-8")  # byte: documents as they are
    assert tf.attrs["documents"] == 3 * (len(inputs) - 1) + 1  # empty records are no documents
    bpe = TokenFile(prepare(inputs, "bpe", 0.1, str(tmp_path / "k.h5"), progress=False, text_key="body",
                            vocab_size=300))
    assert np.count_nonzero(tokens(bpe) == bpe.tokenizer.eot) == bpe.attrs["documents"]
    assert bpe.tokenizer.to_bytes(tokens(bpe)) == expected.encode("utf-8")


# ---------------------------------------------------------------- bad input

def bad_inputs(tmp_path):
    """(name, prepare keyword arguments, expected message) of every input a user can get wrong."""
    good = write(tmp_path / "good.txt", NON_ASCII)
    with gzip.open(tmp_path / "full.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": NON_ASCII}) + "\n")
    write(tmp_path / "cut.jsonl.gz", open(tmp_path / "full.jsonl.gz", "rb").read()[:60])
    write(tmp_path / "not.gz", b"plain bytes, not gzip")
    write(tmp_path / "bad.zst", b"plain bytes, not zstd")
    write(tmp_path / "half.json", json.dumps({"model": {"type": "WordLevel"}}))
    library = gpt2_like_tokenizer(tmp_path / "with_eot.json", NON_ASCII)
    hf = pytest.importorskip("tokenizers")
    hf.Tokenizer(hf.models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "wordlevel.json"))
    spec = json.loads(library.to_str())
    spec["added_tokens"] = []
    write(tmp_path / "no_eot.json", json.dumps(spec))
    bpe = {"tokenizer": "bpe", "vocab_size": 300}

    def jsonl(name, text):
        return {"inputs": [write(tmp_path / name, text)]}

    def brought(name):
        return {"inputs": [good], "tokenizer": "bpe", "tokenizer_file": str(tmp_path / name)}

    return [
        ("missing key", jsonl("k.jsonl", '{"txt": "a"}\n'), "has no 'text' key"),
        ("not json", jsonl("j.jsonl", '{"text": "a"}\n{oops\n'), "line at byte 14 is not valid JSON"),
        ("not a string", jsonl("n.jsonl", '{"text": 3}\n'), "'text' is a int"),
        ("no text", jsonl("e.jsonl", '{"text": ""}\n'), "the corpus has no text"),
        ("corrupt gz", {"inputs": [good, str(tmp_path / "cut.jsonl.gz")]}, "is not a valid gzip file"),
        ("corrupt gz, bpe", {"inputs": [str(tmp_path / "cut.jsonl.gz")], **bpe}, "is not a valid gzip file"),
        ("not gz", {"inputs": [str(tmp_path / "not.gz")]}, "is not a valid gzip file"),
        ("not zst", {"inputs": [str(tmp_path / "bad.zst")]}, "is not a valid zstd file|needs the zstandard package"),
        ("empty corpus", {"inputs": [write(tmp_path / "e.txt", "")]}, "the corpus is empty"),
        ("not utf-8", {"inputs": [write(tmp_path / "b.txt", b"ok \xff")], **bpe}, "is not valid UTF-8"),
        ("vocab too small", {"inputs": [good], **bpe, "vocab_size": 256}, "--vocab-size 256 is too small"),
        ("vocab too large", {"inputs": [good], **bpe, "vocab_size": 2 ** 32 + 1}, "more than a token file can hold"),
        ("no vocab", {"inputs": [good], "tokenizer": "bpe"}, "needs either --vocab-size"),
        ("tokenizer not json", brought("good.txt"), "is not a tokenizers JSON file"),
        ("tokenizer half written", brought("half.json"), "is not a tokenizers JSON file"),
        ("tokenizer not bpe", brought("wordlevel.json"), "is a WordLevel tokenizer without a ByteLevel decoder"),
        ("tokenizer without eot", brought("no_eot.json"), "has none of the special tokens"),
        ("tokenizer missing", brought("nope.json"), "cannot read --tokenizer-file"),
    ]


BAD_INPUTS = ["missing key", "not json", "not a string", "no text", "corrupt gz", "corrupt gz, bpe", "not gz",
              "not zst", "empty corpus", "not utf-8", "vocab too small", "vocab too large", "no vocab",
              "tokenizer not json", "tokenizer half written", "tokenizer not bpe", "tokenizer without eot",
              "tokenizer missing"]


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_every_bad_input_is_one_line_and_leaves_no_file(tmp_path, name):
    cases = {case: (kwargs, match) for case, kwargs, match in bad_inputs(tmp_path)}
    assert sorted(cases) == sorted(BAD_INPUTS)
    kwargs, match = cases[name]
    before = set(os.listdir(tmp_path))
    with pytest.raises(UserError, match=match) as err:
        prepare(out=str(tmp_path / "out.h5"), progress=False, **kwargs)
    assert "\n" not in str(err.value)
    assert set(os.listdir(tmp_path)) == before  # no token file, no scratch left
