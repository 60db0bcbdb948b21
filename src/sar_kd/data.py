"""Text loading, tokenisation and packing into full blocks, and a resumable batch stream."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, TrainConfig

logger = logging.getLogger(__name__)


def _read_local(path: str, text_column: str) -> list[str]:
    """Documents of a local file: .txt gives one per line, .jsonl one per object (its ``text_column``)."""
    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    if p.suffix == ".txt":
        return raw.splitlines()
    docs = []
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"cannot read {path}: line {i} is not valid JSON ({e.msg})") from e
        if not isinstance(obj, dict) or not isinstance(obj.get(text_column), str):
            raise ConfigError(f"{path} line {i} has no string field {text_column!r}; set --text_column")
        docs.append(obj[text_column])
    return docs


def load_texts(cfg: TrainConfig) -> tuple[list[str], list[str] | None]:
    """Training and validation documents (validation None when the source has none)."""
    if cfg.train_file is not None:
        train = _read_local(cfg.train_file, cfg.text_column)
        val = _read_local(cfg.validation_file, cfg.text_column) if cfg.validation_file else None
    else:
        import datasets

        try:
            dsd = datasets.load_dataset(cfg.dataset_name, cfg.dataset_config_name)
        except Exception as e:
            raise ConfigError(
                f"cannot load dataset {cfg.dataset_name!r} ({cfg.dataset_config_name}): "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            ) from e
        if "train" not in dsd:
            raise ConfigError(f"dataset {cfg.dataset_name!r} has no 'train' split (splits: {list(dsd)})")
        if cfg.text_column not in dsd["train"].column_names:
            raise ConfigError(
                f"dataset {cfg.dataset_name!r} has no {cfg.text_column!r} column "
                f"(columns: {dsd['train'].column_names}); set --text_column"
            )
        train = list(dsd["train"][cfg.text_column])
        val_split = next((s for s in ("validation", "valid", "test") if s in dsd), None)
        val = list(dsd[val_split][cfg.text_column]) if val_split else None
    if cfg.max_train_samples is not None:
        train = train[: cfg.max_train_samples]
    return train, val


def as_stream(texts: list[str]) -> list[str]:
    """Documents as pieces of one continuous text: each ends with a newline, empty ones dropped."""
    return [t if t.endswith("\n") else t + "\n" for t in texts if t]


def pack_token_blocks(texts: list[str], tokenizer, block_size: int, batch_docs: int = 1000) -> torch.Tensor:
    """Tokenise documents as one stream and cut it into full blocks: (num_blocks, block_size) int64.

    The tail that does not fill a block is dropped, so every position is a real token.
    """
    ids: list[int] = []
    pieces = as_stream(texts)
    for i in range(0, len(pieces), batch_docs):
        enc = tokenizer(pieces[i : i + batch_docs], add_special_tokens=False)["input_ids"]
        for e in enc:
            ids.extend(e)
    n = len(ids) // block_size
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)


def logit_blocks(texts: list[str], tokenizer, block_size: int) -> dict[str, torch.Tensor]:
    """Same-tokenizer blocks: ``input_ids`` (N, T) and the per-block token counts of each loss."""
    ids = pack_token_blocks(texts, tokenizer, block_size)
    n = torch.full((len(ids),), block_size - 1, dtype=torch.long)
    return {"input_ids": ids, "n_kd": n, "n_ce": n.clone(), "n_tce": n.clone()}


def _split_point(text: str, limit: int) -> int:
    """The last whitespace position in text[limit//2 : limit] (so words are not cut), else ``limit``."""
    cut = max(text.rfind(" ", limit // 2, limit), text.rfind("\n", limit // 2, limit))
    return cut if cut > 0 else limit


def _encode(tok, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    return list(zip(enc["input_ids"], enc["offset_mapping"]))


@dataclass
class _Tokens:
    """One tokenisation of the whole stream: ids (N,) and global character spans (N, 2), in order."""

    ids: np.ndarray
    offsets: np.ndarray

    def cuts(self) -> tuple[np.ndarray, np.ndarray]:
        """(character positions, token counts) where the stream can be cut between two tokens.

        A cut at character ``p`` after ``k`` tokens is clean when the first ``k`` tokens end at or
        before ``p`` and the others start at or after it. Byte-level pieces of one character share its
        span, so no cut falls inside a character. Starts with (0, 0)."""
        starts, ends = self.offsets[:, 0], self.offsets[:, 1]
        reach = np.maximum.accumulate(ends)
        later = np.minimum.accumulate(starts[::-1])[::-1]
        clean = np.ones(len(ends), dtype=bool)
        clean[:-1] = reach[:-1] <= later[1:]
        pos = np.concatenate([[0], reach[clean]])
        count = np.concatenate([[0], np.nonzero(clean)[0] + 1])
        pos, first = np.unique(pos, return_index=True)  # several cuts at one place (zero-width tokens): the first
        return pos, count[first]


def _tokenize_stream(tok, pieces: list[str], batch_docs: int = 1000) -> _Tokens:
    """The stream tokenised document by document (as in logit mode), offsets in stream characters."""
    starts = np.cumsum([0] + [len(p) for p in pieces[:-1]])
    ids, offsets = [], []
    for i in range(0, len(pieces), batch_docs):
        enc = tok(pieces[i : i + batch_docs], add_special_tokens=False, return_offsets_mapping=True)
        lens = [len(e) for e in enc["input_ids"]]
        ids.append(np.fromiter(chain.from_iterable(enc["input_ids"]), dtype=np.int64, count=sum(lens)))
        off = np.array(list(chain.from_iterable(enc["offset_mapping"])), dtype=np.int64).reshape(-1, 2)
        offsets.append(off + np.repeat(starts[i : i + batch_docs], lens)[:, None])
    return _Tokens(np.concatenate(ids), np.concatenate(offsets))


def _pieces_that_fit(text: str, student_tok, teacher_tok, block_size: int) -> list[tuple]:
    """``text`` cut at whitespace into consecutive pieces that fit ``block_size`` tokens on both sides,
    each tokenised on its own: ``[(n_chars, (s_ids, s_off), (t_ids, t_off)), ...]``. A piece's cut-off
    tail starts the next piece, so the pieces tile ``text``."""
    pieces, pos = [], 0
    while pos < len(text):
        rest, cut = text[pos:], len(text) - pos
        while True:
            (s_ids, s_off), (t_ids, t_off) = (
                _encode(student_tok, [rest[:cut]])[0],
                _encode(teacher_tok, [rest[:cut]])[0],
            )
            over = [off[block_size - 1][1] for ids, off in ((s_ids, s_off), (t_ids, t_off)) if len(ids) > block_size]
            if not over or cut == 1:
                break
            limit = max(1, min(min(over), cut - 1))
            cut = _split_point(rest, limit) if limit > 1 else 1
        # (only one character over block_size tokens, block_size < 4, is cut to size)
        pieces.append((cut, (s_ids[:block_size], s_off[:block_size]), (t_ids[:block_size], t_off[:block_size])))
        pos += cut
    return pieces


def pack_dual_blocks(
    texts: list[str], student_tok, teacher_tok, block_size: int, rows_per_fill: int = 2048
) -> dict[str, torch.Tensor]:
    """Blocks of shared text tokenised by both tokenizers, for hidden-state distillation.

    The stream (the documents joined as by :func:`as_stream`) is tokenised once by each tokenizer,
    document by document, and cut into consecutive character spans: each span ends at the furthest
    place where both tokenisations can be cut cleanly and both fit ``block_size`` tokens, so no
    characters-per-token ratio is guessed and prose, CJK and emoji blocks come out equally full. Where
    the two tokenisations share no cut within ``block_size`` tokens (rare), that stretch is cut at
    whitespace and tokenised piece by piece, the cut-off tail of each piece starting the next one.

    The spans tile the stream: **every character is in exactly one block, once**; nothing is dropped.
    The last block (and a fallback piece) can be shorter than ``block_size``; it is padded. The only
    text left out is a span without a single token on one side (text a tokenizer normalises away).

    Returns ``student_ids``/``teacher_ids`` (N, T), ``*_mask`` (N, T), ``*_offsets`` (N, T, 2)
    (character spans from the block's first character, the same origin on both sides), and per-block
    counts ``n_kd`` (aligned student tokens), ``n_ce`` (student labels), ``n_tce`` (teacher labels).
    Padding is masked everywhere.
    """
    from .alignment import overlap_alignment

    pieces = as_stream(texts)
    stream = "".join(pieces)
    if not stream.strip():
        return {}
    sides = {"student": _tokenize_stream(student_tok, pieces), "teacher": _tokenize_stream(teacher_tok, pieces)}
    (s_pos, s_cnt), (t_pos, t_cnt) = sides["student"].cuts(), sides["teacher"].cuts()
    pos, i_s, i_t = np.intersect1d(s_pos, t_pos, assume_unique=True, return_indices=True)
    cs, ct = s_cnt[i_s], t_cnt[i_t]
    if pos[-1] != len(stream):  # trailing text without tokens: the end of the stream is a clean cut too
        pos = np.append(pos, len(stream))
        cs, ct = np.append(cs, len(sides["student"].ids)), np.append(ct, len(sides["teacher"].ids))

    # Greedy, left to right: from each cut, the furthest common cut within block_size tokens on both sides.
    rows: list[tuple[int, int, int, int, int]] = []  # first char, student token range, teacher token range
    own: dict[int, tuple] = {}  # row -> its own tokenisation (fallback pieces)
    k, last = 0, len(pos) - 1
    while k < last:
        j = min(np.searchsorted(cs, cs[k] + block_size, "right"), np.searchsorted(ct, ct[k] + block_size, "right")) - 1
        if j > k:
            rows.append((int(pos[k]), int(cs[k]), int(cs[j]), int(ct[k]), int(ct[j])))
            k = j
            continue
        a = int(pos[k])
        for n_chars, s_enc, t_enc in _pieces_that_fit(
            stream[a : int(pos[k + 1])], student_tok, teacher_tok, block_size
        ):
            own[len(rows)] = (s_enc, t_enc)
            rows.append((a, 0, 0, 0, 0))
            a += n_chars
        k += 1

    n = len(rows)
    out = {}
    for side, tok in (("student", student_tok), ("teacher", teacher_tok)):
        out[f"{side}_ids"] = torch.full((n, block_size), _pad_id(tok), dtype=torch.long)
        out[f"{side}_mask"] = torch.zeros(n, block_size, dtype=torch.long)
        out[f"{side}_offsets"] = torch.zeros(n, block_size, 2, dtype=torch.int32)
    table = torch.tensor(rows, dtype=torch.long).view(n, 5)
    arange = torch.arange(block_size)
    for side, col in (("student", 1), ("teacher", 3)):
        ids, offsets = torch.from_numpy(sides[side].ids), torch.from_numpy(sides[side].offsets)
        for lo in range(0, n, rows_per_fill):  # gather the token ranges, a bounded number of rows at a time
            t = table[lo : lo + rows_per_fill]
            idx = t[:, col, None] + arange
            valid = idx < t[:, col + 1, None]
            idx = idx.clamp(max=max(len(ids) - 1, 0))
            sl = slice(lo, lo + len(t))
            out[f"{side}_ids"][sl] = torch.where(valid, ids[idx], out[f"{side}_ids"][sl])
            out[f"{side}_mask"][sl] = valid.long()
            rel = (offsets[idx] - t[:, 0, None, None]).masked_fill(~valid[..., None], 0)
            out[f"{side}_offsets"][sl] = rel.to(torch.int32)
    for r, encs in own.items():
        for side, (ids, off) in zip(("student", "teacher"), encs):
            out[f"{side}_ids"][r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            out[f"{side}_mask"][r, : len(ids)] = 1
            out[f"{side}_offsets"][r, : len(ids)] = torch.tensor(off, dtype=torch.int32).view(-1, 2)
    keep = (out["student_mask"].sum(1) > 0) & (out["teacher_mask"].sum(1) > 0)
    if not bool(keep.all()):
        out = {k: v[keep] for k, v in out.items()}
    n = int(keep.sum())
    if n == 0:
        return {}
    out["n_ce"] = out["student_mask"].sum(1) - 1
    out["n_tce"] = out["teacher_mask"].sum(1) - 1
    n_kd = []
    for i in range(0, n, 32):
        sl = slice(i, i + 32)
        _, aligned = overlap_alignment(
            out["student_offsets"][sl], out["student_mask"][sl], out["teacher_offsets"][sl], out["teacher_mask"][sl]
        )
        n_kd.append(aligned.sum(1))
    out["n_kd"] = torch.cat(n_kd)
    return out


def _pad_id(tok) -> int:
    for tid in (tok.pad_token_id, tok.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def alignment_coverage(blocks: dict[str, torch.Tensor]) -> float:
    """Fraction of the student's real tokens that overlap at least one teacher token."""
    return float(blocks["n_kd"].sum()) / max(1, int(blocks["student_mask"].sum()))


def split_validation(blocks: dict[str, torch.Tensor], percentage: float) -> tuple[dict, dict]:
    """Hold out the last ``percentage`` % of blocks (at least one) for validation."""
    n = len(next(iter(blocks.values())))
    n_val = max(1, int(round(n * percentage / 100.0)))
    if n - n_val < 1:
        raise ConfigError(
            f"only {n} block(s) of training data: too few to hold out a validation split; "
            "give --validation_file or more text"
        )
    return {k: v[: n - n_val] for k, v in blocks.items()}, {k: v[n - n_val :] for k, v in blocks.items()}


def num_blocks(blocks: dict[str, torch.Tensor]) -> int:
    return len(next(iter(blocks.values())))


@dataclass
class StreamState:
    epoch: int = 0
    position: int = 0  # micro-batches consumed in the current epoch


class BatchStream:
    """Endless shuffled micro-batches over a dict of block tensors, resumable from a :class:`StreamState`.

    Each epoch is a permutation drawn from ``seed + epoch``; with several processes every rank
    takes its own strided share of it, so ranks never see the same block in one epoch.
    """

    def __init__(self, blocks: dict[str, torch.Tensor], batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.blocks = blocks
        self.batch_size = batch_size
        self.seed = seed
        self.rank, self.world = rank, world
        self.state = StreamState()
        self.per_epoch = num_blocks(blocks) // (batch_size * world)
        if self.per_epoch == 0:
            raise ConfigError(
                f"{num_blocks(blocks)} training block(s) cannot fill one batch of "
                f"{batch_size} x {world} process(es): give more text or a smaller --block_size/--per_device_batch_size"
            )

    def _order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(num_blocks(self.blocks), generator=g)
        return perm[self.rank :: self.world]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.state.position >= self.per_epoch:
            self.state = StreamState(self.state.epoch + 1, 0)
        order = self._order(self.state.epoch)
        sel = order[self.state.position * self.batch_size : (self.state.position + 1) * self.batch_size]
        self.state.position += 1
        return {k: v[sel] for k, v in self.blocks.items()}


def eval_batches(blocks: dict[str, torch.Tensor], batch_size: int, max_batches: int | None):
    """Validation micro-batches in order (the first ``max_batches`` when given)."""
    n = num_blocks(blocks)
    starts = range(0, n, batch_size)
    if max_batches is not None:
        starts = starts[:max_batches]
    for start in starts:
        yield {k: v[start : start + batch_size] for k, v in blocks.items()}
