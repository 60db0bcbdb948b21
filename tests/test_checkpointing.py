"""Checkpoints are never stale: overwrite replaces the old run, resume refuses another configuration."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

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
