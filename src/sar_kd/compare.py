"""``sar-kd compare``: named arms × seeds through the real trainer, with paired verdicts.

Each arm is a set of training flags added to a common command line; every (arm, seed) is one run of
:class:`sar_kd.trainer.Trainer` in ``OUTPUT/runs/<arm>-seed<N>/``. A run whose ``summary.json``
exists is finished and skipped, so an interrupted comparison resumes where it stopped (an unfinished
run restarts from its latest checkpoint when it has one, else from scratch). A saved run whose flags
differ from its arm's is refused before anything trains, or run again from scratch with
``--restart_changed``; it is never resumed or reused.

Per arm the report gives the final student and teacher bits per byte and perplexity as mean ± sample
standard deviation, min and max over seeds; against the baseline arm, the **paired** difference per
seed (same seed, same data order) with a two-sided 95% Student-t confidence interval, and a verdict:
``better`` (interval entirely below 0: lower bits per byte), ``worse`` (entirely above 0), or
``no difference at this budget``. Bits per byte is the headline: it puts students and teachers with
different tokenizers on one scale. Outputs: a Markdown table on stdout, ``compare.json`` and
``compare.png`` (student and teacher curves, mean over seeds).

    sar-kd compare --output_dir outputs/cmp --seeds 0 1 2 --baseline frozen \\
        --arm frozen="--router_lr 0" --arm sarkd="--router_lr 5e-4" \\
        -- --teacher_model T --student_model S --train_file train.txt --train_steps 200
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError

logger = logging.getLogger("sar_kd")

# Two-sided 95% quantiles t_{0.975, df} of Student's t distribution, df = 1..30 (beyond: 1.96 + 2.4/df).
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
METRICS = ("student_bpb", "teacher_bpb", "student_ppl", "teacher_ppl")


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}: the two-sided 95% quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError("a confidence interval needs at least two paired values")
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.4 / df


def spread(values: list[float]) -> dict[str, float | int]:
    """Mean, sample standard deviation (0 for one value), min, max and count of ``values``."""
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def paired_difference(arm: list[float], baseline: list[float]) -> dict:
    """Paired differences ``arm_i − baseline_i`` (same seeds): mean, sd, 95% CI and a verdict.

    Lower perplexity is better, so an interval entirely below 0 is ``better``. With one pair there
    is no interval and no verdict.
    """
    if len(arm) != len(baseline):
        raise ValueError("paired values need the same seeds on both sides")
    diffs = [a - b for a, b in zip(arm, baseline)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"diffs": diffs, "mean": mean, "sd": None, "ci95": None, "verdict": "one seed: no verdict"}
    sd = statistics.stdev(diffs)
    half = t_quantile_975(len(diffs) - 1) * sd / math.sqrt(len(diffs))
    lo, hi = mean - half, mean + half
    verdict = "better" if hi < 0 else "worse" if lo > 0 else "no difference at this budget"
    return {"diffs": diffs, "mean": mean, "sd": sd, "ci95": [lo, hi], "verdict": verdict}


@dataclass
class Comparison:
    """Arms (name -> extra training flags) × seeds over common flags, written under ``output_dir``."""

    output_dir: Path
    common: list[str]
    arms: dict[str, list[str]]
    seeds: list[int]
    baseline: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    restart_changed: bool = False  # re-run (from scratch) a saved run whose flags differ, instead of refusing

    def run_dir(self, arm: str, seed: int) -> Path:
        return self.output_dir / "runs" / f"{arm}-seed{seed}"

    def run_args(self, arm: str, seed: int) -> list[str]:
        """The full command line of one run (the arm's flags and the seed win over the common ones)."""
        return [*self.common, *self.arms[arm], "--seed", str(seed), "--output_dir", str(self.run_dir(arm, seed))]

    def validate(self) -> None:
        from .config import config_from_args

        if not self.arms:
            raise ConfigError("compare: no arms given (--arm NAME='FLAGS')")
        if self.baseline is not None and self.baseline not in self.arms:
            raise ConfigError(f"compare: --baseline {self.baseline!r} is not one of the arms {sorted(self.arms)}")
        if not self.seeds:
            raise ConfigError("compare: no seeds given (--seeds N [N ...])")
        twice = sorted({s for s in self.seeds if self.seeds.count(s) > 1})
        if twice:  # one run paired twice would narrow the interval with no new evidence
            raise ConfigError(
                f"compare: --seeds {' '.join(map(str, self.seeds))} names seed "
                f"{', '.join(map(str, twice))} more than once; give each seed once"
            )
        for arm in self.arms:  # every arm's command line must be a valid run before anything trains
            try:
                cfg = config_from_args(self.run_args(arm, self.seeds[0]))
            except ConfigError as e:
                raise ConfigError(f"compare: arm {arm!r}: {e}") from None
            if not cfg.eval_steps:  # the verdict is on the final evaluation: a run without one has nothing to pair
                raise ConfigError(
                    f"compare: arm {arm!r}: --eval_steps 0 leaves the run without a final evaluation, which the "
                    "comparison pairs; give --eval_steps N > 0 (--eval_steps equal to --train_steps evaluates only "
                    "before training and at the end)"
                )

    def run(self, progress=None) -> None:
        """Train every unfinished (arm, seed); ``progress(i, n, arm, seed)`` is called before each.

        A run (finished, or interrupted with checkpoints) whose saved flags differ from what this
        comparison would run is refused before anything trains, or restarted from scratch with
        ``restart_changed``: resuming it would report a mixture of both flag sets as this arm."""
        from .checkpointing import list_checkpoints
        from .config import config_from_args
        from .trainer import Trainer

        restart = set()
        for arm in self.arms:
            for seed in self.seeds:
                if self._changed_flags(arm, seed):
                    restart.add((arm, seed))
        todo = [
            (a, s)
            for s in self.seeds
            for a in self.arms
            if (a, s) in restart or not (self.run_dir(a, s) / "summary.json").is_file()
        ]
        for i, (arm, seed) in enumerate(todo):
            if progress is not None:
                progress(i, len(todo), arm, seed)
            args = self.run_args(arm, seed)
            run_dir = self.run_dir(arm, seed)
            if run_dir.is_dir() and list_checkpoints(run_dir) and (arm, seed) not in restart:
                args += ["--resume_from_checkpoint", "latest"]
            elif run_dir.is_dir():
                args += ["--overwrite_output_dir"]
            Trainer(config_from_args(args)).run()

    def _changed_flags(self, arm: str, seed: int) -> list[str]:
        """``key old -> new`` for each flag in which a run this comparison would reuse (finished, or
        resumed from its checkpoints) differs from the arm's; refused unless ``restart_changed``."""
        from .checkpointing import RUN_CONFIG, list_checkpoints
        from .config import config_from_args, with_mode_alphas

        run_dir = self.run_dir(arm, seed)
        finished = (run_dir / "summary.json").is_file()
        checkpoints = list_checkpoints(run_dir) if run_dir.is_dir() else []
        if not finished and not checkpoints:
            return []  # started from scratch anyway
        # the run's latest start and, for a resume, the checkpoint whose state would be continued
        saved = [run_dir / RUN_CONFIG] + ([checkpoints[-1] / RUN_CONFIG] if checkpoints and not finished else [])
        new = config_from_args(self.run_args(arm, seed)).to_dict()
        ignore = {"output_dir", "overwrite_output_dir", "resume_from_checkpoint"}
        diffs: dict[str, str] = {}
        for path in saved:
            if not path.is_file():
                continue
            record = json.loads(path.read_text())
            old, resolved = record["config"], with_mode_alphas(new, record.get("mode"))
            for k in resolved:
                if k not in ignore and old.get(k) != resolved[k]:
                    diffs.setdefault(k, f"{k} {json.dumps(old.get(k))} -> {json.dumps(resolved[k])}")
        if diffs and not self.restart_changed:
            what = "was made" if finished else "was interrupted and its checkpoints were made"
            raise ConfigError(
                f"compare: run {arm}-seed{seed} {what} with other flags ({', '.join(diffs[k] for k in sorted(diffs))}): "
                f"pass --restart_changed to run it again from scratch with this arm's flags, remove {run_dir}, "
                "or use another --output_dir"
            )
        return sorted(diffs)

    def results(self) -> dict:
        """Per-arm spreads and paired differences against the baseline, from the runs' summaries.

        A metric missing from any run's summary (runs written before bits per byte was reported) is
        left out rather than paired over fewer seeds."""
        finals: dict[str, dict[str, list[float | None]]] = {}
        initial: dict[str, float | None] = {}
        ce_only: set[str] = set()
        for arm in self.arms:
            finals[arm] = {m: [] for m in METRICS}
            for seed in self.seeds:
                path = self.run_dir(arm, seed) / "summary.json"
                if not path.is_file():
                    raise ConfigError(f"compare: run {arm}-seed{seed} has not finished (no {path})")
                s = json.loads(path.read_text())
                for m in METRICS:
                    finals[arm][m].append(s.get(f"final_{m}"))
                for m in ("teacher_ppl", "teacher_bpb"):
                    if initial.get(m) is None:
                        initial[m] = s.get(f"initial_{m}")
            saved = self.run_dir(arm, self.seeds[0]) / "sar_kd_config.json"
            if saved.is_file() and json.loads(saved.read_text())["config"].get("alpha_kd") == 0:
                ce_only.add(arm)
        metrics = [m for m in METRICS if all(v is not None for vals in finals.values() for v in vals[m])]
        out: dict = {"seeds": self.seeds, "baseline": self.baseline, "initial": initial, "arms": {}}
        for arm, vals in finals.items():
            row = {m: {**spread(vals[m]), "values": vals[m]} for m in metrics}
            if self.baseline is not None and arm != self.baseline:
                row["vs_baseline"] = {m: paired_difference(vals[m], finals[self.baseline][m]) for m in metrics}
            for m in ("teacher_ppl", "teacher_bpb"):
                if initial.get(m) and m in row:
                    row[f"{m}_change"] = row[m]["mean"] / initial[m] - 1
            out["arms"][arm] = row
        t0 = initial.get("teacher_bpb")
        out["notes"] = [
            f"the teacher ({t0:.4f} bits/byte before distillation) is no better than the CE-only student of arm "
            f"{arm!r} ({out['arms'][arm]['student_bpb']['mean']:.4f}): it cannot help this student"
            for arm in sorted(ce_only)
            if t0 is not None and "student_bpb" in out["arms"][arm] and out["arms"][arm]["student_bpb"]["mean"] <= t0
        ]
        return out


def format_table(results: dict, labels: dict[str, str] | None = None) -> str:
    """A Markdown table of :meth:`Comparison.results`: bits per byte first (the paired verdict is on the
    student's bits per byte), perplexity beside it; runs without bits per byte fall back to perplexity."""
    labels = labels or {}

    def ms(s: dict, digits: int) -> str:
        return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f} (min {s['min']:.{digits}f}, max {s['max']:.{digits}f})"

    base = results["baseline"]
    rows = results["arms"].values()
    key = "student_bpb" if all("student_bpb" in r for r in rows) else "student_ppl"
    digits = 4 if key == "student_bpb" else 2
    if key == "student_bpb":
        head = (
            "| arm | student bits/byte | student ppl | teacher bits/byte after | teacher ppl after "
            "| student bits/byte vs baseline (paired, 95% CI) |"
        )
    else:
        head = "| arm | student ppl | teacher ppl after | student vs baseline (paired, 95% CI) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for arm, row in results["arms"].items():
        d = row.get("vs_baseline", {}).get(key)
        if d is None:
            verdict = "baseline" if arm == base else "—"
        elif d["ci95"] is None:
            verdict = f"{d['mean']:+.{digits}f} ({d['verdict']})"
        else:
            lo, hi = d["ci95"]
            verdict = f"{d['mean']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]: **{d['verdict']}**"
        if key == "student_bpb":
            cells = [
                ms(row["student_bpb"], 4),
                ms(row["student_ppl"], 2),
                ms(row["teacher_bpb"], 4),
                ms(row["teacher_ppl"], 2),
            ]
        else:
            cells = [ms(row["student_ppl"], 2), ms(row["teacher_ppl"], 2)]
        lines.append(f"| {labels.get(arm, arm)} | " + " | ".join(cells) + f" | {verdict} |")
    lines += [f"\nNote: {n}" for n in results.get("notes", [])]
    return "\n".join(lines)


