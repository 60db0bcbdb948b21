"""--streaming: blocks packed on the fly from a `datasets` IterableDataset, with memory that does not
grow with the corpus, and a position that a checkpoint restores exactly.

The layers, bottom up:

* a packer (:class:`LogitPacker`, :class:`DualPacker`) turns batches of documents into blocks. It keeps
  only a carry (the tokens, or the text and both tokenisations, after the last block it cut) and cuts
  exactly the blocks :func:`sar_kd.data.logit_blocks` / :func:`sar_kd.data.pack_dual_blocks` cut from
  the whole text: a logit block is a run of ``block_size`` ids of the concatenated per-document
  tokenisations; a dual block is cut only where the greedy choice cannot depend on text not read yet.
* a :class:`BlockSource` reads documents ``batch_docs`` at a time and yields the blocks of one split in
  order, epoch after epoch (the reader starts again when the data ends). Its position is the reader's
  ``state_dict()`` *before* the current batch of documents, the packer's carry before it, and how many
  of the batch's blocks were taken: restoring re-reads and re-packs that one batch and skips those.
* :class:`StreamingBatches`, the trainer's stream: a shuffle buffer of ``--shuffle_buffer_size`` blocks
  (our own, with its own RNG, so that it is restored exactly; `datasets`' shuffle buffer is not), from
  which every process draws the same global micro-batch of ``batch_size x world`` blocks and keeps
  every ``world``-th one from its rank on, as :class:`sar_kd.data.BatchStream` does: the global batch
  is the same for any number of processes. Every process reads and packs the whole stream (the same
  state everywhere, so one file in the checkpoint restores them all).
"""

from __future__ import annotations

import logging
from itertools import chain, islice
from pathlib import Path

import numpy as np
import torch

from . import data
from .config import ConfigError, TrainConfig

logger = logging.getLogger("sar_kd")

STATE_FILE = "stream_state.pt"


class LogitPacker:
    """Same-tokenizer blocks: the documents' ids concatenated and cut every ``block_size`` tokens; the
    tail that does not fill a block waits for the next documents (and is dropped at the end)."""

    def __init__(self, tok, block_size: int) -> None:
        self.tok, self.block_size = tok, block_size
        self.reset()

    def reset(self) -> None:
        self.carry = np.zeros(0, dtype=np.int64)

    def state(self) -> dict:
        return {"ids": torch.from_numpy(self.carry.copy())}

    def load(self, state: dict) -> None:
        self.carry = state["ids"].numpy().astype(np.int64)

    def feed(self, docs: list[str], final: bool) -> dict[str, torch.Tensor]:
        pieces = data.as_stream(docs)
        enc = self.tok(pieces, add_special_tokens=False)["input_ids"] if pieces else []
        new = np.fromiter(chain.from_iterable(enc), dtype=np.int64, count=sum(len(e) for e in enc))
        ids = np.concatenate([self.carry, new])
        n = len(ids) // self.block_size
        self.carry = np.zeros(0, dtype=np.int64) if final else ids[n * self.block_size :].copy()
        if n == 0:
            return {}
        blocks = torch.from_numpy(ids[: n * self.block_size].copy()).view(n, self.block_size)
        count = torch.full((n,), self.block_size - 1, dtype=torch.long)
        return {"input_ids": blocks, "n_kd": count, "n_ce": count.clone(), "n_tce": count.clone()}


class DualPacker:
    """Dual-tokenizer blocks, cut as :func:`sar_kd.data.pack_dual_blocks` cuts the whole stream. The
    carry is the text after the last cut and both tokenisations of it (at most a few blocks' worth)."""

    def __init__(self, student_tok, teacher_tok, block_size: int) -> None:
        self.toks = {"student": student_tok, "teacher": teacher_tok}
        self.block_size = block_size
        self.reset()

    def reset(self) -> None:
        empty = data._Tokens(np.zeros(0, dtype=np.int64), np.zeros((0, 2), dtype=np.int64))
        self.text, self.sides = "", {"student": empty, "teacher": empty}

    def state(self) -> dict:
        out: dict = {"text": self.text}
        for side, t in self.sides.items():
            out[f"{side}_ids"], out[f"{side}_offsets"] = (
                torch.from_numpy(t.ids.copy()),
                torch.from_numpy(t.offsets.copy()),
            )
        return out

    def load(self, state: dict) -> None:
        self.text = state["text"]
        self.sides = {
            side: data._Tokens(
                state[f"{side}_ids"].numpy().astype(np.int64), state[f"{side}_offsets"].numpy().astype(np.int64)
            )
            for side in ("student", "teacher")
        }

    def feed(self, docs: list[str], final: bool) -> dict[str, torch.Tensor]:
        pieces = data.as_stream(docs)
        origin = len(self.text)
        text = self.text + "".join(pieces)
        sides = {
            side: data._concat_tokens([self.sides[side], data._tokenize_stream(tok, pieces, origin=origin)])
            for side, tok in self.toks.items()
        }
        s_tok, t_tok = self.toks["student"], self.toks["teacher"]
        rows, own, (cut, cs, ct) = data._dual_rows(text, sides, s_tok, t_tok, self.block_size, final=final)
        blocks = data._dual_fill(rows, own, sides, s_tok, t_tok, self.block_size)
        if final:
            self.reset()
        else:  # the rest starts at a clean cut of both tokenisations: keep it, offsets from its first character
            self.text = text[cut:]
            self.sides = {
                side: data._Tokens(sides[side].ids[k:].copy(), sides[side].offsets[k:] - cut)
                for side, k in (("student", cs), ("teacher", ct))
            }
        return blocks


