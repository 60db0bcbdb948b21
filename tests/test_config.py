"""The ``--config`` file: flags given on the command line win, values are type-checked, conflicts refused."""

from __future__ import annotations

import json
import re

import pytest

from conftest import base_args
from sar_kd.cli import main
from sar_kd.config import ConfigError, TrainConfig, config_from_args


def _file(tmp_path, values: dict) -> str:
    path = tmp_path / "run.json"
    path.write_text(json.dumps(values))
    return str(path)


def test_a_flag_equal_to_its_default_still_wins_over_the_file(tiny_pair, tmp_path):
    default = TrainConfig()
    cfg_file = _file(tmp_path, {"router_lr": 1e-3, "seed": 7, "cpu": True, "gradient_checkpointing": False})
    args = ["--train_file", tiny_pair["train"], "--router_lr", str(default.router_lr), "--seed", "42"]
    cfg = config_from_args(["--config", cfg_file, *args])
    assert cfg.router_lr == default.router_lr and cfg.seed == 42  # given on the command line
    assert cfg.cpu is True and cfg.gradient_checkpointing is False  # only in the file
    cfg = config_from_args(["--config", cfg_file, "--train_file", tiny_pair["train"]])
    assert cfg.router_lr == 1e-3 and cfg.seed == 7


def test_file_values_are_type_checked(tiny_pair, tmp_path):
    ok = {"student_lr": 1, "eval_max_batches": None, "router_patterns": ["gate"], "use_scheduler": True}
    cfg = config_from_args(["--config", _file(tmp_path, ok), "--train_file", tiny_pair["train"]])
    assert cfg.student_lr == 1.0 and isinstance(cfg.student_lr, float)  # an int is fine for a float
    assert cfg.eval_max_batches is None and cfg.router_patterns == ["gate"]
    cases = {
        "block_size": ("512", 'block_size must be an integer (got "512")'),
        "train_steps": (2.5, "train_steps must be an integer (got 2.5)"),
        "seed": (True, "seed must be an integer (got true)"),
        "router_lr": ("1e-3", 'router_lr must be a number (got "1e-3")'),
        "cpu": ("yes", 'cpu must be true or false (got "yes")'),
        "router_patterns": ("gate", 'router_patterns must be a list of strings (got "gate")'),
        "eval_max_batches": ("4", 'eval_max_batches must be an integer or null (got "4")'),
        "text_column": (None, "text_column must not be null"),
        "router_grad": ("straight", "router_grad must be one of straight_through, straight_through_topk, dense"),
    }
    for key, (value, message) in cases.items():
        path = _file(tmp_path, {key: value})
        with pytest.raises(ConfigError) as e:
            config_from_args(["--config", path, "--train_file", tiny_pair["train"]])
        assert str(e.value).startswith(f"--config {path}: ") and message in str(e.value), key
    with pytest.raises(ConfigError, match="expected a JSON object"):
        config_from_args(["--config", _file(tmp_path, [1, 2]), "--train_file", tiny_pair["train"]])


