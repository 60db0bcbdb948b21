"""Text loading, tokenisation and packing into full blocks, and a resumable batch stream."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, TrainConfig

logger = logging.getLogger(__name__)


def local_documents(path: str, text_column: str) -> Iterator[str]:
    """The documents of a local file, read lazily: a ``.txt`` file gives one per line as ``str.splitlines``
    splits it (also at U+2028, ``\\x0c``, ``\\x85``, ...; ``text_column`` is not used), any other file one per
    JSON object per line (its ``text_column``; blank lines skipped). Both paths, and :func:`load_texts`,
    read local files through this function, so their documents (and --max_train_samples) are the same.
    A ConfigError names the file and the line for text that cannot be read."""
    txt = Path(path).suffix == ".txt"
    try:
        f = open(path, "rb")  # noqa: SIM115 (lines split at b"\n" and decoded one by one: an error names its line)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {type(e).__name__}: {e.strerror or e}") from e
    with f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(f"cannot read {path}: line {i} is not valid UTF-8 ({e.reason})") from e
            if txt:
                yield from line.splitlines()  # (a "\r\n" or "\n" ending makes no extra empty document)
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"cannot read {path}: line {i} is not valid JSON ({e.msg})") from e
            text = obj.get(text_column) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                why = (
                    "not a JSON object" if not isinstance(obj, dict)
                    else "no such field" if text_column not in obj
                    else "it is null" if text is None
                    else f"it is {type(text).__name__}"
                )  # fmt: skip
                raise ConfigError(f"{path} line {i} has no string field {text_column!r} ({why}); set --text_column")
            yield text


def _read_local(path: str, text_column: str) -> list[str]:
    """All documents of a local file (:func:`local_documents`)."""
    return list(local_documents(path, text_column))


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


# ---------------------------------------------------------------- documents through `datasets`
# Hub datasets and local files both go through `datasets`: a Dataset (Arrow, cached, tokenised once
# with ``Dataset.map``) or, with --streaming, an IterableDataset read as it is needed.


LOCAL_READER = "sar_kd.local_documents.v2"  # (in the fingerprint of a local file's Arrow build)
_FILES = "sar_kd_files"  # attribute of a dataset from text_datasets: {local path: file_identity}


def file_identity(path: str) -> dict:
    """What identifies a local file's contents without reading all of it: size, modification and
    status-change times (ns), inode, and a hash of three 64 KiB samples (start, middle, end), so a file
    rewritten in place with its modification time restored is still a changed file."""
    import hashlib

    try:
        st = os.stat(path)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for at in sorted({0, max(0, st.st_size // 2 - (1 << 15)), max(0, st.st_size - (1 << 16))}):
                f.seek(at)
                h.update(f.read(1 << 16))
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {type(e).__name__}: {e.strerror or e}") from e
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino,
            "sample_sha256": h.hexdigest()}  # fmt: skip


def same_contents(saved: dict, now: dict) -> bool:
    """Whether two :func:`file_identity` values name the same contents (a copy with its modification time
    kept, e.g. ``cp -p`` or ``rsync -t``, is the same: inode and status-change time are not compared)."""
    return all(saved.get(k) == now.get(k) for k in ("size", "mtime_ns", "sample_sha256"))


def source_files(ds) -> dict | None:
    """{path: :func:`file_identity`} of the local file a dataset from :func:`text_datasets` reads (None: a hub dataset)."""
    return getattr(ds, _FILES, None)


def _local_rows(path: str, column: str, identity: str):
    """The ``Dataset.from_generator`` generator of a local file: one row ``{column: document}`` per
    document. ``identity`` (the file's :func:`file_identity`, JSON) keys the Arrow build; a streamed
    epoch that finds the file changed since the run started stops with a ConfigError."""
    if not same_contents(json.loads(identity), file_identity(path)):
        raise ConfigError(f"{path} changed while the run was reading it: restart the run")
    for doc in local_documents(path, column):
        yield {column: doc}


def _load_local(cfg: TrainConfig, path: str, streaming: bool, role: str):
    """A local file as a (streaming) dataset of its documents (:func:`local_documents`), one row each, in
    the column ``--text_column``. The Arrow build is cached under a fingerprint of the reader, the path,
    the column and the file's :func:`file_identity`: a changed file is a new dataset."""
    import datasets
    from datasets.fingerprint import Hasher

    ident = file_identity(path)
    kw = {"path": str(Path(path).resolve()), "column": cfg.text_column, "identity": json.dumps(ident, sort_keys=True)}
    features = datasets.Features({cfg.text_column: datasets.Value("string")})
    with quiet_datasets(f"cannot read {path}", root_cause=True):
        if streaming:
            ds = datasets.IterableDataset.from_generator(_local_rows, features=features, gen_kwargs=kw)
        else:
            fp = Hasher.hash((LOCAL_READER, kw))
            try:
                ds = datasets.Dataset.from_generator(_local_rows, features=features, gen_kwargs=kw, fingerprint=fp)
            except ValueError as e:
                if "corresponds to no data" not in str(e):
                    raise
                raise ConfigError(f"the {role} data is empty: no text found in {path}") from None
    setattr(ds, _FILES, {kw["path"]: ident})
    return ds


def _load(cfg: TrainConfig, path: str | None, streaming: bool, role: str = "training"):
    """The hub dataset (``path`` None: its splits) or the local file ``path`` (:func:`_load_local`); a
    ConfigError when it cannot be read."""
    import datasets

    if path is not None:
        return _load_local(cfg, path, streaming, role)
    with quiet_datasets(f"cannot load dataset {cfg.dataset_name!r} ({cfg.dataset_config_name})", root_cause=False):
        return datasets.load_dataset(cfg.dataset_name, cfg.dataset_config_name, streaming=streaming)


_UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def quiet_datasets(what: str, root_cause: bool = True):
    """`datasets`' own error logging off; an error becomes one ConfigError line (naming its root cause;
    a ConfigError raised inside, e.g. by :func:`local_documents`, as it is; a cache directory that cannot
    be written, as such)."""
    log = logging.getLogger("datasets")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    except ConfigError:
        raise
    except Exception as e:
        root, chain_ = e, [e]
        while root.__cause__ is not None or root.__context__ is not None:
            root = root.__cause__ or root.__context__
            chain_.append(root)
        ours = next((x for x in chain_ if isinstance(x, ConfigError)), None)
        if ours is not None:
            raise ConfigError(str(ours)) from e
        cache = _unwritable_cache(chain_)
        if cache is not None:
            raise ConfigError(
                f"cannot write to the datasets cache {cache} ({cache_problem(cache)}): "
                "set HF_DATASETS_CACHE to a writable directory"
            ) from e
        if not root_cause:
            root = e
        first = str(root).splitlines()[0] if str(root) else ""
        raise ConfigError(f"{what}: {type(root).__name__}: {first}") from e
    finally:
        log.setLevel(level)


def _datasets_cache() -> str:
    import datasets

    return str(datasets.config.HF_DATASETS_CACHE)


def cache_problem(cache: str) -> str:
    """Why ``cache`` cannot be written ("" when it can): a probe file is created and removed."""
    import tempfile

    try:
        os.makedirs(cache, exist_ok=True)
        with tempfile.TemporaryFile(dir=cache):
            pass
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    return ""


def _unwritable_cache(errors: list[BaseException]) -> str | None:
    """The datasets cache directory when one of ``errors`` is a failure to write it, else None."""
    cache = _datasets_cache()
    for e in errors:
        if isinstance(e, OSError) and e.errno in _UNWRITABLE:
            name = str(e.filename or "")
            if (not name or os.path.abspath(name).startswith(os.path.abspath(cache))) and cache_problem(cache):
                return cache
    return None


def text_datasets(cfg: TrainConfig, streaming: bool = False):
    """``(train, validation or None)`` rows as `datasets` datasets (IterableDatasets when ``streaming``),
    capped by --max_train_samples: one row per document, so the cap counts what :func:`load_texts`
    counts. Local files are read by :func:`local_documents` (each by its own suffix)."""
    if cfg.train_file is not None:
        train = _load(cfg, cfg.train_file, streaming, "training")
        val = _load(cfg, cfg.validation_file, streaming, "validation") if cfg.validation_file else None
    else:
        dsd = _load(cfg, None, streaming)
        if "train" not in dsd:
            raise ConfigError(f"dataset {cfg.dataset_name!r} has no 'train' split (splits: {list(dsd)})")
        train = dsd["train"]
        val_split = next((s for s in ("validation", "valid", "test") if s in dsd), None)
        val = dsd[val_split] if val_split else None
        hub = f"dataset {cfg.dataset_name!r}"
        for ds, name in ((train, hub), (val, f"{hub} (validation)")):
            cols = None if ds is None else ds.column_names  # (unknown for some streamed sources: checked when read)
            if cols is not None and cfg.text_column not in cols:
                raise ConfigError(f"{name} has no {cfg.text_column!r} column (columns: {cols}); set --text_column")
    if cfg.max_train_samples is not None:
        files = source_files(train)
        train = (
            train.take(cfg.max_train_samples)
            if streaming
            else train.select(range(min(cfg.max_train_samples, len(train))))
        )
        if files is not None:
            setattr(train, _FILES, files)
    return train, val


def row_documents(rows: list, column: str) -> list[str]:
    """The documents of a batch of ``column`` values, one per row (a local .txt file's rows are already
    split as ``str.splitlines`` splits them: :func:`local_documents`); a ConfigError for a value that
    is not text."""
    for v in rows:
        if not isinstance(v, str):
            raise ConfigError(f"a row's {column!r} is {type(v).__name__}, not text; set --text_column")
    return rows


def _tokenize_rows(batch: dict, column: str, toks: dict, offsets: bool) -> dict:
    """``Dataset.map`` function: one output row per non-empty document (its stream piece, as by
    :func:`as_stream`): ``n_chars``, ``blank`` and, per tokenizer, ``{name}_ids`` (+ ``{name}_offsets``,
    flattened start, end pairs)."""
    pieces = as_stream(row_documents(batch[column], column))
    out: dict[str, list] = {"n_chars": [len(p) for p in pieces], "blank": [not p.strip() for p in pieces]}
    for name, tok in toks.items():
        enc = tok(pieces, add_special_tokens=False, return_offsets_mapping=offsets) if pieces else {}
        if not pieces:
            enc = {"input_ids": [], "offset_mapping": []}
        out[f"{name}_ids"] = enc["input_ids"]
        if offsets:
            out[f"{name}_offsets"] = [list(chain.from_iterable(o)) for o in enc["offset_mapping"]]
    return out


_TOKENIZER_HASHES: dict[int, tuple[object, str]] = {}  # id -> (tokenizer, hash), the latest few


_NOT_ENCODING = {  # init kwargs that are where the tokenizer came from, not how it encodes
    "name_or_path", "_name_or_path", "is_local", "local_files_only", "cache_dir", "revision", "token",
    "_commit_hash", "trust_remote_code", "chat_template", "vocab_file", "merges_file", "tokenizer_file",
    "special_tokens_map_file", "tokenizer_object", "backend",
}  # fmt: skip
_ENCODING_ATTRS = ("split_special_tokens", "add_bos_token", "add_eos_token", "add_prefix_space", "do_lower_case",
                   "clean_up_tokenization_spaces", "padding_side", "truncation_side")  # fmt: skip


def _jsonable(v):
    """``v`` as plain JSON values (AddedToken as its fields; other objects as their type name only)."""
    if v is None or isinstance(v, bool | int | float | str):
        return v
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))}
    if hasattr(v, "content") and hasattr(v, "special"):  # tokenizers.AddedToken
        return {a: getattr(v, a, None) for a in ("content", "single_word", "lstrip", "rstrip", "normalized", "special")}
    return f"<{type(v).__name__}>"


