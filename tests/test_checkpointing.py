"""Checkpoints are never stale: overwrite replaces the old run, resume refuses another configuration."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import base_args
from sar_kd.checkpointing import clear_previous_run, list_checkpoints, resolve_checkpoint, resume_mismatches
from sar_kd.cli import main
from sar_kd.config import config_from_args


def _steps(out: Path) -> list[int]:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def run_a(tiny_pair, tmp_path_factory):
    """Six steps with checkpoints at 2, 4 and 6."""
    out = tmp_path_factory.mktemp("a") / "out"
    assert main(["train", *base_args(tiny_pair, out, train_steps=6, save_steps=2, eval_steps=0)]) == 0
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(run, out)
    return out


def test_overwrite_removes_the_previous_runs_checkpoints(run_a, tiny_pair, tmp_path):
    out = _copy(run_a, tmp_path)
    (out / "notes.txt").write_text("mine")  # not written by a run: left alone
    args = base_args(tiny_pair, out, train_steps=2, save_steps=2, eval_steps=0, student_lr=5e-5)
    assert main(["train", *args, "--overwrite_output_dir"]) == 0
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    latest = resolve_checkpoint(str(out), "latest")
    assert json.loads((latest / "sar_kd_config.json").read_text())["config"]["student_lr"] == 5e-5
    assert _steps(out) == [1, 2]
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert (out / "notes.txt").read_text() == "mine"
    # and with --save_total_limit no higher-numbered checkpoint of the old run outlives the new ones
    out2 = _copy(run_a, tmp_path / "limited")
    args = base_args(tiny_pair, out2, train_steps=4, save_steps=2, eval_steps=0, save_total_limit=1)
    assert main(["train", *args, "--overwrite_output_dir"]) == 0
    assert [p.name for p in out2.glob("checkpoint-*")] == ["checkpoint-4"]


def test_clear_previous_run_only_touches_run_files(tmp_path):
    for name in ("checkpoint-3", "checkpoint-5.tmp", "student", "checkpoint-notes", "logs"):
        (tmp_path / name).mkdir()
    for name in ("metrics.jsonl", "summary.json", "sar_kd_config.json", "router_update.pt", "data.txt"):
        (tmp_path / name).write_text("x")
    clear_previous_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-notes", "data.txt", "logs"]


@pytest.mark.parametrize(
    ("flag", "value", "shown"), [("block_size", 32, "block_size 64 -> 32"), ("seed", 7, "seed 42 -> 7")]
)
def test_resume_with_other_data_settings_is_refused(run_a, tiny_pair, tmp_path, capsys, flag, value, shown):
    out = _copy(run_a, tmp_path)
    before = (out / "metrics.jsonl").read_text()
    args = base_args(tiny_pair, out, train_steps=8, save_steps=2, eval_steps=0, resume_from_checkpoint="latest")
    rc = main(["train", *args, f"--{flag}", str(value)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert rc == 2 and len(err) == 1, err
    assert shown in err[0] and "checkpoint-6" in err[0]
    assert (out / "metrics.jsonl").read_text() == before  # nothing touched
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


def test_resume_with_more_steps_is_allowed(run_a, tiny_pair, tmp_path):
    out = _copy(run_a, tmp_path)
    args = base_args(tiny_pair, out, train_steps=8, save_steps=2, eval_steps=0, resume_from_checkpoint="latest")
    assert main(["train", *args, "--student_lr", "5e-4"]) == 0  # steps and learning rates may change
    assert _steps(out) == list(range(1, 9))
    assert json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())["step"] == 8


def test_resume_from_an_earlier_checkpoint_drops_the_later_ones(run_a, tiny_pair, tmp_path):
    out = _copy(run_a, tmp_path)
    args = base_args(tiny_pair, out, train_steps=3, save_steps=2, eval_steps=0,
                     resume_from_checkpoint=str(out / "checkpoint-2"))  # fmt: skip
    assert main(["train", *args]) == 0
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert _steps(out) == [1, 2, 3]


def test_another_world_size_is_refused(run_a, tiny_pair, tmp_path):
    cp = run_a / "checkpoint-6"
    assert json.loads((cp / "trainer_state.json").read_text())["num_processes"] == 1
    cfg = config_from_args(base_args(tiny_pair, tmp_path / "o", train_steps=6, save_steps=2, eval_steps=0))
    assert resume_mismatches(cp, cfg, 1) == []
    assert resume_mismatches(cp, cfg, 2) == ["processes 1 -> 2"]
    cfg.per_device_batch_size, cfg.router_patterns = 1, ["gate"]
    assert resume_mismatches(cp, cfg, 1) == ["per_device_batch_size 2 -> 1", 'router_patterns null -> ["gate"]']


def test_overwrite_leaves_a_folder_without_a_run_alone(tmp_path):
    from sar_kd.checkpointing import clear_previous_run

    folder = tmp_path / "mine"
    (folder / "student").mkdir(parents=True)
    (folder / "student" / "MY_NOTES.txt").write_text("keep me")
    (folder / "metrics.jsonl").write_text("{}\n")
    assert clear_previous_run(folder) == []
    assert (folder / "student" / "MY_NOTES.txt").is_file() and (folder / "metrics.jsonl").is_file()


def test_output_dir_holding_the_student_is_refused(tiny_pair, tmp_path):
    import shutil

    from conftest import base_args
    from sar_kd.checkpointing import check_output_dir
    from sar_kd.config import ConfigError, config_from_args

    out = tmp_path / "out"
    shutil.copytree(tiny_pair["student"], out / "student")
    cfg = config_from_args(base_args(tiny_pair, out, student_model=str(out / "student"), overwrite_output_dir=True))
    with pytest.raises(ConfigError, match="contains --student_model"):
        check_output_dir(cfg)


@pytest.fixture(scope="module")
def run_sched(tiny_pair, tmp_path_factory):
    """Four steps of a linear schedule (student 1e-3, routers 1e-2, no weight decay), checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("sched") / "out"
    args = base_args(tiny_pair, out, train_steps=4, save_steps=2, eval_steps=0, use_scheduler=True)
    assert main(["train", *args]) == 0
    return out


