"""Text loading, tokenisation and packing into full blocks, and a resumable batch stream."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

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


def pack_dual_blocks(
    texts: list[str], student_tok, teacher_tok, block_size: int, batch_chunks: int = 256
) -> dict[str, torch.Tensor]:
    """Blocks of shared text tokenised by both tokenizers, for hidden-state distillation.

    The text stream is cut into character chunks (at whitespace) sized so both tokenisations
    usually fit ``block_size``; a chunk that does not fit on either side is shortened to the
    character range both cover within ``block_size`` tokens and tokenised again. Returns
    ``student_ids``/``teacher_ids`` (N, T), ``*_mask`` (N, T), ``*_offsets`` (N, T, 2) (character
    spans in the chunk), and per-block counts ``n_kd`` (aligned student tokens), ``n_ce`` (student
    labels), ``n_tce`` (teacher labels). Padding is masked everywhere.
    """
    from .alignment import overlap_alignment

    stream = "".join(as_stream(texts))
    if not stream.strip():
        return {}
    sample = stream[:200_000]
    per_tok = min(
        len(sample) / max(1, len(student_tok(sample, add_special_tokens=False)["input_ids"])),
        len(sample) / max(1, len(teacher_tok(sample, add_special_tokens=False)["input_ids"])),
    )
    chunk_chars = max(8, int(block_size * per_tok * 0.9))
    chunks, pos = [], 0
    while pos < len(stream):
        rest = stream[pos : pos + chunk_chars + 1]
        end = len(rest) if len(rest) <= chunk_chars else _split_point(rest, chunk_chars)
        chunks.append(rest[:end])
        pos += end

    rows: list[tuple] = []
    for i in range(0, len(chunks), batch_chunks):
        batch = chunks[i : i + batch_chunks]
        for text, (s_ids, s_off), (t_ids, t_off) in zip(
            batch, _encode(student_tok, batch), _encode(teacher_tok, batch)
        ):
            while len(s_ids) > block_size or len(t_ids) > block_size:
                limit = min(
                    s_off[block_size - 1][1] if len(s_ids) > block_size else len(text),
                    t_off[block_size - 1][1] if len(t_ids) > block_size else len(text),
                )
                text = text[: _split_point(text, limit) if limit < len(text) else int(len(text) * 0.9)]
                (s_ids, s_off), (t_ids, t_off) = _encode(student_tok, [text])[0], _encode(teacher_tok, [text])[0]
            if len(s_ids) >= 2 and len(t_ids) >= 2:
                rows.append((s_ids, s_off, t_ids, t_off))
    if not rows:
        return {}

    n = len(rows)
    out = {
        "student_ids": torch.full((n, block_size), _pad_id(student_tok), dtype=torch.long),
        "student_mask": torch.zeros(n, block_size, dtype=torch.long),
        "student_offsets": torch.zeros(n, block_size, 2, dtype=torch.int32),
        "teacher_ids": torch.full((n, block_size), _pad_id(teacher_tok), dtype=torch.long),
        "teacher_mask": torch.zeros(n, block_size, dtype=torch.long),
        "teacher_offsets": torch.zeros(n, block_size, 2, dtype=torch.int32),
    }
    for k, (s_ids, s_off, t_ids, t_off) in enumerate(rows):
        for side, ids, off in (("student", s_ids, s_off), ("teacher", t_ids, t_off)):
            out[f"{side}_ids"][k, : len(ids)] = torch.tensor(ids)
            out[f"{side}_mask"][k, : len(ids)] = 1
            out[f"{side}_offsets"][k, : len(ids)] = torch.tensor(off, dtype=torch.int32)
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
