"""A map between two vocabularies, built from the tokenizers alone, for cross-tokenizer logit KD.

Tokens are compared as **bytes**: byte-level BPE strings (GPT-2 ``Ġ`` alphabet) are decoded through
the inverse of the byte-to-unicode table, SentencePiece strings turn ``▁`` into a space and
``<0xNN>`` into the byte 0xNN. The *shared set* holds the byte strings present in both
vocabularies; each of them is a bucket. Special tokens are not bytes: a special token of one side
shares a bucket with the special token of the same string on the other side, and the two EOS tokens
share one bucket (merging buckets where that is needed). Every other token goes to the bucket of
its longest byte prefix in the shared set, and what is left (no shared prefix, unmatched specials)
to one OTHER bucket. Summing a model's next-token distribution over its tokens' buckets
(:func:`bucket_probs`) gives a distribution over the same buckets for both models, with no mass lost.

Two identical tokenizers give the identity map (bucket id = token id), so a loss on bucketed
distributions reduces to the same-tokenizer one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

MAP_FORMAT = 3  # bump when the construction changes: it is part of the cache key


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (printable Latin-1 bytes map to
    themselves; the other 68 bytes to U+0100 onwards, in byte order)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


def _backend_json(tok, part: str) -> str:
    """The JSON description of one component ("decoder", "pre_tokenizer", ...) of a fast tokenizer, or ""."""
    comp = getattr(getattr(tok, "backend_tokenizer", None), part, None)
    if comp is None:
        return ""
    try:
        state = comp.__getstate__()
        return state.decode() if isinstance(state, bytes) else json.dumps(state)
    except Exception:  # components without a serialisable state say nothing about the style
        return ""


def tokenizer_style(tok) -> str:
    """How the tokenizer's token strings encode bytes: "byte_level", "sentencepiece" or "text".

    Read from the backend's decoder and pre-tokenizer (a ``ByteLevel`` component; a ``Metaspace``,
    ``ByteFallback`` or ``▁`` replacement), else guessed from the vocabulary (``▁``/``<0x..>`` tokens
    versus ``Ġ``/``Ċ`` tokens).
    """
    desc = _backend_json(tok, "decoder") + _backend_json(tok, "pre_tokenizer")
    if '"ByteLevel"' in desc:
        return "byte_level"
    if any(k in desc for k in ('"Metaspace"', '"ByteFallback"', "▁")):
        return "sentencepiece"
    vocab = tok.get_vocab()
    n_sp = sum(1 for t in vocab if t.startswith("▁")) + 100 * int("<0x41>" in vocab)
    n_bl = sum(1 for t in vocab if t.startswith(("Ġ", "Ċ")))
    if n_sp > n_bl:
        return "sentencepiece"
    return "byte_level" if n_bl > 0 else "text"


def _special_ids(tok) -> set[int]:
    ids = {int(i) for i in tok.all_special_ids if i is not None}
    ids |= {int(i) for i, a in tok.added_tokens_decoder.items() if a.special}
    return ids


def _decode_piece(piece: str, style: str) -> bytes | None:
    if style == "byte_level":
        try:
            return bytes(_UNICODE_TO_BYTE[c] for c in piece)
        except KeyError:  # a string outside the byte alphabet is plain text
            return piece.encode("utf-8")
    if style == "sentencepiece":
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        return piece.replace("▁", " ").encode("utf-8")
    return piece.encode("utf-8")


def token_bytes(tokenizer) -> list[bytes | None]:
    """The byte string of every id ``0 .. len(tokenizer) - 1``; None for special tokens and holes.

    Model-vocabulary tokens are decoded by the tokenizer's style (:func:`tokenizer_style`); added
    tokens that are not special are plain text (their UTF-8 bytes); special tokens (``all_special_ids``
    and added tokens marked special) are None.
    """
    style = tokenizer_style(tokenizer)
    n = len(tokenizer)
    out: list[bytes | None] = [None] * n
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.get_vocab(with_added_tokens=False) if backend is not None else tokenizer.get_vocab()
    for piece, i in vocab.items():
        if i < n:
            out[i] = _decode_piece(piece, style)
    for i, added in tokenizer.added_tokens_decoder.items():
        if i < n:
            out[i] = added.content.encode("utf-8")
    for i in _special_ids(tokenizer):
        if 0 <= i < n:
            out[i] = None
    return [b if b else None for b in out]


def _special_strings(tok) -> dict[int, str]:
    """id -> string of each special token."""
    n = len(tok)
    names = {}
    for i in _special_ids(tok):
        if 0 <= i < n:
            added = tok.added_tokens_decoder.get(i)
            names[i] = added.content if added is not None else tok.convert_ids_to_tokens(i)
    return names


@dataclass
class VocabMap:
    """Token -> bucket maps of a teacher and a student vocabulary (see the module docstring).

    ``teacher_to_bucket`` (len(teacher_tok),) and ``student_to_bucket`` (len(student_tok),) int64
    in ``[0, num_buckets)``; ``teacher_exact`` / ``student_exact`` bool: the token *is* its bucket
    (its bytes are a shared byte string, or it is a matched special / EOS token), rather than being
    assigned to it by a prefix or to OTHER. ``teacher_nbytes`` / ``student_nbytes`` int32: each
    token's length in bytes (0 for special tokens), used to cut alignment chunks at byte boundaries.
    ``other_bucket`` is the OTHER bucket's id, -1 if none.
    """

    teacher_to_bucket: torch.Tensor
    student_to_bucket: torch.Tensor
    num_buckets: int
    teacher_exact: torch.Tensor
    student_exact: torch.Tensor
    teacher_nbytes: torch.Tensor
    student_nbytes: torch.Tensor
    other_bucket: int = -1

    def state_dict(self) -> dict:
        return {
            "format": MAP_FORMAT,
            "teacher_to_bucket": self.teacher_to_bucket,
            "student_to_bucket": self.student_to_bucket,
            "num_buckets": self.num_buckets,
            "teacher_exact": self.teacher_exact,
            "student_exact": self.student_exact,
            "teacher_nbytes": self.teacher_nbytes,
            "student_nbytes": self.student_nbytes,
            "other_bucket": self.other_bucket,
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> VocabMap:
        return cls(**{k: v for k, v in state.items() if k != "format"})

    def to(self, device: torch.device | str) -> VocabMap:
        return VocabMap(
            self.teacher_to_bucket.to(device),
            self.student_to_bucket.to(device),
            self.num_buckets,
            self.teacher_exact.to(device),
            self.student_exact.to(device),
            self.teacher_nbytes.to(device),
            self.student_nbytes.to(device),
            self.other_bucket,
        )


def _assign(keys: list, shared: dict, prefix_ok: list[bool]) -> tuple[list[int], list[bool]]:
    """Bucket of each key: its own shared bucket (exact), else its longest shared byte prefix, else -1."""
    buckets, exact = [], []
    for key, ok in zip(keys, prefix_ok):
        b = shared.get(key)
        if b is not None:
            buckets.append(b)
            exact.append(True)
            continue
        exact.append(False)
        if ok:
            for end in range(len(key) - 1, 0, -1):
                b = shared.get(key[:end])
                if b is not None:
                    break
        buckets.append(-1 if b is None else b)
    return buckets, exact


def build_vocab_map(teacher_tok, student_tok) -> VocabMap:
    """Build the :class:`VocabMap` of two tokenizers (see the module docstring for the rules).

    Bucket ids follow the student's token ids (the first student token of each shared bucket), with
    OTHER last. Two identical vocabularies get the identity map.
    """
    sides, nbytes = [], []
    for tok in (teacher_tok, student_tok):
        tb = token_bytes(tok)
        nbytes.append(torch.tensor([len(b) if b else 0 for b in tb], dtype=torch.int32))
        special = _special_strings(tok)
        # Keys: bytes for ordinary tokens, ("special", string) for special ones; None for holes.
        keys = [("special", special[i]) if i in special else b for i, b in enumerate(tb)]
        sides.append((keys, tok.eos_token_id))
    (t_keys, t_eos), (s_keys, s_eos) = sides
    if t_keys == s_keys and t_eos == s_eos:
        # Identical vocabularies: the identity, even where two tokens share a byte string (SentencePiece
        # "▁" and "<0x20>"), so the bucketed loss is exactly the same-tokenizer one.
        ident, every = torch.arange(len(t_keys)), torch.ones(len(t_keys), dtype=torch.bool)
        return VocabMap(ident, ident.clone(), len(t_keys), every, every.clone(), nbytes[0], nbytes[1])

    t_set = {k for k in t_keys if k is not None}
    shared: dict = {}
    for k in s_keys:
        if k is not None and k in t_set and k not in shared:
            shared[k] = len(shared)

    # EOS: the two EOS tokens share one bucket. Where each is already in a (different) bucket, the
    # teacher's bucket is merged into the student's; a key with no bucket joins the other's.
    merge: dict[int, int] = {}
    if t_eos is not None and s_eos is not None and t_eos < len(t_keys) and s_eos < len(s_keys):
        tk, sk = t_keys[t_eos], s_keys[s_eos]
        if tk != sk and tk is not None and sk is not None:
            bt, bs = shared.get(tk), shared.get(sk)
            if bs is None:
                bs = shared[sk] = len(shared)
            if bt is None:
                shared[tk] = bs
            else:
                merge[bt] = bs

    buckets = []
    for keys in (t_keys, s_keys):
        prefix_ok = [isinstance(k, bytes) for k in keys]
        b, exact = _assign(keys, shared, prefix_ok)
        buckets.append((torch.tensor(b, dtype=torch.long), torch.tensor(exact, dtype=torch.bool)))
    (t2b, t_exact), (s2b, s_exact) = buckets
    n_shared = len(set(shared.values()))
    if merge:
        lut = torch.arange(len(shared) + 1)
        for src, dst in merge.items():
            lut[src] = dst
        t2b = torch.where(t2b >= 0, lut[t2b.clamp(min=0)], t2b)
        s2b = torch.where(s2b >= 0, lut[s2b.clamp(min=0)], s2b)
    other = -1
    if bool((t2b < 0).any() or (s2b < 0).any()):
        other = len(shared)
        t2b = torch.where(t2b < 0, other, t2b)
        s2b = torch.where(s2b < 0, other, s2b)
    # Compact the ids (merges leave holes); unique keeps their order, so OTHER stays last.
    used, inverse = torch.unique(torch.cat([t2b, s2b]), return_inverse=True)
    t2b, s2b = inverse[: len(t2b)], inverse[len(t2b) :]
    if other >= 0:
        other = len(used) - 1
    logger.debug("vocab map: %d shared byte strings/specials, %d buckets", n_shared, len(used))
    return VocabMap(t2b, s2b, len(used), t_exact, s_exact, nbytes[0], nbytes[1], other)


def vocab_fingerprint(tok) -> str:
    """A hash of everything the map depends on: the backend's serialisation (vocabulary, added tokens
    with their special flags, decoder), the special ids, EOS and the byte style."""
    h = hashlib.sha256()
    h.update(f"{type(tok).__name__}|{len(tok)}|{tok.eos_token_id}|{tokenizer_style(tok)}|".encode())
    h.update(repr(sorted(_special_ids(tok))).encode())
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(repr(sorted((i, p) for p, i in tok.get_vocab().items())).encode())
        h.update(repr(sorted((i, a.content, a.special) for i, a in tok.added_tokens_decoder.items())).encode())
    return h.hexdigest()


def default_cache_dir() -> Path:
    """``$SAR_KD_CACHE/vocab_maps`` if set, else ``~/.cache/sar_kd/vocab_maps``."""
    root = os.environ.get("SAR_KD_CACHE")
    return Path(root) / "vocab_maps" if root else Path.home() / ".cache" / "sar_kd" / "vocab_maps"


def load_or_build_vocab_map(teacher_tok, student_tok, cache_dir: str | os.PathLike | None = None) -> VocabMap:
    """:func:`build_vocab_map`, cached on disk under a hash of both vocabularies (and the format).

    The file is written atomically (temporary file, then rename), so concurrent processes (ranks)
    that build the same map at once do not read a half-written file.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = hashlib.sha256(
        f"{MAP_FORMAT}|{vocab_fingerprint(teacher_tok)}|{vocab_fingerprint(student_tok)}".encode()
    ).hexdigest()[:32]
    path = root / f"{key}.pt"
    if path.exists():
        try:
            return VocabMap.from_state_dict(torch.load(path, weights_only=True))
        except Exception as e:  # a corrupt or foreign file is rebuilt, not fatal
            logger.warning("rebuilding vocab map: cannot read %s (%s)", path, e)
    t0 = time.perf_counter()
    vmap = build_vocab_map(teacher_tok, student_tok)
    logger.info("built vocab map (%d buckets) in %.1fs", vmap.num_buckets, time.perf_counter() - t0)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(vmap.state_dict(), tmp)
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache costs a rebuild next time, nothing more
        logger.warning("cannot cache vocab map in %s: %s", root, e)
    return vmap


def bucket_probs(probs: torch.Tensor, to_bucket: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Sum token probabilities into buckets: (N, V) -> (N, num_buckets), differentiable.

    ``out[n, b] = Σ_{v : to_bucket[v] = b} probs[n, v]``. ``V`` must equal ``len(to_bucket)``: trim
    padded head rows (beyond the tokenizer) before the softmax, so they get no mass.
    """
    assert probs.shape[-1] == to_bucket.shape[0], (
        f"distribution width {probs.shape[-1]} != vocabulary map size {to_bucket.shape[0]}: trim the head"
    )
    return probs.new_zeros(probs.shape[0], num_buckets).index_add(1, to_bucket, probs)
