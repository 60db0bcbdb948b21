"""Benchmark: the step time of the baselines against a learning router, at the real widths.

Real architectures (random weights from the vendored configs), real tokenizers, WikiText text,
batch 1, gradient checkpointing on, dual-tokenizer mode (the default pair). Arms:

* ``sar_kd``: the router learns (``--router_lr 5e-4``, all-experts straight-through gradient);
* ``frozen_router``: ``--router_lr 0`` (KD from a fixed teacher): the teacher should run natively
  (top-k experts only) without autograd;
* ``ce_only``: ``--alpha_kd 0 --router_lr 0``: the teacher should not run at all while training.

Prints one JSON line per arm with the best of ``--repeat`` optimizer steps (after one warm-up).
Works on any checkout of the package, so the same command measures the code before and after a change.

    python bench/bench_baselines.py [--block_size 256] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

ARMS = {
    "sar_kd": {},
    "frozen_router": {"router_lr": 0.0},
    "ce_only": {"router_lr": 0.0, "alpha_kd": 0.0},
}


def main() -> None:
    from real_pair import build_trainer

    ap = argparse.ArgumentParser()
    ap.add_argument("--block_size", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--arms", nargs="+", default=list(ARMS))
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for arm in a.arms:
        trainer = build_trainer(dev, mode="hidden", block_size=a.block_size, **ARMS[arm])
        trainer.controller.active = False  # the trainer decides (older versions: set per window)
        trainer.train_step()  # warm-up (allocates optimizer state)
        runs = [trainer.train_step() for _ in range(a.repeat)]
        trainer.controller.remove()
        best = min(r["step_time_s"] for r in runs)
        print(
            json.dumps(
                {
                    "bench": "baseline_step",
                    "arm": arm,
                    "block_size": a.block_size,
                    "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(),
                    "cpu": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(),
                    "step_ms": round(best * 1000, 1),
                    "router_grad_norm": runs[-1]["router_grad_norm"],
                }
            ),
            flush=True,
        )
        del trainer


if __name__ == "__main__":
    main()