def _tokenizer_hash(tok) -> str:
    """A hash of everything that decides the tokenizer's output: the fast tokenizer's full definition
    (``tokenizer.json``), its class, and its settings outside it (``init_kwargs`` from
    ``tokenizer_config.json``, e.g. ``split_special_tokens``, and the attributes that change ids)."""
    import hashlib

    known = _TOKENIZER_HASHES.get(id(tok))
    if known is not None and known[0] is tok:
        return known[1]
    kwargs = {k: v for k, v in (getattr(tok, "init_kwargs", None) or {}).items() if k not in _NOT_ENCODING}
    attrs = {a: getattr(tok, a) for a in _ENCODING_ATTRS if hasattr(tok, a)}
    settings = json.dumps(
        {"class": f"{type(tok).__module__}.{type(tok).__qualname__}", "init_kwargs": _jsonable(kwargs),
         "attrs": _jsonable(attrs)}, sort_keys=True,
    )  # fmt: skip
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        h = hashlib.sha256((backend.to_str() + "\0" + settings).encode()).hexdigest()
    else:
        from datasets.fingerprint import Hasher

        h = Hasher.hash((Hasher.hash(tok), settings))
    while len(_TOKENIZER_HASHES) >= 4:  # (the latest run's tokenizers only: each entry keeps its tokenizer alive)
        del _TOKENIZER_HASHES[next(iter(_TOKENIZER_HASHES))]
    _TOKENIZER_HASHES[id(tok)] = (tok, h)
    return h


