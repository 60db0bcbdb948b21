"""``sar-kd plot``: what each panel shows for a CE-only run, a run without evaluations, a demo directory."""

from __future__ import annotations

import json

import matplotlib
import pytest

from sar_kd.cli import main
from sar_kd.config import TrainConfig
from sar_kd.plot import plain_log_axis, run_figure

matplotlib.use("Agg")


def _write_run(path, evals: bool = True, **cfg) -> None:
    """A run directory as the trainer writes it: metrics.jsonl and sar_kd_config.json."""
    path.mkdir(parents=True)
    rows = []
    load = [[0.5, 0.5], [0.3, 0.7]]
    for step in range(0, 7):
        if evals and step % 3 == 0:
            rows.append({"step": step, "student_ppl": 300.0 - 20 * step, "teacher_ppl": 35.0, "eval_tokens": 64,
                         "eval_router_entropy": 0.6, "expert_load": load})  # fmt: skip
        if step:
            rows.append({"step": step, "loss": 5.0 - 0.1 * step, "kd_loss": 0.0, "ce_loss": 5.0 - 0.1 * step,
                         "teacher_ce": 0.0, "router_entropy": 0.0, "router_grad_norm": 0.0,
                         "student_grad_norm": 0.5 + 0.01 * step, "projection_grad_norm": None})  # fmt: skip
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = TrainConfig(train_file="x.txt", **cfg).to_dict()
    (path / "sar_kd_config.json").write_text(json.dumps({"config": config, "mode": "logit", "versions": {}}))


def _labels(ax) -> list[str]:
    return [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]


def _texts(fig) -> str:
    return " ".join(t.get_text() for ax in fig.axes for t in ax.texts)


def test_ce_only_run_shows_only_what_was_trained(tmp_path):
    _write_run(tmp_path / "ce", alpha_kd=0.0, alpha_ce=1.0, router_lr=0.0)
    fig = run_figure(tmp_path / "ce")
    losses, _, entropy, grads = fig.axes[0], fig.axes[1], fig.axes[2], fig.axes[3]
    assert _labels(losses) == ["loss", "ce_loss"]
    assert _labels(grads) == ["student"]
    assert _labels(entropy) == ["validation"]  # no flat-zero training entropy of a frozen router
    assert "router frozen" in _texts(fig)  # the unchanged expert load says why


def test_run_without_evaluations_says_so(tmp_path):
    _write_run(tmp_path / "noeval", evals=False)
    fig = run_figure(tmp_path / "noeval")
    assert _labels(fig.axes[1]) == [] and "no evaluation" in _texts(fig)
    assert _labels(fig.axes[0]) == ["loss", "kd_loss", "ce_loss"]  # teacher_ce weight 0 by default


def test_log_axis_ticks_are_plain_and_near_the_focus():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [33.5, 37.4])
    plain_log_axis(ax, 33.5, 37.4, [33.53, 37.38])
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert "34" in labels and "37" in labels
    assert all(lab.replace(".", "").isdigit() for lab in labels), labels  # no 3.6×10¹
    plt.close(fig)


def test_plot_of_a_demo_directory_plots_each_run(tmp_path, capsys):
    demo = tmp_path / "demo"
    for name in ("ce_only-seed0", "sarkd-seed0"):
        _write_run(demo / "runs" / name)
    assert main(["plot", str(demo)]) == 0
    printed = capsys.readouterr().out
    for name in ("ce_only-seed0", "sarkd-seed0"):
        assert (demo / "runs" / name / "training_curves.png").stat().st_size > 10_000
        assert name in printed


def test_plot_of_a_directory_without_runs_names_where_it_looked(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "runs/*/" in capsys.readouterr().err


@pytest.mark.parametrize("lo, hi", [(1e-4, 1.0), (0.45, 0.8), (100, 800), (33.5, 33.6)])
def test_log_axis_keeps_a_readable_number_of_ticks(lo, hi):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    plain_log_axis(ax, lo, hi)
    assert 2 <= len(ax.get_yticks()) <= 9
    plt.close(fig)
