"""sar-kd compare: statistics against hand computation, runs skipped and resumed."""

from __future__ import annotations

import json
import math

import pytest

from conftest import base_args
from sar_kd.cli import main
from sar_kd.compare import Comparison, format_table, paired_difference, spread, t_quantile_975
from sar_kd.config import ConfigError


def test_paired_confidence_interval_matches_hand_computation():
    # diffs 1, 2, 3: mean 2, sd 1, t_{0.975,2} = 4.303 -> half-width 4.303 / sqrt(3) = 2.4843
    d = paired_difference([11.0, 22.0, 33.0], [10.0, 20.0, 30.0])
    assert d["diffs"] == [1.0, 2.0, 3.0] and d["mean"] == 2.0 and d["sd"] == 1.0
    assert d["ci95"] == pytest.approx([2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)], abs=1e-9)
    assert d["verdict"] == "no difference at this budget"
    assert paired_difference([7.0, 7.1, 6.9], [10.0, 10.0, 10.0])["verdict"] == "better"
    assert paired_difference([13.0, 13.1, 12.9], [10.0, 10.0, 10.0])["verdict"] == "worse"
    assert paired_difference([9.0], [10.0])["verdict"] == "one seed: no verdict"
    assert t_quantile_975(1) == 12.706 and t_quantile_975(30) == 2.042 and 1.96 < t_quantile_975(200) < 1.98
    s = spread([1.0, 2.0, 4.0])
    assert s["mean"] == pytest.approx(7 / 3) and s["sd"] == pytest.approx(1.527525, abs=1e-6) and s["n"] == 3


def _common(pair) -> list[str]:
    return base_args(pair, "unused", train_steps=2, eval_steps=2, save_steps=1, eval_max_batches=1)[:-2]


def test_compare_runs_reports_and_resumes(tiny_pair, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--output_dir", str(out), "--seeds", "0", "1", "--baseline", "frozen",
            "--arm", "frozen=--router_lr 0", "--arm", "learn=--router_lr 0.01", "--", *_common(tiny_pair)]  # fmt: skip
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| frozen |" in table and "| learn |" in table and "baseline" in table
    res = json.loads((out / "compare.json").read_text())
    assert set(res["arms"]) == {"frozen", "learn"} and res["seeds"] == [0, 1]
    learn = res["arms"]["learn"]
    assert len(learn["student_ppl"]["values"]) == 2 and "vs_baseline" in learn
    assert (out / "compare.png").is_file()
    # every run is a real trainer run with its own seed
    cfg = json.loads((out / "runs" / "learn-seed1" / "sar_kd_config.json").read_text())["config"]
    assert cfg["seed"] == 1 and cfg["router_lr"] == 0.01

    # a run killed after its first checkpoint: only that run trains again, from the checkpoint
    killed = out / "runs" / "learn-seed0"
    (killed / "summary.json").unlink()
    for p in killed.glob("checkpoint-2"):
        import shutil

        shutil.rmtree(p)
    kept = {p: p.stat().st_mtime for p in (out / "runs").glob("*/summary.json")}
    assert main(argv) == 0
    assert all(p.stat().st_mtime == t for p, t in kept.items())  # finished runs were skipped
    assert (killed / "summary.json").is_file()
    log = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2]  # resumed at step 1, not restarted
    assert "| learn |" in format_table(json.loads((out / "compare.json").read_text()))

    # the same output directory with other common flags: finished runs are not silently reused
    changed = [*argv[: argv.index("--") + 1], *_common(tiny_pair)]
    changed[changed.index("--train_steps") + 1] = "3"
    assert main(changed) == 2
    assert "made with other flags (train_steps 2 -> 3)" in capsys.readouterr().err


def test_compare_refuses_a_bad_arm_before_training(tiny_pair, tmp_path):
    argv = ["compare", "--output_dir", str(tmp_path / "c"), "--arm", "bad=--router_lr -1", "--", *_common(tiny_pair)]
    assert main(argv) == 2
    assert not (tmp_path / "c" / "runs").exists()
    with pytest.raises(ConfigError, match="not one of the arms"):
        Comparison(tmp_path, _common(tiny_pair), {"a": []}, [0], baseline="b").validate()


def _fake_run(cmp: Comparison, arm: str, seed: int, alpha_kd: float, s_bpb: float, t_bpb: float, bpb: bool = True):
    d = cmp.run_dir(arm, seed)
    d.mkdir(parents=True)
    summary = {"final_student_ppl": 2**s_bpb, "final_teacher_ppl": 2**t_bpb, "initial_teacher_ppl": 2**t_bpb}
    if bpb:
        summary |= {"final_student_bpb": s_bpb, "final_teacher_bpb": t_bpb, "initial_teacher_bpb": t_bpb}
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "sar_kd_config.json").write_text(json.dumps({"config": {"alpha_kd": alpha_kd}}))


