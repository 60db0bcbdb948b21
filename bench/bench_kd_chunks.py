"""Benchmark: chunked vs unchunked KD loss at vocabulary 151,936 and 1024 tokens (forward + backward).

Hidden states of the real widths (teacher 1024, student 576) and two LM heads of 151,936 rows; the
chunked loss (sar_kd.losses.chunked_lm_losses) against the same sums over full-sequence logits.
Peak memory: CUDA allocator peak on a GPU, sampled resident memory on the CPU (above the inputs);
``saved_mb``: what autograd keeps for the backward pass after the forward (saved-tensor hooks).
Variants: ``full``, ``chunked`` (checkpointed chunks, ``fused=False``), ``fused`` (sar_kd.fused_kd:
gradients in the forward pass). ``--freeze_teacher_head``: the teacher's head gets no gradient, as in
training. Prints one JSON line.
    python bench/bench_kd_chunks.py [--tokens 1024] [--chunk 256] [--variants full chunked fused]
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import torch

from sar_kd import losses


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class Peak:
    """Peak memory above the level at entry (CUDA allocator, or sampled RSS on the CPU)."""

    def __init__(self, dev: torch.device):
        self.dev = dev

    def __enter__(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = rss()
            self.peak = self.base
            self.stop = threading.Event()

            def sample():
                while not self.stop.is_set():
                    self.peak = max(self.peak, rss())
                    time.sleep(0.001)

            self.th = threading.Thread(target=sample, daemon=True)
            self.th.start()
        return self

    def __exit__(self, *exc):
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop.set()
            self.th.join()
            self.bytes = self.peak - self.base


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--variants", nargs="+", default=["full", "chunked", "fused"])
    ap.add_argument("--freeze_teacher_head", action="store_true")
    a = ap.parse_args()
    dev = torch.device(a.device)
    torch.manual_seed(0)
    hs = torch.randn(1, a.tokens, 576, device=dev, requires_grad=True)
    ht = torch.randn(1, a.tokens, 1024, device=dev, requires_grad=True)
    head_s = torch.nn.Linear(576, a.vocab, bias=False).to(dev)
    head_t = torch.nn.Linear(1024, a.vocab, bias=False).to(dev)
    labels = torch.randint(0, a.vocab, (1, a.tokens), device=dev)
    labels[:, -1] = losses.IGNORE_INDEX
    head_t.requires_grad_(not a.freeze_teacher_head)

    def chunked(backward=True, fused=False):
        kd, ce, _ = losses.chunked_lm_losses(hs, ht, head_s, head_t, labels, 2.0, a.chunk, fused=fused)
        if backward:
            (kd + ce).backward()
        return kd

    def fused(backward=True):
        return chunked(backward, fused=True)

    def full(backward=True):
        ls = head_s(hs).reshape(-1, a.vocab)
        lt = head_t(ht).reshape(-1, a.vocab)
        flat = labels.reshape(-1)
        kd = losses.kd_kl_loss(ls, lt, flat, 2.0)
        if backward:
            (kd + losses.ce_loss(ls, flat)).backward()
        return kd

    def saved_bytes(fn) -> int:
        seen: dict[int, int] = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(backward=False)
        return sum(seen.values())

    out = {
        "bench": "kd_loss_chunked_vs_full",
        "device": a.device,
        "tokens": a.tokens,
        "vocab": a.vocab,
        "chunk": a.chunk,
        "teacher_head_trainable": not a.freeze_teacher_head,
    }
    fns = {"full": full, "chunked": chunked, "fused": fused}
    for name in a.variants:
        fn = fns[name]
        out[f"{name}_saved_mb"] = round(saved_bytes(fn) / 2**20, 1)
        fn()  # warm-up
        for t in (hs, ht, head_s.weight, head_t.weight):
            t.grad = None
        with Peak(dev) as pk:
            t0 = time.perf_counter()
            val = fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) * 1000
        out[f"{name}_ms"] = round(ms, 1)
        out[f"{name}_peak_mb"] = round(pk.bytes / 2**20, 1)
        out[f"{name}_kd"] = float(val.detach())
        for t in (hs, ht, head_s.weight, head_t.weight):
            t.grad = None
    if "full" in a.variants and "chunked" in a.variants:
        out["memory_saving"] = round(out["full_peak_mb"] / max(out["chunked_peak_mb"], 1e-9), 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