def tokenized_dataset(ds, cfg: TrainConfig, toks: dict, offsets: bool):
    """``ds`` tokenised by ``Dataset.map`` (batched, --preprocessing_num_workers processes), cached by
    `datasets` next to the dataset's Arrow files under a fingerprint of the data, the tokenizers and
    this function: a second start, or a resume, reads the cache instead of tokenising again."""
    from datasets.fingerprint import Hasher

    fp = Hasher.hash(
        ("sar_kd.tokenize.v2", ds._fingerprint, cfg.text_column, offsets,
         sorted((n, _tokenizer_hash(t)) for n, t in toks.items()))
    )  # fmt: skip
    fn_kwargs = {"column": cfg.text_column, "toks": toks, "offsets": offsets}
    with quiet_datasets(f"cannot tokenise {cfg.train_file or cfg.dataset_name}"):
        return ds.map(
            _tokenize_rows,
            batched=True,
            batch_size=1000,
            fn_kwargs=fn_kwargs,
            remove_columns=ds.column_names,
            num_proc=cfg.preprocessing_num_workers,
            new_fingerprint=fp,
            desc="tokenising",
        )


def _flat(ds, column: str, dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
    """(all values of a list column concatenated, each row's length) from the Arrow table, no Python lists."""
    import pyarrow as pa

    col = ds.data.column(column)
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    values = arr.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    if not values.flags.writeable:  # a view of the Arrow buffer: torch wants its own
        values = values.copy()
    return values, arr.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)


