"""FSDP2 (``--fsdp``) with 2 CPU processes (gloo) launched by torchrun, against the DDP run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import base_args
from sar_kd.cli import main
from sar_kd.config import ConfigError, TrainConfig, validate_config
from test_distributed import WORKER, _launch

# 4 updates of 2 micro-batches per process (gradient accumulation under FSDP), 3 evaluation batches
# (an odd number: one process repeats a pass so that both gather as often), a checkpoint at step 2
# (a strong L2 anchor: under FSDP its gradient is added to the fp32 shards after the backward pass)
COMMON = dict(train_steps=4, eval_steps=2, eval_max_batches=3, save_steps=2, per_device_batch_size=2,
              grad_accum_steps=2, router_anchor_weight=1.0, cpu=True)  # fmt: skip


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tiny_pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    outs = {"ddp": root / "ddp", "fsdp": root / "fsdp"}
    for name, out in outs.items():
        r = _launch(2, base_args(tiny_pair, out, fsdp=name == "fsdp", **COMMON))
        assert r.returncode == 0, r.stderr[-3000:]
    return outs


def test_fsdp_trains_like_ddp(runs):
    a = torch.load(runs["fsdp"] / "rank0_of_2.pt", weights_only=True)
    a1 = torch.load(runs["fsdp"] / "rank1_of_2.pt", weights_only=True)
    b = torch.load(runs["ddp"] / "rank0_of_2.pt", weights_only=True)
    assert set(a) == set(b) == set(a1)
    routers = [k for k in a if not k.startswith(("student.", "teacher."))]
    assert routers and any(k.startswith("student.") for k in a)
    for k in a:
        assert torch.equal(a[k], a1[k]), f"ranks disagree on {k}"
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-5), (k, (a[k] - b[k]).abs().max())
    update = torch.load(runs["fsdp"] / "router_update.pt", weights_only=True)  # written from the gathered shards
    assert set(update) == set(routers)
    for k in routers:
        assert torch.equal(update[k], a[k])
    ra, rb = _rows(runs["fsdp"]), _rows(runs["ddp"])
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        for key in (
            "loss",
            "kd_loss",
            "ce_loss",
            "router_anchor",
            "router_grad_norm",
            "student_grad_norm",
            "student_ppl",
            "teacher_ppl",
        ):
            if key in x:
                assert abs(x[key] - y[key]) <= 1e-5 * max(1.0, abs(y[key])), (key, x, y)
        if "eval_tokens" in x:
            assert x["eval_tokens"] == y["eval_tokens"]  # the repeated pass is not counted
    assert any(r.get("router_grad_norm", 0) > 0 for r in ra)


def test_fsdp_keeps_the_frozen_teacher_and_writes_loadable_outputs(runs, tiny_pair, tmp_path):
    out = runs["fsdp"]
    dumped = torch.load(out / "rank0_of_2.pt", weights_only=True)
    original = AutoModelForCausalLM.from_pretrained(tiny_pair["teacher"]).state_dict()
    update = torch.load(out / "router_update.pt", weights_only=True)
    frozen = [k for k in original if k not in update]
    assert frozen
    for k in frozen:  # every non-router tensor of the teacher, gathered from the shards, bit-identical
        assert torch.equal(dumped[f"teacher.{k}"], original[k]), k
    model = AutoModelForCausalLM.from_pretrained(out / "student")
    for k, v in model.state_dict().items():
        assert torch.equal(v, dumped[f"student.{k}"]), k
    # the same file as without --fsdp (a tied head written once)
    files = [load_file(str(runs[r] / "student/model.safetensors")) for r in ("fsdp", "ddp")]
    assert set(files[0]) == set(files[1])
    assert main(["apply-router", "--teacher_model", tiny_pair["teacher"], "--router_update",
                 str(out / "router_update.pt"), "--output_dir", str(tmp_path / "adapted")]) == 0  # fmt: skip
    adapted = AutoModelForCausalLM.from_pretrained(tmp_path / "adapted").state_dict()
    for k in update:
        assert torch.equal(adapted[k], update[k]) and not torch.equal(adapted[k], original[k]), k
    # a checkpoint holds whole trainable tensors only (never the frozen teacher) as ordinary files
    state = load_file(str(out / "checkpoint-4/state/trainable.safetensors"))
    assert set(state) == {f"student.{n}" for n, _ in model.named_parameters()} | {f"teacher.{k}" for k in update}
    assert (out / "checkpoint-4/router_update.pt").is_file() and (out / "checkpoint-4/student").is_dir()


def test_fsdp_resume_equals_uninterrupted(runs, tiny_pair, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(runs["fsdp"], out)
    for p in ("checkpoint-4", "student", "router_update.pt", "summary.json", "rank0_of_2.pt", "rank1_of_2.pt"):
        shutil.rmtree(out / p) if (out / p).is_dir() else (out / p).unlink()
    r = _launch(2, base_args(tiny_pair, out, fsdp=True, resume_from_checkpoint="latest", **COMMON))
    assert r.returncode == 0, r.stderr[-3000:]
    a = torch.load(runs["fsdp"] / "rank0_of_2.pt", weights_only=True)
    b = torch.load(out / "rank0_of_2.pt", weights_only=True)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), k
    ra, rb = _rows(runs["fsdp"]), _rows(out)
    assert [r["step"] for r in rb] == [r["step"] for r in ra]
    for x, y in zip(ra, rb):
        for key in ("loss", "kd_loss", "ce_loss", "router_grad_norm", "student_ppl"):
            if key in x:
                assert abs(x[key] - y[key]) <= 1e-6 * max(1.0, abs(x[key])), (key, x, y)


def test_fsdp_refuses_what_it_cannot_do(tiny_pair, tmp_path):
    for over, words in (
        (dict(router_objective="lookahead"), "--router_objective lookahead"),
        (dict(model_dtype="float16"), "bfloat16"),
    ):
        with pytest.raises(ConfigError, match=words):
            validate_config(TrainConfig(fsdp=True, train_file=tiny_pair["train"], **over))
    # accelerate launch with an FSDP config turns --fsdp on: the same refusals
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           *base_args(tiny_pair, tmp_path / "env", router_objective="lookahead", cpu=True, train_steps=1)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_FSDP": "true"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode != 0 and "--fsdp does not support --router_objective lookahead" in r.stderr
    # one process: nothing to shard over
    r = _launch(1, base_args(tiny_pair, tmp_path / "one", fsdp=True, cpu=True, train_steps=1))
    assert r.returncode != 0 and "--fsdp shards the models over processes" in r.stderr
    assert not (tmp_path / "one" / "student").exists()


@pytest.mark.slow  # about 1.5 min on 2 cores (the 151,936-token vocabulary, 4 launches' worth of loading)
def test_fsdp_dual_tokenizers_match_ddp(dual_pair, tmp_path):
    """Two tokenizers, both dual losses: the projection (a root-unit module) and the cross-tokenizer
    logit loss under FSDP give DDP's numbers."""
    outs = {}
    for name in ("ddp", "fsdp"):
        outs[name] = out = tmp_path / name
        args = base_args(dual_pair, out, fsdp=name == "fsdp", dual_loss="both", train_steps=2, eval_steps=2,
                         save_steps=0, per_device_batch_size=1, grad_accum_steps=1, cpu=True)  # fmt: skip
        r = _launch(2, args)
        assert r.returncode == 0, r.stderr[-3000:]
    a = torch.load(outs["fsdp"] / "rank0_of_2.pt", weights_only=True)
    b = torch.load(outs["ddp"] / "rank0_of_2.pt", weights_only=True)
    for k in b:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-5), k
    pa = torch.load(outs["fsdp"] / "projection.pt", weights_only=True)["state_dict"]
    pb = torch.load(outs["ddp"] / "projection.pt", weights_only=True)["state_dict"]
    assert set(pa) == set(pb) and all(torch.allclose(pa[k], pb[k], rtol=1e-5, atol=1e-5) for k in pb)
    for x, y in zip(_rows(outs["fsdp"]), _rows(outs["ddp"])):
        for key in ("loss", "kd_loss", "hidden_mse", "xtok_kl", "student_ppl", "teacher_ppl"):
            if key in y:
                assert abs(x[key] - y[key]) <= 1e-5 * max(1.0, abs(y[key])), (key, x, y)


