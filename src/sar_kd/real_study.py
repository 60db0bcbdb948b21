"""The real-weights study's arms and flags, shared by ``bench/real_weights.py`` and
``sar-kd demo --scenario real`` (see :mod:`sar_kd.real_teacher` for the pair it runs on).

Each part is one :class:`sar_kd.compare.Comparison` paired against CE only:

- ``same``: a random 4-layer student on the teacher's tokenizer (logit KD): CE only; KD with the
  router frozen at the spec's T 2 / α_kd 0.9 and on the temperature/α grid that chose the defaults;
  the spec's joint objective with a learning router; lookahead.
- ``dual``: a random student on a byte-level BPE of 8,192 tokens trained on the distillation text
  (cross-tokenizer logit KD into the teacher's 49,152-token vocabulary): CE only and the grid.
"""

from __future__ import annotations

import json
from pathlib import Path

FROZEN = ["--router_lr", "0", "--router_grad", "native"]
A90 = ["--alpha_kd", "0.9", "--alpha_ce", "0.1"]  # explicit: the defaults depend on the mode
A50 = ["--alpha_kd", "0.5", "--alpha_ce", "0.5"]
ARMS = {
    "same": {
        "ce": ("CE only (no teacher)", ["--alpha_kd", "0", "--alpha_ce", "1", *FROZEN]),
        "kd_t2": ("KD, router frozen, T 2, α_kd 0.9 (the spec's)", ["--temperature", "2", *A90, *FROZEN]),
        "kd_t1": ("KD, router frozen, T 1, α_kd 0.9", ["--temperature", "1", *A90, *FROZEN]),
        "kd_t1_a5": (
            "KD, router frozen, T 1, α_kd 0.5, α_ce 0.5",
            ["--temperature", "1", *A50, *FROZEN],
        ),
        "joint_t1": (
            "SAR-KD joint (router learns, lr 5e-4), T 1",
            ["--temperature", "1", *A90, "--router_lr", "5e-4"],
        ),
        "lookahead_t1": (
            "SAR-KD lookahead (router learns), T 1",
            [
                *A90,
                "--temperature",
                "1",
                "--router_lr",
                "5e-4",
                "--router_objective",
                "lookahead",
                "--router_kl_weight",
                "0.1",
            ],
        ),
    },
    "dual": {
        "ce": ("CE only (no teacher)", ["--alpha_kd", "0", "--alpha_ce", "1", *FROZEN]),
        "xkd_t2": (
            "cross-tokenizer KD, router frozen, T 2, α_kd 0.9 (the spec's)",
            ["--temperature", "2", *A90, *FROZEN],
        ),
        "xkd_t1": ("cross-tokenizer KD, router frozen, T 1, α_kd 0.9", ["--temperature", "1", *A90, *FROZEN]),
        "xkd_t1_a5": (
            "cross-tokenizer KD, router frozen, T 1, α_kd 0.5, α_ce 0.5",
            ["--temperature", "1", *A50, *FROZEN],
        ),
    },
}
DUAL_VOCAB = 8192


def common_flags(paths: dict[str, str], student: str, steps: int) -> list[str]:
    """Flags shared by every arm: 2 × 256 tokens per step, cosine schedule, one evaluation at the start
    and one at the end on 60 held-out blocks (15,360 tokens, the three domains interleaved)."""
    return [
        "--teacher_model", paths["teacher"], "--student_model", student,
        "--train_file", paths["train"], "--validation_file", paths["val"],
        "--block_size", "256", "--per_device_batch_size", "2", "--grad_accum_steps", "1",
        "--train_steps", str(steps), "--student_lr", "1e-3", "--use_scheduler", "--scheduler_type", "cosine",
        "--warmup_steps", str(max(1, steps // 20)), "--eval_steps", str(steps), "--eval_max_batches", "30",
        "--save_steps", "0", "--no_gradient_checkpointing", "--kd_chunk_size", "512", "--cpu",
        "--logging_steps", str(max(1, steps // 10)),
    ]  # fmt: skip


def dual_student(paths: dict[str, str]) -> str:
    """A random student like the same-tokenizer one, on its own BPE (8,192 tokens) of the training text."""
    from .real_teacher import Recipe, student_config
    from .toy import save_random_model, train_bpe_tokenizer

    root = Path(paths["student"]).parent / f"student_bpe{DUAL_VOCAB}"
    if (root / "READY").is_file():
        return str(root)
    docs = [json.loads(x)["text"] for x in Path(paths["train"]).read_text().splitlines()]
    tok = train_bpe_tokenizer(docs, DUAL_VOCAB, root / "tok")
    r = Recipe()
    conf = student_config(r, tok)
    save_random_model(conf, root, seed=r.seed, tokenizer=tok, router_std=None)
    (root / "READY").write_text("ok\n")
    return str(root)


def comparison(part: str, steps: int, paths: dict[str, str], arms: list[str] | None, seeds: list[int], out: Path):
    """The part's :class:`~sar_kd.compare.Comparison` under ``out/<part>-<steps>``."""
    from .compare import Comparison

    student = paths["student"] if part == "same" else dual_student(paths)
    chosen = {k: v for k, v in ARMS[part].items() if arms is None or k in arms}
    return Comparison(
        Path(out) / f"{part}-{steps}",
        common_flags(paths, student, steps),
        {k: flags for k, (_, flags) in chosen.items()},
        seeds,
        baseline="ce",
        labels={k: label for k, (label, _) in chosen.items()},
    )


def run_seconds(cmp) -> dict[str, dict]:
    """Per arm: mean wall seconds per run (evaluations included) and the median over seeds of the
    training seconds per optimizer step (tokens per step / the run's mean tokens per second), which is
    less disturbed by other jobs sharing the machine than the mean."""
    import statistics

    out = {}
    for arm in cmp.arms:
        walls, step_s = [], []
        for seed in cmp.seeds:
            run = cmp.run_dir(arm, seed)
            s = json.loads((run / "summary.json").read_text())
            c = json.loads((run / "sar_kd_config.json").read_text())["config"]
            tokens = c["block_size"] * c["per_device_batch_size"] * c["grad_accum_steps"]
            walls.append(s["wall_time_s"])
            step_s.append(tokens / s["mean_tokens_per_s"])
        out[arm] = {"run_s": statistics.fmean(walls), "step_s": statistics.median(step_s)}
    return out