def _check_text(tok, role: str, name: str) -> None:
    import pyarrow.compute as pc

    if len(tok) == 0 or pc.all(tok.data.column("blank")).as_py():
        raise ConfigError(f"the {role} data is empty: no text found in {name}")


def load_blocks(cfg: TrainConfig, mode: str, teacher_tok, student_tok) -> tuple[dict, dict | None]:
    """Training and validation blocks (validation None when the source has none), exactly those of
    :func:`logit_blocks` / :func:`pack_dual_blocks` on :func:`load_texts`' documents, tokenised through
    the `datasets` cache (see :func:`tokenized_dataset`)."""
    train_ds, val_ds = text_datasets(cfg)

    hub = f"dataset {cfg.dataset_name!r}"

    def blocks(ds, role: str) -> dict:
        name = (cfg.train_file or hub) if role == "training" else (cfg.validation_file or f"{hub} (validation)")
        if mode == "logit":
            tok = tokenized_dataset(ds, cfg, {"teacher": teacher_tok}, offsets=False)
            _check_text(tok, role, name)
            ids = torch.from_numpy(_flat(tok, "teacher_ids")[0])
            n = len(ids) // cfg.block_size
            ids = ids[: n * cfg.block_size].view(n, cfg.block_size)
            count = torch.full((n,), cfg.block_size - 1, dtype=torch.long)
            return {"input_ids": ids, "n_kd": count, "n_ce": count.clone(), "n_tce": count.clone()}
        tok = tokenized_dataset(ds, cfg, {"student": student_tok, "teacher": teacher_tok}, offsets=True)
        _check_text(tok, role, name)
        pieces = as_stream(row_documents(ds[cfg.text_column], cfg.text_column))
        stream = "".join(pieces)
        starts = np.cumsum([0] + [len(p) for p in pieces[:-1]])
        sides = {}
        for side in ("student", "teacher"):
            ids, lens = _flat(tok, f"{side}_ids")
            off = _flat(tok, f"{side}_offsets")[0].reshape(-1, 2) + np.repeat(starts, lens)[:, None]
            sides[side] = _Tokens(ids, off)
        return pack_dual_tokens(stream, sides, student_tok, teacher_tok, cfg.block_size)

    return blocks(train_ds, "training"), (blocks(val_ds, "validation") if val_ds is not None else None)


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