def plot_comparison(cmp: Comparison, path: Path, labels: dict[str, str] | None = None) -> None:
    """Student and teacher validation bits per byte (perplexity for runs written before it was reported)
    against step, mean over seeds, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    labels = labels or {}
    shown = _plotted_metrics(cmp)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = ["-", "--", "-.", ":"]
    for i, arm in enumerate(cmp.arms):
        curves: dict[int, dict[str, list[float]]] = {}
        for seed in cmp.seeds:
            path_m = cmp.run_dir(arm, seed) / "metrics.jsonl"
            if not path_m.is_file():
                continue
            for line in path_m.read_text().splitlines():
                row = json.loads(line)
                if "student_ppl" in row:
                    for m in shown:
                        curves.setdefault(row["step"], {k: [] for k in shown})[m].append(row.get(m, math.nan))
        steps = sorted(curves)
        for ax, m in zip(axes, shown):
            ax.plot(
                steps,
                [statistics.fmean(curves[s][m]) for s in steps],
                styles[i % len(styles)],
                marker="o",
                markersize=3,
                alpha=0.85,
                label=labels.get(arm, arm),
            )
    for ax, m in zip(axes, shown):
        ax.set_yscale("log")
        fmt = ScalarFormatter()
        fmt.set_scientific(False)
        ax.yaxis.set_major_formatter(fmt)
        ax.yaxis.set_minor_formatter(fmt)
        ax.set_xlabel("optimizer step")
        ax.set_title(f"{m.replace('_', ' ')} (validation, mean over {len(cmp.seeds)} seeds)")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plotted_metrics(cmp: Comparison) -> tuple[str, str]:
    """Bits per byte when every finished run's final summary has it, else perplexity."""
    for arm in cmp.arms:
        for seed in cmp.seeds:
            path = cmp.run_dir(arm, seed) / "summary.json"
            if path.is_file() and "final_student_bpb" not in json.loads(path.read_text()):
                return ("student_ppl", "teacher_ppl")
    return ("student_bpb", "teacher_bpb")