def test_wrong_type_in_the_file_is_one_line_through_the_cli(tiny_pair, tmp_path, capsys):
    cfg_file = _file(tmp_path, {"block_size": "512", "seed": "x"})
    rc = main(["train", "--config", cfg_file, *base_args(tiny_pair, tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert 'block_size must be an integer (got "512"); seed must be an integer (got "x")' in err[0]
    assert not (tmp_path / "o").exists()


def test_validation_file_with_a_dataset_is_refused(tiny_pair, tmp_path, capsys):
    args = base_args(tiny_pair, tmp_path / "o", train_file=None, dataset_name="wikitext")
    rc = main(["train", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--validation_file goes with --train_file" in err[0]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--block_size", "1"], "--block_size must be >= 2"),
        (["--temperature", "inf"], "--temperature must be a finite number > 0 (got inf)"),
        (["--temperature", "nan"], "--temperature must be a finite number > 0 (got nan)"),
        (["--student_lr", "inf"], "--student_lr must be a finite number (got inf)"),
        (["--max_grad_norm", "nan"], "--max_grad_norm must be a finite number (got nan)"),
        (["--seed", "-1"], "--seed must be in [0, 4294967295]"),
        (["--seed", str(2**32)], "--seed must be in [0, 4294967295]"),
        (["--max_train_samples", "0"], "--max_train_samples must be >= 1 (got 0)"),
        (["--max_train_samples", "-1"], "--max_train_samples must be >= 1 (got -1)"),
        (["--output_dir", "{file}/out"], "is a file, not a directory"),
        (["--output_dir", "{file}"], "is a file, not a directory"),
    ],
)
def test_numeric_domains_are_refused_before_anything_loads(tiny_pair, tmp_path, capsys, flags, message):
    # issue 18 item 7: each was accepted (NaN/skipped steps/traceback) or refused only after the models loaded
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    flags = [f.replace("{file}", str(blocker)) for f in flags]
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_args([*base_args(tiny_pair, tmp_path / "o"), *flags])
    rc = main(["train", *base_args(tiny_pair, tmp_path / "o"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists() and blocker.read_text() == "not a folder"


def test_a_config_file_cannot_bring_an_infinite_value(tiny_pair, tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"temperature": Infinity, "router_lr": NaN}')
    with pytest.raises(ConfigError) as e:
        config_from_args(["--config", str(path), "--train_file", tiny_pair["train"]])
    assert "--temperature must be a finite number > 0 (got inf)" in str(e.value)
    assert "--router_lr must be a finite number (got nan)" in str(e.value)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--scheduler_type", "cosine"], "--scheduler_type cosine needs --use_scheduler"),
        (["--shuffle_buffer_size", "64"], "--shuffle_buffer_size 64 needs --streaming"),
        (["--lookahead_weight", "2"], "--lookahead_weight 2.0 needs --router_objective lookahead"),
        (["--lookahead_quiz", "holdout"], "--lookahead_quiz holdout needs --router_objective lookahead"),
        (["--lookahead_jvp", "finite_difference"], "--lookahead_jvp finite_difference needs --router_objective lookahead"),
        (["--lookahead_holdout_percentage", "10"], "--lookahead_holdout_percentage 10.0 needs --router_objective lookahead"),
        (["--router_objective", "lookahead", "--lookahead_holdout_percentage", "10"],
         "--lookahead_holdout_percentage 10.0 needs --lookahead_quiz holdout"),
        (["--validation_split_percentage", "10"], "--validation_split_percentage 10.0 applies without --validation_file"),
        (["--save_steps", "0", "--save_total_limit", "2"], "--save_total_limit 2 needs --save_steps > 0"),
    ],
)  # fmt: skip
def test_flags_that_cannot_act_are_refused(tiny_pair, tmp_path, capsys, flags, message):
    # issue 18 item 8: each of these was silently ignored
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_args([*base_args(tiny_pair, tmp_path / "o"), *flags])
    rc = main(["train", *base_args(tiny_pair, tmp_path / "o"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()


def test_validation_split_percentage_zero_holds_out_nothing(tiny_pair, tmp_path):
    # issue 18 item 8: --validation_split_percentage 0 still held out a block
    from sar_kd.data import num_blocks
    from sar_kd.trainer import Trainer

    no_val = dict(validation_file=None, train_steps=1, save_steps=0)
    with pytest.raises(ConfigError, match=re.escape("--validation_split_percentage 0 holds out no validation")):
        config_from_args(base_args(tiny_pair, tmp_path / "a", validation_split_percentage=0, **no_val))
    counts = []
    for pct in (0, 5):
        t = Trainer(config_from_args(base_args(tiny_pair, tmp_path / f"o{pct}", validation_split_percentage=pct,
                                               eval_steps=0, **no_val)))  # fmt: skip
        t.setup()
        counts.append((num_blocks(t.train_blocks), num_blocks(t.val_blocks) if t.val_blocks else 0))
        t.controller.remove()
    (every, none), (trained, held) = counts
    assert none == 0 and held >= 1 and every == trained + held


def test_default_temperature_is_the_measured_one_and_t2_gets_a_note():
    from sar_kd.config import TrainConfig, temperature_note

    assert TrainConfig().temperature == 1.0 and temperature_note(TrainConfig()) is None
    note = temperature_note(TrainConfig(temperature=2.0))
    assert note.startswith("--temperature 2: ") and "docs/results_real.md" in note and "\n" not in note
    assert temperature_note(TrainConfig(temperature=2.0, alpha_kd=0.0)) is None  # CE only: no KD to advise on


def test_a_kd_heavy_cross_tokenizer_run_gets_the_measured_mix_in_one_line():
    from sar_kd.config import TrainConfig, dual_alpha_note

    note = dual_alpha_note(TrainConfig(alpha_kd=0.9, alpha_ce=0.1))
    assert "0.5 / 0.5" in note and "docs/results_real.md" in note and "\n" not in note
    assert dual_alpha_note(TrainConfig()) is None  # the two-tokenizer defaults are the measured mix
    assert dual_alpha_note(TrainConfig(alpha_kd=0.5, alpha_ce=0.5)) is None
    assert dual_alpha_note(TrainConfig(alpha_kd=0.9, alpha_ce=0.1, dual_loss="hidden")) is None  # not measured


def test_unset_loss_weights_take_the_defaults_of_the_mode():
    from sar_kd.config import TrainConfig, resolve_alphas, with_mode_alphas

    for mode, (kd, ce) in (("logit", (0.9, 0.1)), ("dual", (0.5, 0.5))):
        cfg = TrainConfig()
        line = resolve_alphas(cfg, mode)
        assert (cfg.alpha_kd, cfg.alpha_ce) == (kd, ce) and f"alpha_kd {kd:g}, alpha_ce {ce:g}" in line
        assert resolve_alphas(cfg, mode) is None  # nothing left to fill
    given = TrainConfig(alpha_kd=0.7)
    assert "alpha_ce 0.5" in resolve_alphas(given, "dual") and (given.alpha_kd, given.alpha_ce) == (0.7, 0.5)
    assert with_mode_alphas({"alpha_kd": None, "alpha_ce": 0.3}, None) == {"alpha_kd": 0.9, "alpha_ce": 0.3}
