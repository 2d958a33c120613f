"""What a token file's name promises, so a missing file gets the command that makes the right one
and a file whose contents differ from its name is refused before training on it.

The convention (the shipped jobs and the default file follow it): data/SOURCE_TOKENIZER.h5, e.g.
stdlib_byte.h5 (the default corpus), shakespeare_char.h5 (jobs/shakespeare_char.toml). The suffix
names the tokenizer; a SOURCE in KNOWN_SOURCES names its text too. A name outside the convention
promises nothing and is not checked (the job has no other place that says what it expects).
"""
import os

from ..errors import UserError
from .tokenizers import TOKENIZERS

# SOURCE -> (words, one of which the file's `source` attribute holds, the --input that makes it
# or None for the stdlib corpus, what to call it in a message)
KNOWN_SOURCES = {
    "stdlib": (("stdlib", "python"), None, "the Python stdlib sources"),
    "shakespeare": (("shakespeare",), "../shared/data/tinyshakespeare.txt",
                    "tinyshakespeare (nanoGPT's input.txt)"),
}


def expected(path):
    """(tokenizer or None, source or None) that the file name promises."""
    stem = os.path.splitext(os.path.basename(str(path)))[0]
    source, _, suffix = stem.rpartition("_")
    tokenizer = suffix if source and suffix in TOKENIZERS else None
    return tokenizer, (source if tokenizer and source in KNOWN_SOURCES else None)


def prepare_command(path):
    """The `prepare` command line that makes the file `path` names."""
    tokenizer, source = expected(path)
    if source is not None:
        found = KNOWN_SOURCES[source][1]
        inputs = "" if found is None else f" --input {found if os.path.exists(found) else os.path.basename(found)}"
    else:
        inputs = " --input YOUR_TEXT_FILES"
    if tokenizer is None:
        options = " [--tokenizer byte|char|bpe]"
    elif tokenizer == "bpe":
        options = " --tokenizer bpe --vocab-size N"
    else:
        options = f" --tokenizer {tokenizer}"
    return f"python -m llmpi.data prepare{inputs}{options} --out {path}"


def _mismatch(path, tokenizer, source_text):
    """Why a file of this tokenizer and source description cannot carry the name `path`, or None."""
    want_tokenizer, want_source = expected(path)
    if want_tokenizer and tokenizer != want_tokenizer:
        return f"its name promises the {want_tokenizer} tokenizer, it holds {tokenizer} tokens"
    if want_source:
        words, _, what = KNOWN_SOURCES[want_source]
        if not any(w in str(source_text).lower() for w in words):
            return f"its name promises {what}, it holds {source_text}"
    return None


def check_prepare(out, tokenizer, source_text):
    """Refuse, before any work, to write a file under a name that promises other contents."""
    problem = _mismatch(out, tokenizer, source_text)
    if problem:
        raise UserError(f"--out {out}: {problem}; to make that file run `{prepare_command(out)}`, "
                        "or choose an --out name that says what it holds (SOURCE_TOKENIZER.h5)")


def check_file(tf):
    """Refuse an opened TokenFile whose tokenizer or source differs from what its name promises
    (e.g. the stdlib byte corpus written under shakespeare_char.h5 by an older llmpi's hint)."""
    problem = _mismatch(tf.path, tf.tokenizer.name, tf.attrs.get("source", "an unknown source"))
    if problem:
        raise UserError(f"data file {tf.path!r}: {problem}; delete it and run `{prepare_command(tf.path)}`, "
                        "or point data.path at the file you meant")
