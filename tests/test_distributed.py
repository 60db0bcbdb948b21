"""Data-parallel training with 2 CPU processes (gloo) launched by torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from conftest import base_args

WORKER = Path(__file__).with_name("ddp_worker.py")


def _launch(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(WORKER),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_two_processes_stay_in_sync_and_match_one_process(tiny_pair, tmp_path):
    common = dict(train_steps=3, eval_steps=3, save_steps=0, router_load_balance_weight=0, cpu=True)
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    r = _launch(2, base_args(tiny_pair, ddp_out, per_device_batch_size=2, grad_accum_steps=1, **common))
    assert r.returncode == 0, r.stderr[-3000:]
    r1 = _launch(1, base_args(tiny_pair, single_out, per_device_batch_size=2, grad_accum_steps=2, **common))
    assert r1.returncode == 0, r1.stderr[-3000:]

    a = torch.load(ddp_out / "rank0_of_2.pt", weights_only=True)
    b = torch.load(ddp_out / "rank1_of_2.pt", weights_only=True)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), f"ranks diverged on {k}"
    router_keys = [k for k in a if not k.startswith("student.")]
    assert router_keys  # router gradients are synchronised too

    # the same 4 blocks per update (2 ranks x 2 vs 1 process x 2 x 2 accumulation): same losses
    rows_d = [json.loads(x) for x in (ddp_out / "metrics.jsonl").read_text().splitlines()]
    rows_s = [json.loads(x) for x in (single_out / "metrics.jsonl").read_text().splitlines()]
    for d, s in zip([x for x in rows_d if "loss" in x], [x for x in rows_s if "loss" in x]):
        assert abs(d["loss"] - s["loss"]) < 1e-4, (d, s)
    evals = [x for x in rows_d if "student_ppl" in x]
    assert len(evals) == 2 and len(rows_d) == 5  # rank 0 alone logs: 3 steps + 2 evaluations


def test_ce_only_baseline_runs_data_parallel(tiny_pair, tmp_path):
    """A CE-only run (the teacher never runs while training) keeps its routers out of DDP's reduction."""
    out = tmp_path / "ce"
    r = _launch(2, base_args(tiny_pair, out, per_device_batch_size=2, grad_accum_steps=1, train_steps=2,
                             eval_steps=0, save_steps=0, alpha_kd=0, cpu=True))  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(x["router_grad_norm"] == 0.0 and x["kd_loss"] == 0.0 for x in rows)


def test_lookahead_quiz_direction_is_the_global_one(tiny_pair, tmp_path):
    """--router_objective lookahead: 2 processes x 2 blocks = 1 process x 4 blocks (the quiz gradient is
    normalised by the global label count and summed over the processes)."""
    common = dict(train_steps=2, eval_steps=0, save_steps=0, grad_accum_steps=1, router_objective="lookahead",
                  router_load_balance_weight=0, cpu=True)  # fmt: skip
    rows = {}
    for nproc, bs in ((2, 2), (1, 4)):
        out = tmp_path / f"p{nproc}"
        r = _launch(nproc, base_args(tiny_pair, out, per_device_batch_size=bs, **common))
        assert r.returncode == 0, r.stderr[-3000:]
        rows[nproc] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for d, s in zip(rows[2], rows[1]):  # (the logged L_look is rank 0's own tokens': not compared)
        for key in ("kd_loss", "ce_loss", "router_grad_norm", "student_grad_norm"):
            assert abs(d[key] - s[key]) <= 1e-4 * abs(s[key]), (key, d, s)
    a = torch.load(tmp_path / "p2" / "rank0_of_2.pt", weights_only=True)
    b = torch.load(tmp_path / "p1" / "rank0_of_1.pt", weights_only=True)
    for k in b:  # Adam turns float noise in a near-zero gradient element into up to ~lr: 1e-5 is 1% of a step
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
