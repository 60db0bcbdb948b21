"""The demo's pipeline at a reduced size: tokenizers, teacher training (cached), three arms, table, PNG."""

from __future__ import annotations

import json
import logging

import torch
import transformers

from sar_kd.cli import main


def test_demo_pipeline_reduced(tmp_path, capsys, caplog):
    out, cache = tmp_path / "demo", tmp_path / "cache"
    args = [
        "demo",
        "--steps",
        "3",
        "--seeds",
        "1",
        "--teacher_steps",
        "4",
        "--output_dir",
        str(out),
        "--cache_dir",
        str(cache),
    ]
    with caplog.at_level(logging.INFO, logger="sar_kd"):
        assert main(args) == 0
    printed = capsys.readouterr().out
    for arm in ("CE only", "KD, router frozen", "SAR-KD (router learns)"):
        assert arm in printed
    assert (out / "demo_curves.png").stat().st_size > 10_000
    report = json.loads((out / "demo_results.json").read_text())
    assert set(report["arms"]) == {"ce_only", "kd_frozen", "sarkd", "sarkd_tce", "lookahead"}
    env = report["environment"]  # the table's last digits depend on these
    assert env["torch"] == torch.__version__ and env["transformers"] == transformers.__version__
    assert env["python"] and env["sar_kd"] and env["torch_threads"] == torch.get_num_threads()
    assert f"torch {torch.__version__}" in printed and "torch threads" in printed
    progress = [r.getMessage() for r in caplog.records if "demo: run " in r.getMessage()]
    assert "run 1/5: CE only, seed 0" in progress[0] and "left" in progress[2]
    assert "SAR-KD lookahead" in printed and "paired, 95% CI" in printed
    for runs in report["arms"].values():
        assert len(runs) == 1 and 1 < runs[0]["final_student_ppl"] < 1e4
    frozen, sarkd = report["arms"]["kd_frozen"][0], report["arms"]["sarkd"][0]
    assert frozen["final_teacher_ppl"] == frozen["initial_teacher_ppl"]  # router_lr 0: teacher unchanged
    assert (
        sarkd["final_expert_load"] != sarkd["initial_expert_load"]
        or sarkd["final_teacher_ppl"] != sarkd["initial_teacher_ppl"]
    )
    teacher_dirs = list(cache.glob("same-*/teacher"))
    assert len(teacher_dirs) == 1
    stamp = teacher_dirs[0].joinpath("model.safetensors").stat().st_mtime_ns
    assert main(args) == 0  # second run reuses the cached teacher
    assert teacher_dirs[0].joinpath("model.safetensors").stat().st_mtime_ns == stamp


def test_demo_dual_mode_reduced(tmp_path, capsys):
    out = tmp_path / "dual"
    args = ["demo", "--mode", "dual", "--steps", "2", "--seeds", "1", "--teacher_steps", "2",
            "--arms", "sarkd", "xlookahead", "--output_dir", str(out), "--cache_dir", str(tmp_path / "c")]  # fmt: skip
    assert main(args) == 0
    report = json.loads((out / "demo_results.json").read_text())
    assert report["mode"] == "dual" and report["arms"]["sarkd"][0]["final_student_ppl"] > 1
    assert report["arms"]["xlookahead"][0]["final_student_ppl"] > 1
    cfg = json.loads((out / "runs" / "sarkd-seed0" / "sar_kd_config.json").read_text())
    assert cfg["mode"] == "dual"
