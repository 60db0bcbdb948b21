"""Bad input: one clear error line, exit code 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import base_args
from sar_kd.cli import main


def _run(capsys, args) -> tuple[int, str]:
    try:
        rc = main(["train", *args])
    except SystemExit as e:  # argparse
        rc = e.code
    return rc, capsys.readouterr().err


CASES = {
    "missing_model": (lambda p, t: {"teacher_model": str(t / "nope" / "teacher")}, "no such directory"),
    "dense_teacher": (lambda p, t: {"teacher_model": p["student"]}, "no mixture-of-experts"),
    "block_too_long": (lambda p, t: {"block_size": 4096}, "exceeds the teacher's maximum positions"),
    "empty_data": (lambda p, t: {"train_file": _write(t / "empty.txt", "\n\n")}, "empty"),
    "tiny_data": (lambda p, t: {"train_file": _write(t / "tiny.txt", "just a few words\n")}, "fewer than --block_size"),
    "bad_jsonl": (lambda p, t: {"train_file": _write(t / "bad.jsonl", "{not json\n")}, "cannot read"),
    "missing_file": (lambda p, t: {"train_file": str(t / "missing.txt")}, "no such file"),
    "conflicting_data": (lambda p, t: {"dataset_name": "wikitext"}, "not both"),
    "warmup_without_scheduler": (lambda p, t: {"warmup_steps": 5}, "needs --use_scheduler"),
    "fp16_on_cpu": (lambda p, t: {"model_dtype": "float16"}, "needs a CUDA GPU"),
    "bad_regex": (lambda p, t: {"router_patterns": "gate("}, "not a valid regex"),
    "negative_lr": (lambda p, t: {"student_lr": -1}, "--student_lr must be >= 0"),
    "moe_student": (lambda p, t: {"student_model": _moe_model(p, t)}, "is a mixture-of-experts model (4 experts)"),
    "teacher_as_student": (lambda p, t: {"student_model": p["teacher"]}, "is the teacher itself"),
}


def _moe_model(pair, tmp):
    """A second MoE model on the pair's tokenizer (not the teacher's directory)."""
    from transformers import AutoTokenizer

    from sar_kd.toy import save_random_model, tiny_moe_config

    tok = AutoTokenizer.from_pretrained(pair["teacher"])
    save_random_model(tiny_moe_config(len(tok)), tmp / "moe_student", seed=5, tokenizer=tok)
    return str(tmp / "moe_student")


def _write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_cleanly(case, tiny_pair, tmp_path, capsys):
    over, message = CASES[case]
    out = tmp_path / "out"
    rc, err = _run(capsys, base_args(tiny_pair, out, **over(tiny_pair, tmp_path)))
    lines = [ln for ln in err.strip().splitlines() if "error" in ln]
    assert rc == 2
    assert len(lines) == 1 and message in lines[0], err[-1500:]
    assert not out.exists()


def test_unknown_flag(tiny_pair, tmp_path, capsys):
    rc, err = _run(capsys, [*base_args(tiny_pair, tmp_path / "o"), "--no_such_flag", "1"])
    assert rc == 2 and "unrecognized arguments: --no_such_flag" in err
    assert not (tmp_path / "o").exists()


def test_output_dir_with_another_run_is_refused(tiny_pair, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "sar_kd_config.json").write_text(json.dumps({"config": {"train_steps": 99}}))
    (out / "metrics.jsonl").write_text("")
    rc, err = _run(capsys, base_args(tiny_pair, out))
    assert rc == 2 and "already holds a different run" in err
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "sar_kd_config.json"]


def test_unknown_command(capsys):
    assert main(["fly"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_config_file_fills_options_and_flags_win(tiny_pair, tmp_path):
    from sar_kd.config import ConfigError, config_from_args

    cfg_file = tmp_path / "run.json"
    cfg_file.write_text(json.dumps({"train_steps": 7, "router_lr": 0.002, "temperature": 3.0}))
    cfg = config_from_args(["--config", str(cfg_file), *base_args(tiny_pair, tmp_path / "o", train_steps=9)])
    assert cfg.train_steps == 9  # the flag on the command line wins
    assert cfg.router_lr == 0.01  # base_args sets it explicitly too
    assert cfg.temperature == 3.0  # only in the file
    cfg_file.write_text(json.dumps({"no_such_option": 1}))
    with pytest.raises(ConfigError, match="unknown option"):
        config_from_args(["--config", str(cfg_file), *base_args(tiny_pair, tmp_path / "o")])


def test_jsonl_training_data(tiny_pair, tmp_path):
    from sar_kd.config import config_from_args
    from sar_kd.data import load_texts

    lines = Path(tiny_pair["train"]).read_text().splitlines()
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps({"body": ln}) + "\n" for ln in lines[:50]))
    cfg = config_from_args(base_args(tiny_pair, tmp_path / "o", train_file=str(jsonl), text_column="body"))
    train, val = load_texts(cfg)
    assert train == lines[:50] and val is not None
    cfg = config_from_args(base_args(tiny_pair, tmp_path / "o", train_file=str(jsonl)))
    with pytest.raises(Exception, match="no string field 'text'"):
        load_texts(cfg)
