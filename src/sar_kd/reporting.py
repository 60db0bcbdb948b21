"""What a run reports: the progress line or bar, the per-step dual-mode statistics, the final summary."""

from __future__ import annotations

import logging
import sys
from typing import Any

logger = logging.getLogger("sar_kd")


def dual_metrics(sums: dict[str, float], dual_loss: str) -> dict[str, float | None]:
    """Dual-mode statistics of one window: hidden MSE per aligned token, alignment coverage, and the
    cross-tokenizer terms (KL per one-to-one pair, chunk loss per other chunk, the fraction of student
    tokens in one-to-one chunks, the teacher's probability mass on exactly shared tokens)."""
    out: dict[str, float | None] = {}
    if dual_loss in ("hidden", "both"):
        out["hidden_mse"] = sums["hidden_mse_sum"] / max(sums["aligned_tokens"], 1.0)
        out["align_coverage"] = sums["aligned_tokens"] / max(sums["student_tokens"], 1.0)
    if dual_loss in ("logit", "both"):
        pairs, chunks = max(sums["xtok_n_pairs"], 1.0), max(sums["xtok_n_chunks"], 1.0)
        out["xtok_kl"] = sums["xtok_kl_sum"] / pairs
        out["xtok_chunk_loss"] = sums["xtok_chunk_sum"] / chunks if sums["xtok_n_chunks"] else None
        out["xtok_one_to_one"] = sums["xtok_student_tokens_in_pairs"] / max(sums["xtok_student_tokens"], 1.0)
        out["xtok_mass"] = sums["xtok_mass_sum"] / pairs
    return out


def mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


class Progress:
    """tqdm on a terminal; plain log lines otherwise."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.enabled = enabled
        self.total = total
        self.tty = enabled and sys.stderr.isatty()
        self.bar = None
        if self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="sar-kd", dynamic_ncols=True)

    def update_to(self, step: int, m: dict[str, Any], elapsed: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr_student']:.2e}", tok_s=f"{m['tokens_per_s']:.0f}")
        else:
            eta = elapsed / max(step, 1) * (self.total - step)
            tce = "" if m["teacher_ce"] is None else f" teacher_ce {m['teacher_ce']:.4f}"
            logger.info(
                "step %d/%d loss %.4f kd %.4f ce %.4f%s router_grad %.2e lr %.2e tok/s %.0f eta %.0fs",
                step, self.total, m["loss"], m["kd_loss"], m["ce_loss"], tce,
                m["router_grad_norm"], m["lr_student"], m["tokens_per_s"], eta,
            )  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_eval(step: int, row: dict[str, Any]) -> str:
    """One log line per evaluation: both models in bits per byte (one scale whatever their tokenizers)
    and perplexity (each on its own tokens)."""
    return (
        f"eval step {step}: student {row['student_bpb']:.4f} bits/byte (ppl {row['student_ppl']:.2f}), "
        f"teacher {row['teacher_bpb']:.4f} bits/byte (ppl {row['teacher_ppl']:.2f}) on {row['eval_bytes']:,} bytes"
    )


def teacher_vs_student(student_bpb: float, teacher_bpb: float) -> str:
    """How far the student is behind its teacher per byte, and a warning when the teacher is no better."""
    if teacher_bpb >= student_bpb:
        return (
            f"the teacher ({teacher_bpb:.4f} bits/byte) is no better than the student ({student_bpb:.4f}) on the "
            "validation text: it has nothing left to teach here (a teacher worse per byte than the student "
            "cannot help it; compare with a CE-only run, --alpha_kd 0)"
        )
    return f"student {student_bpb:.4f} bits/byte, teacher {teacher_bpb:.4f}: the student is {student_bpb - teacher_bpb:.4f} behind"


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        "run summary",
        f"  steps {s['steps']} ({s['skipped_steps']} skipped), wall time {s['wall_time_s']:.1f}s, "
        f"{(s['mean_tokens_per_s'] or 0):.0f} tokens/s",
    ]
    for k in ("student_bpb", "teacher_bpb", "student_ppl", "teacher_ppl", "eval_router_entropy"):
        if s.get(f"final_{k}") is not None and s.get(f"initial_{k}") is not None:
            lines.append(f"  {k}: {s[f'initial_{k}']:.4f} -> {s[f'final_{k}']:.4f}")
        elif s.get(f"final_{k}") is not None:  # resumed from a checkpoint that does not carry the initial numbers
            lines.append(f"  {k}: {s[f'final_{k}']:.4f} (initial not known)")
    if s.get("final_student_bpb") is not None:
        lines.append("  " + teacher_vs_student(s["final_student_bpb"], s["final_teacher_bpb"]))
    if "final_expert_load" in s:
        initial = s.get("initial_expert_load") or [None] * len(s["final_expert_load"])
        for i, (a, b) in enumerate(zip(initial, s["final_expert_load"])):
            lines.append(f"  router {i} expert load: {a} -> {b}" if a is not None else f"  router {i} expert load: {b}")
    lines.append(f"  outputs in {s['output_dir']}: student/, router_update.safetensors, metrics.jsonl")
    return "\n".join(lines)
