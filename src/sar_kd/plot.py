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


def read_run_config(out: Path) -> dict:
    """The options a run was trained with (``sar_kd_config.json``), or ``{}`` when absent."""
    try:
        return json.loads((out / "sar_kd_config.json").read_text())["config"]
    except (OSError, ValueError, KeyError):
        return {}


def find_runs(root: Path) -> list[Path]:
    """Run directories below a demo or comparison directory: ``root/runs/*/`` or ``root/*/``."""
    return sorted(p.parent for p in [*root.glob("runs/*/metrics.jsonl"), *root.glob("*/metrics.jsonl")])


def plain_log_axis(ax, lo: float, hi: float, focus: list[float] = ()) -> None:
    """Log-scale y axis over the data range [lo, hi] (plus a margin) with plainly written ticks
    (36, 40, not 3.6×10¹), some of them close to ``focus``.

    Matplotlib puts major ticks only at powers of ten; a range such as 33–38 then gets scientific
    minor labels. Here the ticks are round numbers spread over the range, plus a few round numbers
    at the values the reader is after (the final perplexities).
    """
    import numpy as np
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator

    ax.set_yscale("log")
    lo = max(lo, 1e-12)
    pad = max((max(hi, lo) / lo) ** 0.05, 1.01)  # a margin of 5% of the (log) range
    lo, hi = lo / pad, max(hi, lo) * pad
    span = np.log(hi / lo)
    decades = range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)
    ticks: list[float] = []
    for mantissas in ((1,), (1, 2, 5), (1, 1.5, 2, 3, 5, 7), tuple(range(1, 10))):  # sparse to dense
        denser = [m * 10.0**k for k in decades for m in mantissas if lo <= m * 10.0**k <= hi]
        if ticks and len(denser) > 8:
            break
        ticks = denser
        if len(ticks) >= 4:
            break
    if len(ticks) < 4:  # a narrow range: round numbers in linear steps
        ticks = [t for t in MaxNLocator(nbins=6, steps=[1, 2, 5, 10]).tick_values(lo, hi) if lo <= t <= hi]
    # a tick at each focus value, rounded (to an integer from 10 up), placed first so that it wins
    rounded = {float(f"{v:.0f}" if v >= 10 else f"{v:.2g}") for v in focus if v == v}
    near = sorted(v for v in rounded if lo <= v <= hi)
    ticks = near + ticks
    kept: list[float] = []
    for t in ticks:  # earlier (focus) ticks win; drop any that would print on top of a kept one
        if all(abs(np.log(t / k)) > 0.04 * span for k in kept):
            kept.append(t)
    ax.set_ylim(lo, hi)
    ax.yaxis.set_major_locator(FixedLocator(sorted(kept)))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.4g}"))


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True, color="0.35")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_run(out: Path, png: Path | None = None) -> Path:
    """Render losses, perplexities, router entropy and per-layer expert load to ``png``."""
    import matplotlib.pyplot as plt

    fig = run_figure(out)
    png = png or out / "training_curves.png"
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


