"""Benchmark: the optimizer-step time of ``--router_objective lookahead`` against ``joint``.

Real architectures (random weights from the vendored configs), real tokenizers, WikiText text, batch 1,
gradient checkpointing on, as in a real run. Arms: ``joint`` and ``lookahead`` (forward-mode JVP and
finite difference), in same-tokenizer mode (``--modes logit``) and/or with the cross-tokenizer logit
loss (``--modes dual``). Prints one JSON line per (mode, arm) with the best of ``--repeat`` steps after
one warm-up, and the ratio to ``joint``. Target: lookahead <= 1.25x joint.

    python bench/bench_lookahead.py [--block_size 256] [--modes logit dual] [--repeat 2]
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
    "joint": {},
    "lookahead": {"router_objective": "lookahead", "router_kl_weight": 0.1},
    "lookahead_fd": {"router_objective": "lookahead", "router_kl_weight": 0.1, "lookahead_jvp": "finite_difference"},
}


def main() -> None:
    from real_pair import build_trainer

    ap = argparse.ArgumentParser()
    ap.add_argument("--block_size", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=["logit", "dual"])
    ap.add_argument("--arms", nargs="+", default=list(ARMS))
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for mode in a.modes:
        base = None
        for arm in a.arms:
            over = dict(ARMS[arm], **({"dual_loss": "logit"} if mode == "dual" else {}))
            trainer = build_trainer(dev, mode="logit" if mode == "logit" else "hidden", block_size=a.block_size, **over)
            trainer.controller.active = False
            trainer.train_step()  # warm-up
            best = min(trainer.train_step()["step_time_s"] for _ in range(a.repeat))
            trainer.controller.remove()
            base = best if arm == "joint" else base
            row = {
                "bench": "lookahead_step",
                "mode": mode,
                "arm": arm,
                "block_size": a.block_size,
                "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(),
                "cpu": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(),
                "step_ms": round(best * 1000, 1),
                "vs_joint": round(best / base, 3) if base else None,
            }
            print(json.dumps(row), flush=True)
            del trainer


if __name__ == "__main__":
    main()
