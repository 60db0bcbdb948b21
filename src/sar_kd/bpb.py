"""Bits per byte: a model's loss on a scale that does not depend on its tokenizer.

Perplexity is per token, and two tokenizers cut the same text into different numbers of tokens, so a
teacher and a student with different vocabularies cannot be compared by perplexity. Bits per byte
divides the summed NLL by the UTF-8 bytes the predicted tokens cover:

    bpb = Σ_t −ln p(x_t | x_<t)  /  (ln 2 · Σ_t bytes(x_t))

summed over every evaluated (label) position t. ``bytes(x)`` comes from a per-vocabulary table
(:func:`token_byte_lengths`): for byte-level BPE (GPT-2, Llama-3, Qwen, SmolLM) each symbol of a token
stands for one byte; for tiktoken-style vocabularies the piece is the bytes; for SentencePiece-style
vocabularies ``▁`` is a space and ``<0xNN>`` one byte. Special tokens (an end-of-document token between
packed documents, or a special token's literal text inside a document) cover no text: they count 0 bytes
while their NLL counts, the usual convention (the same as counting the document's bytes only).

For byte-level vocabularies the table's sum over a text's tokens is the text's UTF-8 length exactly.
SentencePiece-style tokenizers that prepend a space to each call (Llama-2, Mistral, Mixtral) count that
one space per tokenised document although it is not in the text: bits per byte comes out low by about
1 / (bytes per document), 0.1-0.5% on paragraph-sized documents.
"""

from __future__ import annotations

import math
import re

import torch

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in for each byte (``bytes_to_unicode``), inverted: symbol -> byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            symbols.append(256 + extra)
            extra += 1
    return {chr(s): b for b, s in zip(keep, symbols)}


def _is_byte_level(tokenizer, pieces: list) -> bool:
    """A ``ByteLevel`` decoder or pre-tokenizer in ``tokenizer.json``; for a tokenizer without one (remote
    code), a vocabulary written in GPT-2's byte alphabet with ``Ġ``-prefixed (space) tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        import json

        def has_byte_level(node) -> bool:
            if isinstance(node, dict):
                return node.get("type") == "ByteLevel" or any(has_byte_level(v) for v in node.values())
            return isinstance(node, list) and any(has_byte_level(v) for v in node)

        spec = json.loads(backend.to_str())
        return has_byte_level(spec.get("decoder")) or has_byte_level(spec.get("pre_tokenizer"))
    alphabet = _byte_level_alphabet()
    text = [p for p in pieces if isinstance(p, str)]
    inside = sum(all(c in alphabet for c in p) for p in text)
    return bool(text) and inside >= 0.95 * len(text) and any(p.startswith("Ġ") for p in text)


def token_byte_lengths(tokenizer, size: int | None = None) -> torch.Tensor:
    """UTF-8 bytes each token id covers: an int64 tensor of length ``max(size, len(tokenizer))``.

    Ids beyond the tokenizer (padded head rows) and special tokens count 0. The sum over a text's
    tokens equals the text's byte length (tested on the real Qwen3 and SmolLM tokenizers)."""
    n = max(size or 0, len(tokenizer))
    table = torch.zeros(n, dtype=torch.long)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tok_id, piece in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(piece, "special", False):
            special.add(tok_id)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    alphabet = _byte_level_alphabet() if _is_byte_level(tokenizer, pieces) else None
    for i, piece in enumerate(pieces):
        if piece is None or i in special:
            continue
        # tiktoken-style pieces are the bytes; a byte-level piece has one symbol per byte
        if isinstance(piece, bytes) or (alphabet is not None and all(c in alphabet for c in piece)):
            table[i] = len(piece)
        elif _BYTE_TOKEN.fullmatch(piece):
            table[i] = 1
        else:
            table[i] = len(piece.replace("▁", " ").encode("utf-8"))
    return table


def label_bytes(labels: torch.Tensor, table: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Bytes covered by the evaluated positions of ``labels`` (any shape; ``ignore_index`` skipped)."""
    keep = labels != ignore_index
    return table.to(labels.device)[labels[keep]].sum()


def bits_per_byte(nll_nats: float, n_bytes: float) -> float:
    """Summed natural-log NLL over the bytes it covers, in bits: ``nll / (ln 2 · bytes)``."""
    return nll_nats / (math.log(2) * n_bytes) if n_bytes > 0 else float("nan")