def _tokens(ids_lists, offset_lists, starts) -> _Tokens:
    """Per-document token ids and offsets (relative to each document) as one :class:`_Tokens` whose
    offsets count from the stream's origin; ``starts``: each document's first character."""
    lens = [len(e) for e in ids_lists]
    total = sum(lens)
    ids = np.fromiter(chain.from_iterable(ids_lists), dtype=np.int64, count=total)
    off = np.fromiter(chain.from_iterable(chain.from_iterable(offset_lists)), dtype=np.int64, count=2 * total)
    off = off.reshape(-1, 2) + np.repeat(np.asarray(starts, dtype=np.int64), lens)[:, None]
    return _Tokens(ids, off)


def _tokenize_stream(tok, pieces: list[str], batch_docs: int = 1000, origin: int = 0) -> _Tokens:
    """The stream tokenised document by document (as in logit mode), offsets in stream characters
    (the first piece starting at ``origin``)."""
    starts = np.cumsum([origin] + [len(p) for p in pieces[:-1]])
    parts = [_Tokens(np.zeros(0, dtype=np.int64), np.zeros((0, 2), dtype=np.int64))]
    for i in range(0, len(pieces), batch_docs):
        enc = tok(pieces[i : i + batch_docs], add_special_tokens=False, return_offsets_mapping=True)
        parts.append(_tokens(enc["input_ids"], enc["offset_mapping"], starts[i : i + batch_docs]))
    return _concat_tokens(parts)


def _concat_tokens(parts: list[_Tokens]) -> _Tokens:
    return _Tokens(np.concatenate([p.ids for p in parts]), np.concatenate([p.offsets for p in parts]))


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
    pieces = as_stream(texts)
    stream = "".join(pieces)
    if not stream.strip():
        return {}
    sides = {"student": _tokenize_stream(student_tok, pieces), "teacher": _tokenize_stream(teacher_tok, pieces)}
    return pack_dual_tokens(stream, sides, student_tok, teacher_tok, block_size, rows_per_fill)


def pack_dual_tokens(
    stream: str, sides: dict[str, _Tokens], student_tok, teacher_tok, block_size: int, rows_per_fill: int = 2048
) -> dict[str, torch.Tensor]:
    """:func:`pack_dual_blocks` of a stream already tokenised document by document (both sides)."""
    rows, own, _ = _dual_rows(stream, sides, student_tok, teacher_tok, block_size, final=True)
    return _dual_fill(rows, own, sides, student_tok, teacher_tok, block_size, rows_per_fill)


