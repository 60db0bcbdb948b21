"""``sar-kd plot OUTPUT``: training curves and router statistics of a run, as one PNG."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .config import ConfigError


def read_metrics(out: Path) -> tuple[list[dict], list[dict]]:
    """(step rows, evaluation rows) of ``out/metrics.jsonl``."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{out}: no metrics.jsonl (not a SAR-KD output directory?)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r], [r for r in rows if "student_ppl" in r]


def plot_run(out: Path, png: Path | None = None) -> Path:
    """Render losses, perplexities, router entropy and per-layer expert load to ``png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, evals = read_metrics(out)
    if not steps:
        raise ConfigError(f"{out}/metrics.jsonl holds no training steps yet")
    png = png or out / "training_curves.png"
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    x = [r["step"] for r in steps]

    ax = axes[0, 0]
    for key in ("loss", "kd_loss", "ce_loss", "teacher_ce"):
        ys = [r.get(key) for r in steps]
        if any(y is not None for y in ys):
            ax.plot(x, ys, label=key)
    ax.set_title("training losses (per token)")
    ax.set_xlabel("optimizer step")
    ax.legend()

    ax = axes[0, 1]
    if evals:
        ex = [r["step"] for r in evals]
        ax.plot(ex, [r["student_ppl"] for r in evals], "o-", label="student")
        ax.plot(ex, [r["teacher_ppl"] for r in evals], "s-", label="teacher")
        ax.set_yscale("log")
        ax.legend()
    ax.set_title("validation perplexity")
    ax.set_xlabel("optimizer step")

    ax = axes[0, 2]
    ax.plot(x, [r["router_entropy"] for r in steps], label="train (batch)")
    if evals and "eval_router_entropy" in evals[0]:
        ax.plot([r["step"] for r in evals], [r["eval_router_entropy"] for r in evals], "o-", label="validation")
    ax.set_title("routing entropy (nats)")
    ax.set_xlabel("optimizer step")
    ax.legend()

    ax = axes[1, 0]
    ax.plot(x, [r["router_grad_norm"] for r in steps], label="router")
    ax.plot(x, [r.get("student_grad_norm", float("nan")) for r in steps], label="student")
    ax.set_yscale("log")
    ax.set_title("gradient norm (before clipping)")
    ax.set_xlabel("optimizer step")
    ax.legend()

    loads = [r["expert_load"] for r in evals if "expert_load" in r]
    if loads:
        import numpy as np

        first, last = np.array(loads[0]), np.array(loads[-1])
        im = axes[1, 1].imshow(last, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        axes[1, 1].set_title(f"expert load per layer (step {evals[-1]['step']})")
        fig.colorbar(im, ax=axes[1, 1])
        span = max(float(abs(last - first).max()), 1e-6)
        im = axes[1, 2].imshow(last - first, aspect="auto", cmap="coolwarm", vmin=-span, vmax=span)
        axes[1, 2].set_title("change in expert load since the first evaluation")
        fig.colorbar(im, ax=axes[1, 2])
        from matplotlib.ticker import MaxNLocator

        for a in (axes[1, 1], axes[1, 2]):
            a.set_xlabel("expert")
            a.set_ylabel("MoE layer")
            a.xaxis.set_major_locator(MaxNLocator(integer=True))
            a.yaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        for a in (axes[1, 1], axes[1, 2]):
            a.axis("off")
    fig.suptitle(f"SAR-KD run: {out}")
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


def plot_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sar-kd plot", description="Render a run's training curves to a PNG.")
    p.add_argument("output_dir", help="A SAR-KD output directory (holding metrics.jsonl).")
    p.add_argument("--png", default=None, help="Where to write the picture (default OUTPUT/training_curves.png).")
    a = p.parse_args(argv)
    png = plot_run(Path(a.output_dir), Path(a.png) if a.png else None)
    print(png)
    return 0
