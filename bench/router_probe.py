"""Reproduce docs/router_gradient.md: which router-gradient estimator descends the objective?

Uses the demo's cached teacher and student (built on first use, as `sar-kd demo` does). Each probe is
one 150-step run through the real trainer (seed 0, router_lr 1e-3 unless stated). Prints one JSON line
per probe: the student's and the teacher's validation perplexity before and after.

    python bench/router_probe.py                 # all probes (~1 min each on 2 CPU cores)
    python bench/router_probe.py --only tce_topk tce_all
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from sar_kd.demo import Arm, prepare, run_arm

PROBES = {
    # routers trained on the teacher's own CE only (the student trains on CE; no KD pull on the teacher)
    "tce_topk": Arm("teacher CE, straight_through_topk", 0.0, 1.0, 1e-3, 1.0, "straight_through_topk"),
    "tce_all": Arm("teacher CE, straight_through", 0.0, 1.0, 1e-3, 1.0, "straight_through"),
    "tce_dense": Arm("teacher CE, dense", 0.0, 1.0, 1e-3, 1.0, "dense"),
    # the spec's joint objective
    "sarkd_topk": Arm("SAR-KD, straight_through_topk", 0.9, 0.1, 1e-3, 0.0, "straight_through_topk"),
    "sarkd_all": Arm("SAR-KD, straight_through", 0.9, 0.1, 1e-3, 0.0, "straight_through"),
    "sarkd_all_tce": Arm("SAR-KD + teacher CE, straight_through", 0.9, 0.1, 1e-3, 1.0, "straight_through"),
    "sarkd_topk_lr1e-4": Arm("SAR-KD, straight_through_topk, lr 1e-4", 0.9, 0.1, 1e-4, 0.0, "straight_through_topk"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="+", choices=list(PROBES), default=list(PROBES))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache_dir", default=str(Path.home() / ".cache" / "sar_kd" / "demo"))
    ap.add_argument("--output_dir", default="outputs/router_probe")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    paths = prepare(Path(a.cache_dir), "same", 600)
    for key in a.only:
        r = run_arm(paths, PROBES[key], a.seed, a.steps, Path(a.output_dir) / key, max(1, a.steps // 3))
        s = r["summary"]
        print(json.dumps({
            "probe": key, "arm": PROBES[key].name, "seed": a.seed, "steps": a.steps,
            "student_ppl": round(s["final_student_ppl"], 2),
            "teacher_ppl_before": round(s["initial_teacher_ppl"], 2), "teacher_ppl_after": round(s["final_teacher_ppl"], 2),
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
