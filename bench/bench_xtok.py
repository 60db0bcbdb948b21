"""Benchmark: the cross-tokenizer logit loss (forward + backward) for one sample, and the real pair's statistics.

At the real widths (teacher hidden 1024, student 576) and vocabularies (Qwen3 151,669 of 151,936 head
rows; SmolLM 49,152), with the heads as random ``nn.Linear`` (the student's trainable, the teacher's
frozen but differentiable into its hidden states), on the fullest 1024-token WikiText block of the
real tokenizers. The hidden-state MSE loss of dual mode (alignment + projection + MSE) is timed next
to it. Peak memory is the growth of the process's resident set over the call, sampled by a thread.
Then the statistics of the real pair on all of WikiText-2 validation: vocabulary map size and build /
cached-load time, and the chunk shapes of the alignment. Prints JSON lines.

    python bench/bench_xtok.py [--repeat 2] [--chunk_size 256] [--full_step] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from sar_kd import alignment, vocab_map, xtok

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

TEACHER_HEAD_ROWS = 151936


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak growth over the block: CUDA's allocator peak on a GPU, else the resident set (sampled)."""

    def __init__(self, dev: torch.device):
        self.dev, self.peak, self._stop = dev, 0, threading.Event()

    def __enter__(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def real_tokenizers():
    from transformers import AutoTokenizer

    from fixture_files import unpack_real_tokenizers

    dirs = unpack_real_tokenizers(Path(tempfile.mkdtemp()))
    return AutoTokenizer.from_pretrained(dirs["smollm"]), AutoTokenizer.from_pretrained(dirs["qwen3"])


def timed(fn, repeat: int, dev: torch.device) -> tuple[float, float]:
    """(best ms, peak MiB of the first timed call) after one warm-up call."""
    fn()
    best, peak = float("inf"), None
    for _ in range(repeat):
        with PeakMemory(dev) as mem:
            t0 = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        peak = mem.mib if peak is None else peak
    return best * 1000, peak


def map_stats(s_tok, t_tok) -> tuple[vocab_map.VocabMap, dict]:
    t0 = time.perf_counter()
    vmap = vocab_map.build_vocab_map(t_tok, s_tok)
    build_s = time.perf_counter() - t0
    cache = tempfile.mkdtemp()
    vocab_map.load_or_build_vocab_map(t_tok, s_tok, cache)  # builds and writes
    t0 = time.perf_counter()
    cached = vocab_map.load_or_build_vocab_map(t_tok, s_tok, cache)
    load_s = time.perf_counter() - t0
    assert torch.equal(cached.teacher_to_bucket, vmap.teacher_to_bucket)
    n_other_t = int((vmap.teacher_to_bucket == vmap.other_bucket).sum()) if vmap.other_bucket >= 0 else 0
    n_other_s = int((vmap.student_to_bucket == vmap.other_bucket).sum()) if vmap.other_bucket >= 0 else 0
    return vmap, {
        "bench": "vocab_map",
        "num_buckets": vmap.num_buckets,
        "teacher_vocab": len(t_tok),
        "student_vocab": len(s_tok),
        "teacher_exact_tokens": int(vmap.teacher_exact.sum()),
        "student_exact_tokens": int(vmap.student_exact.sum()),
        "teacher_tokens_in_other": n_other_t,
        "student_tokens_in_other": n_other_s,
        "build_s": round(build_s, 3),
        "cached_load_s": round(load_s, 3),
    }


def wikitext_stats(blocks: dict, vmap: vocab_map.VocabMap) -> dict:
    """Chunk shapes over all blocks, by character offsets alone and with the byte refinement."""
    out = {"bench": "xtok_wikitext_stats", "blocks": len(blocks["student_ids"])}
    n_s = int(blocks["student_mask"].sum())
    n_t = int(blocks["teacher_mask"].sum())
    out.update(student_tokens=n_s, teacher_tokens=n_t)
    for tag, by_bytes in (("chars", False), ("bytes", True)):
        acc = {k: 0 for k in ("one_to_one", "many_to_one", "one_to_many", "many_to_many", "none", "chunks", "pairs")}
        same, t_exact_pairs, align_s = 0, 0, 0.0
        for i in range(0, len(blocks["student_ids"]), 16):
            sl = slice(i, i + 16)
            extra = (blocks["student_ids"][sl], blocks["teacher_ids"][sl], vmap) if by_bytes else ()
            t0 = time.perf_counter()
            al = xtok.chunk_alignment(
                blocks["student_offsets"][sl],
                blocks["student_mask"][sl],
                blocks["teacher_offsets"][sl],
                blocks["teacher_mask"][sl],
                *extra,
            )
            align_s += time.perf_counter() - t0
            sc, tc = al.student_count, al.teacher_count
            acc["one_to_one"] += int(sc[(sc == 1) & (tc == 1)].sum())
            acc["many_to_one"] += int(sc[(sc > 1) & (tc == 1)].sum())
            acc["one_to_many"] += int(sc[(sc == 1) & (tc > 1)].sum())
            acc["many_to_many"] += int(sc[(sc > 1) & (tc > 1)].sum())
            acc["none"] += int(((al.student_chunk < 0) & al.student_valid).sum())
            acc["chunks"] += int(((sc > 0) & (tc > 0)).sum())
            acc["pairs"] += len(al.pairs)
            r, j, k = al.pairs.unbind(1)
            s_id, t_id = blocks["student_ids"][sl][r, j], blocks["teacher_ids"][sl][r, k]
            exact = vmap.student_exact[s_id] & vmap.teacher_exact[t_id]
            same += int((exact & (vmap.student_to_bucket[s_id] == vmap.teacher_to_bucket[t_id])).sum())
            t_exact_pairs += int(vmap.teacher_exact[t_id].sum())
        out[f"{tag}_student_frac_one_to_one"] = acc["one_to_one"] / n_s
        out[f"{tag}_student_frac_many_to_one"] = acc["many_to_one"] / n_s
        out[f"{tag}_student_frac_one_to_many"] = acc["one_to_many"] / n_s
        out[f"{tag}_student_frac_many_to_many"] = acc["many_to_many"] / n_s
        out[f"{tag}_student_frac_no_chunk"] = acc["none"] / n_s
        out[f"{tag}_chunk_frac_one_to_one"] = acc["pairs"] / max(1, acc["chunks"])
        out[f"{tag}_pairs_byte_identical"] = same / max(1, acc["pairs"])
        out[f"{tag}_align_ms_per_block"] = 1000 * align_s / len(blocks["student_ids"])
    # What a teacher that predicts the actual next token puts on exact shared tokens (no weights here).
    t_ids = blocks["teacher_ids"][blocks["teacher_mask"].bool()]
    s_ids = blocks["student_ids"][blocks["student_mask"].bool()]
    out["teacher_tokens_exact_frac"] = float(vmap.teacher_exact[t_ids].float().mean())
    out["student_tokens_exact_frac"] = float(vmap.student_exact[s_ids].float().mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--chunk_size", type=int, default=256, help="rows per checkpointed slice (kd_chunk_size)")
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--full_step", action="store_true", help="also time one full dual-mode training step")
    a = ap.parse_args()
    dev = torch.device(a.device)
    from fixture_files import wikitext_text
    from sar_kd.data import pack_dual_blocks

    s_tok, t_tok = real_tokenizers()
    vmap, mstats = map_stats(s_tok, t_tok)
    print(json.dumps(mstats), flush=True)

    t0 = time.perf_counter()
    blocks = pack_dual_blocks(wikitext_text().splitlines(), s_tok, t_tok, 1024)
    pack_s = time.perf_counter() - t0
    stats = wikitext_stats(blocks, vmap)
    stats["pack_dual_blocks_s"] = round(pack_s, 2)
    print(json.dumps(stats), flush=True)

    i = int(blocks["student_mask"].sum(1).argmax())  # the fullest block
    b = {k: v[i : i + 1].to(dev) for k, v in blocks.items()}
    vm = vmap.to(dev)
    torch.manual_seed(0)
    hs = torch.randn(1, 1024, 576, device=dev, requires_grad=True)
    ht = torch.randn(1, 1024, 1024, device=dev, requires_grad=True)
    s_lin = torch.nn.Linear(576, len(s_tok), bias=False).to(dev)
    t_lin = torch.nn.Linear(1024, TEACHER_HEAD_ROWS, bias=False).to(dev).requires_grad_(False)
    n_t = len(t_tok)

    def teacher_head(h):
        return t_lin(h)[:, :n_t]

    proj = torch.nn.Linear(1024, 576).to(dev)
    last = {}

    def mse_version():
        w, aligned = alignment.overlap_alignment(
            b["student_offsets"], b["student_mask"], b["teacher_offsets"], b["teacher_mask"]
        )
        loss = alignment.hidden_mse_sum(hs, ht, w, aligned, proj) / aligned.sum()
        loss.backward()

    def xtok_version():
        al = xtok.chunk_alignment(
            b["student_offsets"], b["student_mask"], b["teacher_offsets"], b["teacher_mask"],
            b["student_ids"], b["teacher_ids"], vm,
        )  # fmt: skip
        out = xtok.xtok_loss_sums(
            hs, ht, s_lin, teacher_head, b["student_ids"], b["teacher_ids"], al, vm, a.temperature, a.chunk_size
        )
        ((out["kl_sum"] + out["chunk_sum"]) / out["student_tokens"]).backward()
        last.update({k: float(v.detach()) for k, v in out.items()})

    def align_only():
        xtok.chunk_alignment(
            b["student_offsets"], b["student_mask"], b["teacher_offsets"], b["teacher_mask"],
            b["student_ids"], b["teacher_ids"], vm,
        )  # fmt: skip

    al0 = xtok.chunk_alignment(
        b["student_offsets"], b["student_mask"], b["teacher_offsets"], b["teacher_mask"],
        b["student_ids"], b["teacher_ids"], vm,
    )  # fmt: skip
    r, j, k = al0.pairs.unbind(1)

    def heads_floor():
        """The two heads alone on the pairs' rows, sliced and checkpointed like the loss: its matmul floor."""
        total = hs.new_zeros(())
        for head, rows in ((s_lin, hs[r, j - 1]), (teacher_head, ht[r, k - 1])):
            for start in range(0, len(rows), a.chunk_size):
                sl = rows[start : start + a.chunk_size]
                total = total + checkpoint(lambda x, head=head: head(x).float().sum(), sl, use_reentrant=False)
        total.backward()

    mse_ms, mse_mib = timed(mse_version, a.repeat, dev)
    floor_ms, _ = timed(heads_floor, a.repeat, dev)
    xtok_ms, xtok_mib = timed(xtok_version, a.repeat, dev)
    align_ms, _ = timed(align_only, a.repeat, dev)
    result = {
        "bench": "xtok_loss_fwd_bwd",
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_avg_1min": os.getloadavg()[0],
        "student_tokens": int(b["student_mask"].sum()),
        "teacher_tokens": int(b["teacher_mask"].sum()),
        "chunk_size": a.chunk_size,
        "temperature": a.temperature,
        "hidden_mse_ms": round(mse_ms, 1),
        "hidden_mse_peak_mib": round(mse_mib, 1),
        "xtok_ms": round(xtok_ms, 1),
        "xtok_peak_mib": round(xtok_mib, 1),
        "xtok_alignment_ms": round(align_ms, 2),
        "xtok_over_mse": round(xtok_ms / mse_ms, 1),
        "heads_floor_ms": round(floor_ms, 1),
        "xtok_over_heads_floor": round(xtok_ms / floor_ms, 2),
        "n_pairs": int(last["n_pairs"]),
        "n_chunks": int(last["n_chunks"]),
        "student_tokens_in_chunks": int(last["student_tokens_in_chunks"]),
        "random_head_teacher_mass_on_exact": last["mass_sum"] / max(1, last["n_pairs"]),
    }
    if a.full_step:
        sys.path.insert(0, str(ROOT / "bench"))
        from real_pair import full_step_ms

        result["full_step_ms"] = full_step_ms(dev)
        result["xtok_share_of_step"] = xtok_ms / result["full_step_ms"]
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