def make_packer(mode: str, teacher_tok, student_tok, block_size: int):
    return LogitPacker(teacher_tok, block_size) if mode == "logit" else DualPacker(student_tok, teacher_tok, block_size)


class BlockSource:
    """The blocks of one streamed split in order, one block (a dict of 1-D tensors) at a time.

    ``open_dataset()`` gives the IterableDataset (called once: this source's own object, so its reader
    state is nobody else's). ``skip``: the first blocks of every epoch that are held out (not yielded).
    ``endless``: start again at the end of the data (a new epoch) instead of stopping."""

    def __init__(
        self, open_dataset, column: str, packer, skip: int = 0, endless: bool = True,
        batch_docs: int = 256, what: str = "the streamed data",
    ) -> None:  # fmt: skip
        self.ds = open_dataset()
        self.files = data.source_files(self.ds)  # {path: identity} of a local file, compared on resume
        self.what = what
        self.text_seen = False  # a document with text was read (else the data is empty)
        self.column, self.packer = column, packer
        self.skip, self.endless, self.batch_docs = skip, endless, batch_docs
        self.it = None
        self._start_epoch(0, None)

    def _start_epoch(self, epoch: int, reader: dict | None) -> None:
        if self.it is not None:
            self.it.close()
        self.epoch = epoch
        self.ds.load_state_dict(reader)  # None: from the start
        self.it = iter(self.ds)
        self.reader = reader  # the reader's state before the next batch of documents
        self.done = False  # the data ended: the last batch was packed with final=True
        self.yielded = 0  # blocks yielded in this epoch
        self.pos = {"index": 0, "reader": reader, "carry": self.packer.state()}  # the current batch's start
        self.queue: dict[str, torch.Tensor] = {}
        self.qi = self.qn = 0
        self.filled = False

    def _fill(self) -> None:
        """Pack the next batch of documents into the queue (the next epoch's first when the data ended)."""
        while True:
            index = self.pos["index"] + self.qn
            if self.done:
                if not self.endless:
                    raise StopIteration
                if self.yielded == 0:
                    raise ConfigError(
                        "the training data holds no block past the held-out validation blocks: give more text, "
                        "a validation source, or a smaller --block_size/--eval_max_batches"
                    )
                self.packer.reset()
                self._start_epoch(self.epoch + 1, None)
                index = 0
            self.pos = {"index": index, "reader": self.reader, "carry": self.packer.state()}
            self.filled = True
            with data.quiet_datasets(f"cannot read {self.what}"):
                rows = list(islice(self.it, self.batch_docs))
            if rows:
                self.reader = self.ds.state_dict()
            docs = data.row_documents([r.get(self.column) for r in rows], self.column)
            self.text_seen = self.text_seen or any(d.strip() for d in docs)
            final = len(rows) < self.batch_docs
            blocks = self.packer.feed(docs, final)
            self.done = final
            self.queue, self.qi = blocks, 0
            self.qn = data.num_blocks(blocks) if blocks else 0
            if self.qn:
                return

    def close(self) -> None:
        """Let go of the reader and its buffers now (not when the garbage collector finds them)."""
        if self.it is not None:
            self.it.close()
        self.it, self.ds, self.queue, self.qn, self.qi = None, None, {}, 0, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        while True:
            while self.qi >= self.qn:
                self._fill()
            i = self.qi
            self.qi += 1
            if self.pos["index"] + i < self.skip:
                continue
            self.yielded += 1
            return {k: v[i].clone() for k, v in self.queue.items()}

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch, "filled": self.filled, "index": self.pos["index"], "reader": self.pos["reader"],
            "carry": self.pos["carry"], "taken": self.qi, "yielded": self.yielded, "files": self.files,
        }  # fmt: skip

    def check_files(self, saved: dict | None) -> None:
        """A ConfigError when a local file read by the checkpointed stream has changed since (its size,
        modification time or sampled contents, :func:`sar_kd.data.same_contents`)."""
        if not saved or not self.files:
            return  # (a hub dataset, or a checkpoint from before the files were recorded)
        for path, ident in saved.items():
            now = self.files.get(path)
            if now is None or not data.same_contents(ident, now):
                what = "is not read any more" if now is None else "changed since the checkpoint was written"
                raise ConfigError(
                    f"cannot resume the stream: {path} {what} (size, modification time or contents differ); "
                    "resume with the same data or start a fresh run"
                )

    def load_state_dict(self, state: dict) -> None:
        self.check_files(state.get("files"))
        self._start_epoch(state["epoch"], state["reader"] if state["filled"] else None)
        if not state["filled"]:
            return
        self.packer.load(state["carry"])
        self.pos = {"index": state["index"], "reader": state["reader"], "carry": state["carry"]}
        self.qn = 0
        self._fill()  # the same documents again, packed into the same blocks
        if self.qn < state["taken"]:  # (a hub dataset whose data changed: the batch packs fewer blocks now)
            raise ConfigError("cannot resume the stream: the streamed data changed since the checkpoint was written")
        self.qi, self.yielded = state["taken"], state["yielded"]


