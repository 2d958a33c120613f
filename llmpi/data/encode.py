"""Documents into token ids, batch by batch, for each tokenizer (what one rank of `prepare` does).

byte and char concatenate the documents as they are (their files are the same as before BPE
existed); bpe puts its end-of-text token before every document and encodes documents in pieces
cut where its pre-tokenizer cuts too (llmpi.data.bpe.cut_pieces), so the library's threads
share even one long document and memory stays bounded by the batch, not the document.
"""
import numpy as np

from ..errors import UserError
from .bpe import cut_pieces
from .inputs import READ_BYTES, texts
from .tokenizers import codepoints

BPE_BATCH_CHARS = 1 << 20  # text per encode call: the library keeps ~100 bytes per token until it returns


def _batched(items, limit):
    """Lists of (payload, first) with the input bytes they took, about `limit` in size each."""
    payloads, firsts, disk, size = [], [], 0, 0
    for payload, first, nbytes in items:
        payloads.append(payload)
        firsts.append(first)
        disk, size = disk + nbytes, size + len(payload)
        if size >= limit:
            yield payloads, firsts, disk
            payloads, firsts, disk, size = [], [], 0, 0
    yield payloads, firsts, disk


def check_no_nul(text, piece):
    if "\x00" in text:
        raise UserError(f"input {piece.path!r} contains NUL characters, which the char tokenizer cannot store; "
                        "use --tokenizer byte")


def _decoded_for_char(share_pieces):
    for text, piece in texts(share_pieces):
        check_no_nul(text, piece)
        yield text, piece.first, piece.disk


def bpe_pieces(decoded):
    """(text piece, starts a document, input bytes) of decoded documents, cut for exact encoding."""
    rest, first, disk = "", False, 0
    for text, piece in decoded:
        if piece.first:
            if rest:
                yield rest, first, disk
                disk = 0
            rest, first = "", True
        disk += piece.disk
        cut, rest = cut_pieces(rest + text, final=False)
        for text_piece in cut:
            yield text_piece, first, disk
            first, disk = False, 0
    if rest or disk:
        yield rest, first and bool(rest), disk


def encoded(share_pieces, tok):
    """(input bytes, ids, documents) per batch of one rank's share."""
    if tok.name == "byte":
        batches = _batched(((p.data, p.first, p.disk) for p in share_pieces), READ_BYTES)
        for payloads, firsts, disk in batches:
            yield disk, np.frombuffer(b"".join(payloads), np.uint8), sum(firsts)
    elif tok.name == "char":
        for payloads, firsts, disk in _batched(_decoded_for_char(share_pieces), READ_BYTES):
            yield disk, tok.encode_codepoints(codepoints("".join(payloads))), sum(firsts)
    else:
        eot = np.array([tok.eot], dtype=np.uint32)
        for payloads, firsts, disk in _batched(bpe_pieces(texts(share_pieces)), BPE_BATCH_CHARS):
            parts = []
            for ids, first in zip(tok.encode_batch(payloads), firsts):
                parts += [eot, ids] if first else [ids]
            yield disk, np.concatenate(parts) if parts else np.zeros(0, np.uint32), sum(firsts)