def test_resume_applies_changed_rates_and_weight_decay(run_sched, tiny_pair, tmp_path, caplog):
    # issue 18 item 1: the restored optimizer/scheduler state kept training at the old rates
    import logging

    out = _copy(run_sched, tmp_path)
    args = base_args(tiny_pair, out, train_steps=4, save_steps=2, eval_steps=0, use_scheduler=True,
                     student_lr=3e-4, router_lr=2e-3, weight_decay=0.1,
                     resume_from_checkpoint=str(out / "checkpoint-2"))  # fmt: skip
    caplog.set_level(logging.INFO, logger="sar_kd")
    assert main(["train", *args]) == 0
    rows = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    # linear decay over 4 steps from the new base rates: steps 3 and 4 use 2/4 and 1/4 of them
    assert rows[2]["lr_student"] == pytest.approx(1e-3 * 3 / 4)  # before the resume: the old rates
    assert rows[3]["lr_student"] == pytest.approx(3e-4 * 2 / 4) and rows[4]["lr_student"] == pytest.approx(3e-4 / 4)
    assert rows[3]["lr_router"] == pytest.approx(2e-3 * 2 / 4) and rows[4]["lr_router"] == pytest.approx(2e-3 / 4)
    # the schedule's base rates and the weight decay travel on in the next checkpoint
    sched = torch.load(out / "checkpoint-4" / "state" / "scheduler.bin", weights_only=False)
    assert sched["base_lrs"] == pytest.approx([3e-4, 2e-3])
    groups = torch.load(out / "checkpoint-4" / "state" / "optimizer.bin", weights_only=False)["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0] and [g["initial_lr"] for g in groups] == [3e-4, 2e-3]
    said = [r.getMessage() for r in caplog.records if "from the command line" in r.getMessage()]
    assert said == ["student_lr 0.001 → 0.0003, router_lr 0.01 → 0.002, weight_decay 0 → 0.1 from the command line"]

    # resuming that checkpoint with the same rates: nothing to say
    caplog.clear()
    more = base_args(tiny_pair, out, train_steps=5, save_steps=2, eval_steps=0, use_scheduler=True,
                     student_lr=3e-4, router_lr=2e-3, weight_decay=0.1, resume_from_checkpoint="latest")  # fmt: skip
    assert main(["train", *more]) == 0
    assert not [r for r in caplog.records if "from the command line" in r.getMessage()]


def test_resume_into_another_output_dir_keeps_the_initial_metrics(tiny_pair, tmp_path):
    # issue 18 item 6: the first evaluation after the resume was reported as the initial_* metrics
    first = tmp_path / "first"
    assert main(["train", *base_args(tiny_pair, first, train_steps=4, save_steps=2, eval_steps=2)]) == 0
    evals = {
        r["step"]: r for r in map(json.loads, (first / "metrics.jsonl").read_text().splitlines()) if "student_ppl" in r
    }
    assert sorted(evals) == [0, 2, 4]
    # (what an older checkpoint holds: no initial evaluation in its trainer state)
    old = tmp_path / "old"
    shutil.copytree(first / "checkpoint-2", old / "checkpoint-2")
    state = json.loads((old / "checkpoint-2" / "trainer_state.json").read_text())
    assert state.pop("initial_eval")["student_ppl"] == evals[0]["student_ppl"]
    (old / "checkpoint-2" / "trainer_state.json").write_text(json.dumps(state))

    for source, carried in ((first, True), (old, False)):
        second = tmp_path / f"second_{source.name}"
        args = base_args(tiny_pair, second, train_steps=4, save_steps=2, eval_steps=2,
                         resume_from_checkpoint=str(source / "checkpoint-2"))  # fmt: skip
        assert main(["train", *args]) == 0
        summary = json.loads((second / "summary.json").read_text())
        assert summary["final_student_ppl"] == pytest.approx(evals[4]["student_ppl"], rel=1e-5)
        if carried:  # the numbers measured before any training, in the first directory
            for k in ("student_ppl", "teacher_ppl", "student_bpb", "teacher_bpb"):
                assert summary[f"initial_{k}"] == evals[0][k], k
        else:  # not known: left out, never the step-4 evaluation relabelled
            assert not [k for k in summary if k.startswith("initial_")], summary
