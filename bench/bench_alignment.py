"""Benchmark: dual-tokenizer alignment + projection + MSE (forward and backward) for one sample.

Compares the tensor implementation used in training with a per-token Python loop computing the
same loss, at the real widths (teacher 1024, student 576), on real tokenizations of WikiText
(1024 student tokens). Prints one JSON line. Optional: --full_step also times a full training
step of the real architectures (random weights, built from the configs) to put the alignment in
proportion.

    python bench/bench_alignment.py [--full_step] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from sar_kd import alignment

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def real_tokenizers():
    from transformers import AutoTokenizer

    from fixture_files import unpack_real_tokenizers

    dirs = unpack_real_tokenizers(Path(tempfile.mkdtemp()))
    return AutoTokenizer.from_pretrained(dirs["smollm"]), AutoTokenizer.from_pretrained(dirs["qwen3"])


def sample(block: int = 1024):
    from sar_kd.data import pack_dual_blocks

    s_tok, t_tok = real_tokenizers()
    from fixture_files import wikitext_text

    text = wikitext_text().splitlines()[:2000]
    blocks = pack_dual_blocks(text, s_tok, t_tok, block)
    i = int(blocks["student_mask"].sum(1).argmax())  # the fullest block
    return {k: v[i : i + 1] for k, v in blocks.items()}


def loop_loss(s_off, t_off, n_s, n_t, hs, ht, proj):
    """The reference's approach: a Python loop over student tokens building each overlap row."""
    total, count = hs.new_zeros(()), 0
    for i in range(n_s):
        ss, se = int(s_off[i, 0]), int(s_off[i, 1])
        ws, rows = [], []
        for j in range(n_t):
            ov = min(se, int(t_off[j, 1])) - max(ss, int(t_off[j, 0]))
            if ov > 0:
                ws.append(ov)
                rows.append(j)
        if not ws:
            continue
        w = torch.tensor(ws, dtype=hs.dtype) / sum(ws)
        target = proj((w[:, None] * ht[rows]).sum(0))
        total = total + (hs[i] - target).pow(2).mean()
        count += 1
    return total / count


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--full_step", action="store_true", help="also time one full training step at the real widths")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    dev = torch.device(a.device)
    b = {k: v.to(dev) for k, v in sample().items()}
    n_s, n_t = int(b["student_mask"].sum()), int(b["teacher_mask"].sum())
    torch.manual_seed(0)
    hs = torch.randn(1, 1024, 576, device=dev, requires_grad=True)
    ht = torch.randn(1, 1024, 1024, device=dev, requires_grad=True)
    proj = torch.nn.Linear(1024, 576).to(dev)

    def tensor_version():
        w, aligned = alignment.overlap_alignment(
            b["student_offsets"], b["student_mask"], b["teacher_offsets"], b["teacher_mask"]
        )
        loss = alignment.hidden_mse_sum(hs, ht, w, aligned, proj) / aligned.sum()
        loss.backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return loss

    def loop_version():
        loss = loop_loss(b["student_offsets"][0].cpu(), b["teacher_offsets"][0].cpu(), n_s, n_t, hs[0], ht[0], proj)
        loss.backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return loss

    l_tensor, l_loop = float(tensor_version().detach()), float(loop_version().detach())
    result = {
        "bench": "alignment_projection_mse_fwd_bwd",
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "student_tokens": n_s,
        "teacher_tokens": n_t,
        "loss_tensor": l_tensor,
        "loss_loop": l_loop,
        "tensor_ms": timed(tensor_version, a.repeat),
        "loop_ms": timed(loop_version, max(1, a.repeat // 3)),
    }
    result["speedup"] = result["loop_ms"] / result["tensor_ms"]
    if a.full_step:
        sys.path.insert(0, str(ROOT / "bench"))
        from real_pair import full_step_ms

        result["full_step_ms"] = full_step_ms(dev)
        result["alignment_share_of_step"] = result["tensor_ms"] / result["full_step_ms"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