def run_figure(out: Path):
    """The figure of :func:`plot_run`. Terms the run did not train (weight 0, ``router_lr`` 0) are
    left out rather than drawn flat, and a run without evaluations says so in place of empty axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, evals = read_metrics(out)
    if not steps:
        raise ConfigError(f"{out}/metrics.jsonl holds no training steps yet")
    cfg = read_run_config(out)
    # a weight left unset (None) takes its mode's default, which is > 0
    trained = {
        k: (v := cfg.get(key, 1)) is None or v > 0
        for k, key in (
            ("kd_loss", "alpha_kd"),
            ("ce_loss", "alpha_ce"),
            ("teacher_ce", "router_teacher_ce_weight"),
            ("router", "router_lr"),
        )
    }
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    x = [r["step"] for r in steps]

    ax = axes[0, 0]
    for key in ("loss", "kd_loss", "ce_loss", "teacher_ce"):
        ys = [r.get(key) for r in steps]
        if trained.get(key, True) and any(y is not None for y in ys):
            ax.plot(x, ys, label=key)
    ax.set_title("training losses (per token)")
    ax.set_xlabel("optimizer step")
    ax.legend()

    ax = axes[0, 1]
    ax.set_title("validation perplexity")
    if evals:
        ex = [r["step"] for r in evals]
        s_ppl, t_ppl = [r["student_ppl"] for r in evals], [r["teacher_ppl"] for r in evals]
        ax.plot(ex, s_ppl, "o-", label="student")
        ax.plot(ex, t_ppl, "s--", label="teacher")
        vals = [v for v in s_ppl + t_ppl if v == v and v > 0]
        if vals:
            plain_log_axis(ax, min(vals), max(vals), [s_ppl[-1], t_ppl[-1]])
        ax.set_xlabel("optimizer step")
        ax.legend()
    else:
        _note(ax, "no evaluation in this run\n(--eval_steps 0, or it stopped before the first)")

    ax = axes[0, 2]
    if trained["router"]:  # a frozen router's entropy is not computed while training
        ax.plot(x, [r["router_entropy"] for r in steps], label="train (batch)")
    if evals and "eval_router_entropy" in evals[0]:
        ax.plot([r["step"] for r in evals], [r["eval_router_entropy"] for r in evals], "o-", label="validation")
    ax.set_title("routing entropy (nats)" + ("" if trained["router"] else ", router frozen"))
    ax.set_xlabel("optimizer step")
    ax.legend()

    ax = axes[1, 0]
    norms = {"router": trained["router"], "student": True, "projection": True}
    shown = []
    for name in (n for n, on in norms.items() if on):
        ys = [r.get(f"{name}_grad_norm") for r in steps]
        ys = [float("nan") if y is None else y for y in ys]
        if any(y == y and y > 0 for y in ys):
            ax.plot(x, ys, label=name)
            shown += [y for y in ys if y == y and y > 0]
    if shown:
        plain_log_axis(ax, min(shown), max(shown))
    ax.set_title("gradient norm (before clipping)" + ("" if trained["router"] else "; router frozen"))
    ax.set_xlabel("optimizer step")
    ax.legend()

    loads = [r["expert_load"] for r in evals if "expert_load" in r]
    if loads:
        import numpy as np
        from matplotlib.ticker import FuncFormatter, MaxNLocator

        first, last = np.array(loads[0]), np.array(loads[-1])
        im = axes[1, 1].imshow(last, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        axes[1, 1].set_title(f"expert load per layer (step {evals[-1]['step']})")
        fig.colorbar(im, ax=axes[1, 1], label="fraction of tokens")
        span = float(abs(last - first).max())
        if span > 0:
            im = axes[1, 2].imshow(last - first, aspect="auto", cmap="coolwarm", vmin=-span, vmax=span)
            axes[1, 2].set_title(f"change in expert load since step {evals[0]['step']}")
            cb = fig.colorbar(im, ax=axes[1, 2], label="change in fraction of tokens")
            # plain labels: a "1e-3" offset printed above the bar would sit on the panel's title
            cb.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:+.2g}" if v else "0"))
        else:
            _note(
                axes[1, 2],
                f"expert load unchanged since step {evals[0]['step']}"
                + ("" if trained["router"] else "\n(router frozen)"),
            )
        for a in (axes[1, 1], axes[1, 2])[: 2 if span > 0 else 1]:
            a.set_xlabel("expert")
            a.set_ylabel("MoE layer")
            a.xaxis.set_major_locator(MaxNLocator(integer=True))
            a.yaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        _note(axes[1, 1], "expert load: no evaluation in this run")
        axes[1, 2].axis("off")
    fig.suptitle(f"SAR-KD run: {out}")
    fig.tight_layout()
    return fig


def plot_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="sar-kd plot",
        description="Render a run's training curves to a PNG. Given a demo directory (runs in runs/<arm>-seed<N>/) "
        "or any directory of runs, plot each run.",
    )
    p.add_argument("output_dir", help="A SAR-KD output directory (holding metrics.jsonl), or a directory of runs.")
    p.add_argument("--png", default=None, help="Where to write the picture (default OUTPUT/training_curves.png).")
    a = p.parse_args(argv)
    out = Path(a.output_dir)
    if (out / "metrics.jsonl").is_file() or not out.is_dir():
        print(plot_run(out, Path(a.png) if a.png else None))
        return 0
    runs = find_runs(out)
    if not runs:
        raise ConfigError(
            f"{out}: no metrics.jsonl here nor in {out}/runs/*/ or {out}/*/ (not a SAR-KD output directory?)"
        )
    if a.png:
        raise ConfigError(f"--png names one picture but {out} holds {len(runs)} runs; leave it out")
    for run in runs:
        print(plot_run(run))
    if (out / "demo_curves.png").is_file():
        print(f"(the demo's comparison of all runs: {out / 'demo_curves.png'})")
    return 0