@pytest.mark.slow  # about 1 min on 2 cores
def test_fsdp_bfloat16_anchor_reads_the_fp32_masters(tiny_pair, tmp_path):
    """bf16 gathers: a router drift below one bf16 step must still count in the L2 anchor (DDP's value)."""
    rows = {}
    for name in ("ddp", "fsdp"):
        out = tmp_path / name
        args = base_args(tiny_pair, out, fsdp=name == "fsdp", model_dtype="bfloat16", router_lr=1e-5,
                         router_anchor_weight=1.0, train_steps=3, eval_steps=0, save_steps=0, cpu=True)  # fmt: skip
        r = _launch(2, args)
        assert r.returncode == 0, r.stderr[-3000:]
        rows[name] = [x for x in _rows(out) if "loss" in x]
    for x, y in zip(rows["fsdp"], rows["ddp"]):
        assert abs(x["router_anchor"] - y["router_anchor"]) <= 0.05 * y["router_anchor"] + 1e-12, (x, y)
    assert rows["ddp"][-1]["router_anchor"] > 0


def test_fsdp_resume_applies_changed_rates(runs, tiny_pair, tmp_path):
    # issue 18 item 1 under --fsdp: the sharded optimizer/scheduler state kept the saved rates
    out = tmp_path / "resumed"
    shutil.copytree(runs["fsdp"], out)
    for p in ("checkpoint-4", "student", "router_update.pt", "summary.json", "rank0_of_2.pt", "rank1_of_2.pt"):
        shutil.rmtree(out / p) if (out / p).is_dir() else (out / p).unlink()
    changed = dict(COMMON, weight_decay=0.1)
    args = base_args(tiny_pair, out, fsdp=True, resume_from_checkpoint="latest", **changed)
    args += ["--student_lr", "3e-4", "--router_lr", "2e-3"]
    r = _launch(2, args)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {x["step"]: x for x in _rows(out) if "loss" in x}
    assert rows[2]["lr_student"] == 1e-3 and rows[2]["lr_router"] == 1e-2  # before the resume
    assert rows[3]["lr_student"] == rows[4]["lr_student"] == 3e-4
    assert rows[3]["lr_router"] == rows[4]["lr_router"] == 2e-3