def _parse_arm(text: str) -> tuple[str, list[str]]:
    name, sep, flags = text.partition("=")
    if not sep or not name.strip():
        raise ConfigError(f"--arm {text!r}: expected NAME='FLAGS' (e.g. frozen='--router_lr 0')")
    return name.strip(), shlex.split(flags)


def compare_main(argv: list[str] | None = None) -> int:
    """Run arms × seeds through the trainer and report paired verdicts against a baseline."""
    argv = list(argv or [])
    common: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, common = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(
        prog="sar-kd compare",
        description=compare_main.__doc__,
        epilog="Training flags common to every arm go after '--' (same flags as sar-kd train).",
    )
    p.add_argument("--output_dir", required=True, help="Where runs/, compare.json and compare.png go.")
    p.add_argument(
        "--arm", action="append", default=[], metavar="NAME='FLAGS'", help="An arm: a name and its extra flags."
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Seeds (each arm runs every seed).")
    p.add_argument("--baseline", default=None, help="The arm the others are compared with (paired per seed).")
    p.add_argument(
        "--restart_changed",
        action="store_true",
        help="Run again from scratch every saved run (finished or interrupted) whose flags differ from its arm's; "
        "without it such a run is refused, never resumed or reused.",
    )
    a = p.parse_args(argv)
    arms = dict(_parse_arm(t) for t in a.arm)
    if len(arms) != len(a.arm):
        raise ConfigError("compare: two arms share a name")
    cmp = Comparison(Path(a.output_dir), common, arms, a.seeds, a.baseline, restart_changed=a.restart_changed)
    cmp.validate()
    cmp.output_dir.mkdir(parents=True, exist_ok=True)
    cmp.run(lambda i, n, arm, seed: logger.info("compare: run %d/%d: %s seed %d", i + 1, n, arm, seed))
    results = cmp.results()
    (cmp.output_dir / "compare.json").write_text(json.dumps(results, indent=2))
    plot_comparison(cmp, cmp.output_dir / "compare.png")
    print(format_table(results))
    return 0