def first_blocks(source: BlockSource, n: int) -> dict[str, torch.Tensor]:
    """The first ``n`` blocks of a (finite) source stacked, or {} when it has none; the source is closed."""
    got = list(islice(source, n))
    source.close()
    return {k: torch.stack([b[k] for b in got]) for k in got[0]} if got else {}


def _stack(blocks: list[dict]) -> dict | None:
    return {k: torch.stack([b[k] for b in blocks]) for k in blocks[0]} if blocks else None


def _unstack(stacked: dict | None) -> list[dict]:
    if not stacked:
        return []
    n = data.num_blocks(stacked)
    return [{k: v[i].clone() for k, v in stacked.items()} for i in range(n)]


class StreamingBatches:
    """Endless micro-batches from a :class:`BlockSource` through a shuffle buffer, resumable exactly.

    Each draw takes a uniformly random block of the buffer (kept full at ``buffer_size`` blocks; 1 means
    the stream's own order). Every process draws the same ``batch_size x world`` blocks per micro-batch
    and keeps ``blocks[rank::world]``: the global batch does not depend on the number of processes."""

    def __init__(self, source: BlockSource, batch_size: int, seed: int, buffer_size: int, rank: int = 0,
                 world: int = 1, held_out: int = 0) -> None:  # fmt: skip
        self.source, self.batch_size, self.buffer_size = source, batch_size, buffer_size
        self.rank, self.world, self.held_out = rank, world, held_out
        self.gen = torch.Generator().manual_seed(seed)
        self.buffer: list[dict] = []
        self.pending: list[dict] | None = None  # a peeked global micro-batch, not yet consumed
        self.state = data.StreamState()

    def _draw(self) -> dict:
        while len(self.buffer) < self.buffer_size:
            self.buffer.append(next(self.source))
        i = int(torch.randint(len(self.buffer), (1,), generator=self.gen))
        out = self.buffer[i]
        self.buffer[i] = self.buffer[-1]
        self.buffer.pop()
        return out

    def _global(self) -> list[dict]:
        return [self._draw() for _ in range(self.batch_size * self.world)]

    def _mine(self, blocks: list[dict]) -> dict[str, torch.Tensor]:
        return _stack(blocks[self.rank :: self.world])

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        blocks = self.pending if self.pending is not None else self._global()
        self.pending = None
        self.state = data.StreamState(self.source.epoch, self.state.position + 1)
        return self._mine(blocks)

    def peek(self) -> dict[str, torch.Tensor]:
        """This process's next micro-batch, without consuming it."""
        if self.pending is None:
            self.pending = self._global()
        return self._mine(self.pending)

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_state(self) -> dict:
        """What ``trainer_state.json`` holds; the buffer, the RNG and the reader are in :data:`STATE_FILE`."""
        return {"epoch": self.state.epoch, "position": self.state.position, "streaming": True, "file": STATE_FILE}

    def state_dict(self) -> dict:
        return {
            "source": self.source.state_dict(), "buffer": _stack(self.buffer), "pending": _stack(self.pending or []),
            "peeked": self.pending is not None, "rng": self.gen.get_state(), "position": self.state.position,
            "held_out": self.held_out, "buffer_size": self.buffer_size,
        }  # fmt: skip

    def save_files(self, where: Path) -> None:
        torch.save(self.state_dict(), Path(where) / STATE_FILE)

    def restore(self, saved: dict, path: Path) -> None:
        if not saved.get("streaming"):
            raise ConfigError(f"--resume_from_checkpoint {path}: written without --streaming; resume without it")
        state = torch.load(Path(path) / saved["file"], weights_only=True)
        if state["held_out"] != self.held_out:
            raise ConfigError(
                f"--resume_from_checkpoint {path}: {state['held_out']} streamed blocks were held out for validation, "
                f"now {self.held_out} (--eval_max_batches x --per_device_batch_size): resume with the same values"
            )
        self.source.load_state_dict(state["source"])
        self.buffer = _unstack(state["buffer"])
        self.pending = _unstack(state["pending"]) if state["peeked"] else None
        self.gen.set_state(state["rng"])
        self.state = data.StreamState(self.source.epoch, state["position"])