def test_compare_pairs_bits_per_byte_and_says_when_the_teacher_cannot_help(tmp_path):
    cmp = Comparison(tmp_path, [], {"ce": [], "kd": []}, [0, 1, 2], baseline="ce")
    for seed, (ce, kd) in enumerate([(2.30, 2.20), (2.32, 2.21), (2.31, 2.19)]):
        _fake_run(cmp, "ce", seed, 0.0, ce, 2.35)
        _fake_run(cmp, "kd", seed, 0.9, kd, 2.35)
    res = cmp.results()
    d = res["arms"]["kd"]["vs_baseline"]["student_bpb"]
    assert d["diffs"] == pytest.approx([-0.10, -0.11, -0.12]) and d["verdict"] == "better"
    assert res["initial"]["teacher_bpb"] == 2.35
    # the teacher (2.35 bits/byte) is worse than the CE-only student (2.31): said in the report
    assert len(res["notes"]) == 1 and "'ce'" in res["notes"][0] and "cannot help" in res["notes"][0]
    table = format_table(res)
    assert "student bits/byte" in table.splitlines()[0] and "-0.1100 [" in table and "better" in table
    assert "Note: the teacher (2.3500 bits/byte" in table

    # runs written before bits per byte existed: perplexity is paired instead, nothing is invented
    old = Comparison(tmp_path / "old", [], {"ce": [], "kd": []}, [0, 1], baseline="ce")
    for seed in (0, 1):
        _fake_run(old, "ce", seed, 0.0, 2.3 + seed / 100, 2.0, bpb=False)
        _fake_run(old, "kd", seed, 0.9, 2.2, 2.0, bpb=seed == 0)
    res = old.results()
    assert "student_bpb" not in res["arms"]["kd"] and "student_ppl" in res["arms"]["kd"]
    assert "student ppl" in format_table(res).splitlines()[0] and res["notes"] == []


def test_compare_refuses_duplicate_seeds_before_training(tiny_pair, tmp_path, capsys):
    # issue 18 item 3: seed 0 twice would be paired twice (a narrower interval, a wrong verdict)
    out = tmp_path / "c"
    argv = ["compare", "--output_dir", str(out), "--seeds", "0", "0", "1", "--arm", "a=--router_lr 0",
            "--", *_common(tiny_pair)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--seeds" in err[0] and "0 more than once" in err[0]
    assert not out.exists()
    with pytest.raises(ConfigError, match="more than once"):
        Comparison(tmp_path, _common(tiny_pair), {"a": []}, [1, 2, 1]).validate()


def test_compare_refuses_no_evaluation_before_training(tiny_pair, tmp_path, capsys):
    # issue 18 item 4: --eval_steps 0 trained every arm, then died with KeyError 'final_student_ppl'
    out = tmp_path / "c"
    argv = ["compare", "--output_dir", str(out), "--seeds", "0", "--arm", "a=--router_lr 0", "--arm", "b=--eval_steps 0",
            "--", *_common(tiny_pair)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "arm 'b'" in err[0] and "--eval_steps" in err[0]
    assert not out.exists()


def test_compare_refuses_to_resume_a_run_whose_flags_changed(tiny_pair, tmp_path, capsys):
    # issue 18 item 2: an interrupted run was resumed with the arm's new flags and reported as the new arm
    import shutil

    out = tmp_path / "cmp"

    def argv(lr: str, *extra: str) -> list[str]:
        return ["compare", "--output_dir", str(out), "--seeds", "0", "--arm", f"learn=--router_lr {lr}", *extra,
                "--", *_common(tiny_pair)]  # fmt: skip

    assert main(argv("0.01")) == 0
    run = out / "runs" / "learn-seed0"
    (run / "summary.json").unlink()  # killed after its first checkpoint
    shutil.rmtree(run / "checkpoint-2")
    before = (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(argv("0.02")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "learn-seed0" in err[0] and "router_lr 0.01 -> 0.02" in err[0], err
    assert "--restart_changed" in err[0]
    assert (run / "metrics.jsonl").read_text() == before and not (run / "summary.json").exists()  # nothing trained

    # asked to: the run restarts from scratch with the arm's flags (no checkpoint of the old flags is used)
    assert main(argv("0.02", "--restart_changed")) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2] and rows[0]["step"] == 0  # from step 0, evaluated
    assert json.loads((run / "sar_kd_config.json").read_text())["config"]["router_lr"] == 0.02
    assert json.loads((run / "checkpoint-1" / "sar_kd_config.json").read_text())["config"]["router_lr"] == 0.02

    # a finished run made with other flags is re-run too when asked
    assert main(argv("0.03", "--restart_changed")) == 0
    assert json.loads((run / "sar_kd_config.json").read_text())["config"]["router_lr"] == 0.03
    assert json.loads((out / "compare.json").read_text())["arms"]["learn"]["student_bpb"]["n"] == 1
