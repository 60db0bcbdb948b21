"""Benchmark: one SAR-KD optimizer step at the real widths, against its unavoidable parts.

Real architectures (random weights from the vendored configs), real tokenizers, WikiText text,
batch 1, gradient checkpointing on (as in a real run). Measures, in the same process:

* ``step_ms``: ``Trainer.train_step`` (teacher + student forward/backward, losses, router terms,
  optimizer update);
* ``teacher_fb_ms``: teacher forward with the straight-through router hook + backward to the routers
  (through its LM head in logit mode, where KD needs the teacher's logits);
* ``student_fb_ms``: student forward + CE + backward;
* ``update_ms``: gradient norms, clipping, AdamW and scheduler inside that step;
* ``overhead_ratio`` = step / (teacher + student parts), target ≤ 1.10, and
  ``overhead_ratio_with_update`` = step / (teacher + student + update);
* ``tokens_per_s``: student tokens per second of a full step.

``--kd_impl fused checkpoint`` (logit mode) times the step once per implementation of the chunked
KD loss (``chunked_lm_losses(fused=...)``), in the same process against the same parts, and adds
``loss_saved_mb``: the tensors the logit losses keep for the backward pass (saved-tensor hooks), and
``step_peak_mb``: the step's peak memory above its start (CUDA allocator, or sampled RSS on a CPU).
Steps of the implementations are interleaved (and so are the two parts), so that a change of load on
a shared machine hits all alike.

Prints one JSON line per mode (and implementation).
    python bench/bench_step.py [--block_size 256] [--modes hidden logit] [--kd_impl fused checkpoint]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def _time(fn, repeat: int, sync) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best * 1000


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs."""
    seen: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def bench_mode(mode: str, block: int, dev: torch.device, dtype: str, repeat: int, impls=("fused",)) -> list[dict]:
    import functools

    from real_pair import build_trainer

    from sar_kd import losses

    trainer = build_trainer(dev, mode=mode, block_size=block, model_dtype=dtype)
    m = trainer.model
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    batch = {k: v.to(dev) for k, v in next(iter(trainer.stream)).items()}
    t_ids = batch["input_ids"] if mode == "logit" else batch["teacher_ids"]
    t_mask = None if mode == "logit" else batch["teacher_mask"]
    s_ids = batch["input_ids"] if mode == "logit" else batch["student_ids"]
    s_mask = None if mode == "logit" else batch["student_mask"]
    acc = trainer.accelerator

    def teacher_part():
        with acc.autocast():
            out, _ = m._teacher_body(t_ids, t_mask)
            if mode == "logit":  # KD needs the teacher's logits: its LM head is part of the teacher's work
                t_labels = losses.shift_labels(t_ids, t_mask)
                probe = losses.chunked_ce(out.last_hidden_state, m.teacher.get_output_embeddings(), t_labels, 256)
            else:
                probe = out.last_hidden_state.float().pow(2).mean()
        probe.backward()
        m.teacher.zero_grad(set_to_none=True)

    def student_part():
        with acc.autocast():
            out = m._student_body(s_ids, s_mask)
            labels = losses.shift_labels(s_ids, s_mask)
            ce = losses.chunked_ce(out.last_hidden_state, m.student.get_output_embeddings(), labels, 256)
        ce.backward()
        m.student.zero_grad(set_to_none=True)

    from bench_kd_chunks import Peak

    original = losses.chunked_lm_losses
    impls = tuple(impls) if mode == "logit" else ("fused",)

    def step(impl):
        """One train_step with the given KD implementation; its result and peak memory above entry."""
        losses.chunked_lm_losses = functools.partial(original, fused=impl == "fused")
        try:
            trainer.controller.active = True
            with Peak(dev) as pk:
                out = trainer.train_step()
        finally:
            losses.chunked_lm_losses = original
        return out, pk.bytes

    for impl in impls:
        step(impl)  # warm-up (allocates optimizer state)
    runs = {impl: [] for impl in impls}
    for _ in range(repeat):  # interleaved, so that a change of load on a shared machine hits both alike
        for impl in impls:
            runs[impl].append(step(impl))
    steps = {}
    for impl in impls:
        saved = None
        if mode == "logit":  # what the KD/CE losses keep for the backward pass (one micro-batch)
            losses.chunked_lm_losses = functools.partial(original, fused=impl == "fused")

            def loss_only():
                with acc.autocast():
                    m._logit_sums(batch, {"kd": 1.0, "ce": 1.0, "tce": 1.0})

            try:
                saved = _saved_bytes(loss_only) - _saved_bytes(lambda: None)
            finally:
                losses.chunked_lm_losses = original
            m.zero_grad(set_to_none=True)
        best = min(runs[impl], key=lambda r: r[0]["step_time_s"])[0]
        peak = max(r[1] for r in runs[impl])
        steps[impl] = (best, saved, peak)
    trainer.controller.active = True
    teacher_ms = student_ms = float("inf")
    for _ in range(repeat):  # interleaved too
        teacher_ms = min(teacher_ms, _time(teacher_part, 1, sync))
        student_ms = min(student_ms, _time(student_part, 1, sync))
    tokens = int(batch["n_ce"].sum()) + 1
    trainer.controller.remove()
    return [_row(mode, impl, best, saved, peak, teacher_ms, student_ms, tokens, block, dev, dtype)
            for impl, (best, saved, peak) in steps.items()]  # fmt: skip


def _row(mode, impl, best, saved, peak, teacher_ms, student_ms, tokens, block, dev, dtype) -> dict:
    step_ms, update_ms = best["step_time_s"] * 1000, best["update_time_s"] * 1000
    return {
        "bench": "train_step",
        "mode": mode,
        "kd_impl": impl if mode == "logit" else None,
        "loss_saved_mb": round(saved / 2**20, 1) if saved is not None else None,
        "step_peak_mb": round(peak / 2**20, 1),  # above the memory at the step's start (sampled RSS on a CPU)
        "model_dtype": dtype,
        "block_size": block,
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "step_ms": round(step_ms, 1),
        "teacher_fb_ms": round(teacher_ms, 1),
        "student_fb_ms": round(student_ms, 1),
        "update_ms": round(update_ms, 1),
        "overhead_ratio": round(step_ms / (teacher_ms + student_ms), 3),
        "overhead_ratio_with_update": round(step_ms / (teacher_ms + student_ms + update_ms), 3),
        "tokens_per_s": round(tokens / (step_ms / 1000), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--block_size", type=int, default=256)
    ap.add_argument("--model_dtype", default="float32")
    ap.add_argument("--modes", nargs="+", default=["hidden", "logit"])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--kd_impl", nargs="+", default=["fused"], choices=["fused", "checkpoint"])
    a = ap.parse_args()
    for mode in a.modes:
        for row in bench_mode(mode, a.block_size, torch.device(a.device), a.model_dtype, a.repeat, a.kd_impl):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