def streaming_data(cfg: TrainConfig, mode: str, teacher_tok, student_tok, rank: int, world: int):
    """``(stream, validation blocks, held-out count, the first training blocks)`` of a --streaming run.

    Validation: the dataset's validation split (or --validation_file), its first --eval_max_batches x
    --per_device_batch_size blocks; without one, the first that many blocks of the training stream are
    held out (skipped by training in every epoch). Nothing reads the whole corpus."""

    def open_train():
        return data.text_datasets(cfg, streaming=True)[0]

    _, val_ds = data.text_datasets(cfg, streaming=True)
    name = cfg.train_file or f"dataset {cfg.dataset_name!r}"

    def source(open_dataset=open_train, what=name, **kw) -> BlockSource:
        packer = make_packer(mode, teacher_tok, student_tok, cfg.block_size)
        return BlockSource(open_dataset, cfg.text_column, packer, what=what, **kw)

    n_val = (cfg.eval_max_batches or 0) * cfg.per_device_batch_size if cfg.eval_steps else 0
    held, val = 0, {}
    if val_ds is not None:  # (read even when not evaluating: a bad validation source is refused as without --streaming)
        val_name = cfg.validation_file or f"dataset {cfg.dataset_name!r} (validation)"
        vsrc = source(lambda: val_ds, val_name, endless=False)
        val = first_blocks(vsrc, max(n_val, 1))
        if not val:
            raise ConfigError(
                f"the validation data is empty: no text found in {val_name}"
                if not vsrc.text_seen
                else f"the validation data holds fewer than --block_size {cfg.block_size} tokens"
            )
        if not n_val:
            val = {}
    elif n_val:  # no validation source: the first blocks of the training stream, held out from training
        held = n_val
        val = first_blocks(source(endless=False), held)
    # The first blocks past the held-out ones, at most enough for the shuffle buffer: when the data ends
    # first, one epoch's size is known, and it must fill one global batch; the buffer is capped at it.
    global_batch = cfg.per_device_batch_size * world
    want = max(64, global_batch, cfg.shuffle_buffer_size)
    psrc = source(skip=held, endless=False)
    probe = first_blocks(psrc, want)
    n = data.num_blocks(probe) if probe else 0
    if not probe:
        raise ConfigError(
            f"the training data is empty: no text found in {name}"
            if not psrc.text_seen
            else f"the training data holds fewer than --block_size {cfg.block_size} tokens"
            + (f" past the {held} block(s) held out for validation" if held else "")
            + ": give more text or a smaller block size"
        )
    buffer_size = cfg.shuffle_buffer_size
    if n < want:  # the whole epoch was read: n blocks
        if n < global_batch:
            raise ConfigError(
                f"{n} training block(s) cannot fill one batch of {cfg.per_device_batch_size} x {world} process(es)"
                + (f" (past the {held} held out for validation)" if held else "")
                + ": give more text or a smaller --block_size/--per_device_batch_size"
            )
        if buffer_size > n:
            logger.warning(
                f"--shuffle_buffer_size {buffer_size} is more than the {n} training blocks of one epoch: "
                f"the buffer holds {n} (a larger one would hold the same block twice)"
            )
            buffer_size = n
    probe = {k: v[:64] for k, v in probe.items()}
    src = source(skip=held)
    stream = StreamingBatches(src, cfg.per_device_batch_size, cfg.seed, buffer_size, rank, world, held_out=held)
    return stream, val, held, probe