def _common_cuts(sides: dict[str, _Tokens]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(character positions, student token counts, teacher token counts) of the clean cuts both share."""
    (s_pos, s_cnt), (t_pos, t_cnt) = sides["student"].cuts(), sides["teacher"].cuts()
    pos, i_s, i_t = np.intersect1d(s_pos, t_pos, assume_unique=True, return_indices=True)
    return pos, s_cnt[i_s], t_cnt[i_t]


def _dual_rows(stream: str, sides: dict[str, _Tokens], student_tok, teacher_tok, block_size: int, final: bool):
    """The greedy cut of ``stream`` into blocks: ``(rows, own, k)``.

    ``rows``: (first char, student token range, teacher token range) per block; ``own``: row -> its own
    tokenisation (fallback pieces). With ``final`` False the stream is the start of a longer one (it ends
    at a document boundary, later documents follow): the cut stops where the decision could depend on
    text not seen yet, i.e. where the last common cut is not more than ``block_size`` tokens ahead on
    both sides, and ``k`` is the common cut the rest starts at (an index into :func:`_common_cuts`).
    Up to there the rows are those of the whole stream: the cuts of a prefix ending at a document
    boundary are the whole stream's cuts up to it."""
    pos, cs, ct = _common_cuts(sides)
    if final and pos[-1] != len(stream):  # trailing text without tokens: the end of the stream is a clean cut too
        pos = np.append(pos, len(stream))
        cs, ct = np.append(cs, len(sides["student"].ids)), np.append(ct, len(sides["teacher"].ids))

    # Greedy, left to right: from each cut, the furthest common cut within block_size tokens on both sides.
    rows: list[tuple[int, int, int, int, int]] = []  # first char, student token range, teacher token range
    own: dict[int, tuple] = {}  # row -> its own tokenisation (fallback pieces)
    k, last = 0, len(pos) - 1
    while k < last:
        if not final and (cs[last] <= cs[k] + block_size or ct[last] <= ct[k] + block_size):
            break
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
    return rows, own, (int(pos[k]), int(cs[k]), int(ct[k]))


def _dual_fill(
    rows, own, sides: dict[str, _Tokens], student_tok, teacher_tok, block_size: int, rows_per_fill: int = 2048
) -> dict[str, torch.Tensor]:
    """The block tensors of :func:`_dual_rows`'s rows (empty blocks dropped; {} when none is left)."""
    from .alignment import overlap_alignment

    n = len(rows)
    if n == 0:
        return {}
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
            if len(ids):
                out[f"{side}_ids"][sl] = torch.where(valid, ids[idx], out[f"{side}_ids"][sl])
            out[f"{side}_mask"][sl] = valid.long()
            if len(ids):
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

    def peek(self) -> dict[str, torch.Tensor]:
        """The next micro-batch, without consuming it."""
        state = StreamState(self.state.epoch, self.state.position)
        batch = next(self)
        self.state = state
        return batch

    # checkpoints: the position is all there is (the blocks are rebuilt at every start)
    def checkpoint_state(self) -> dict:
        return {"epoch": self.state.epoch, "position": self.state.position}

    def save_files(self, where) -> None:
        pass

    def restore(self, saved: dict, path) -> None:
        if saved.get("streaming"):
            raise ConfigError(f"--resume_from_checkpoint {path}: written with --streaming; resume with it")
        self.state = StreamState(saved["epoch"], saved["position"])


def eval_batches(blocks: dict[str, torch.Tensor], batch_size: int, max_batches: int | None):
    """Validation micro-batches in order (the first ``max_batches`` when given)."""
    n = num_blocks(blocks)
    starts = range(0, n, batch_size)
    if max_batches is not None:
        starts = starts[:max_batches]
    for start in starts:
        yield {k: v[start : start + batch_size] for k, v in blocks.items()}
