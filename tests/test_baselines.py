"""Baselines do no teacher work they do not need: a frozen router and a CE-only run."""

from __future__ import annotations

import torch

from conftest import base_args
from sar_kd.config import config_from_args
from sar_kd.trainer import Trainer


def _trainer(tiny_pair, out, **over) -> Trainer:
    t = Trainer(config_from_args(base_args(tiny_pair, out, eval_steps=0, save_steps=0, **over)))
    t.setup()
    return t


def _expert_calls(teacher) -> list[int]:
    """Record, per call of an experts module, how many experts per token it was asked to run."""
    calls: list[int] = []
    for name, m in teacher.named_modules():
        if name.endswith("mlp.experts"):
            m.register_forward_hook(lambda mod, args, out: calls.append(args[1].shape[-1]))
    return calls


def test_frozen_router_runs_a_native_no_grad_teacher(tiny_pair, tmp_path):
    t = _trainer(tiny_pair, tmp_path / "frozen", router_lr=0)
    try:
        calls = _expert_calls(t.model.teacher)
        grad_flags = []
        t.model.teacher.model.layers[0].register_forward_hook(
            lambda m, a, o: grad_flags.append(torch.is_grad_enabled())
        )
        before = {n: p.detach().clone() for n, p in t.model.router_params.items()}
        m = t.train_step()
    finally:
        t.controller.remove()
    top_k = t.routers[0].top_k
    assert calls and set(calls) == {top_k}  # only the chosen experts ran
    assert grad_flags and not any(grad_flags)  # no autograd graph through the teacher
    assert all(p.grad is None for p in t.model.router_params.values())
    assert m["router_grad_norm"] == 0.0
    assert m["router_anchor"] == m["router_entropy"] == m["router_load_balance"] == 0.0
    assert all(torch.equal(before[n], p) for n, p in t.model.router_params.items())
    assert m["kd_loss"] > 0  # the KD term itself is still computed from the (frozen) teacher


def test_learning_router_runs_every_expert(tiny_pair, tmp_path):
    t = _trainer(tiny_pair, tmp_path / "learn")
    try:
        calls = _expert_calls(t.model.teacher)
        m = t.train_step()
    finally:
        t.controller.remove()
    assert calls and set(calls) == {t.routers[0].num_experts}  # straight_through evaluates every expert
    assert m["router_grad_norm"] > 0


def test_ce_only_run_never_calls_the_teacher(tiny_pair, tmp_path):
    t = _trainer(tiny_pair, tmp_path / "ce", alpha_kd=0, router_lr=0)
    try:
        called = []
        t.model.teacher.register_forward_pre_hook(lambda *a: called.append(1))
        t.model.teacher.base_model.register_forward_pre_hook(lambda *a: called.append(1))
        m = t.train_step()
        assert not called
        assert m["kd_loss"] == 0.0 and m["ce_loss"] > 0 and m["student_grad_norm"] > 0
        ev = t.evaluate()  # the teacher is still evaluated (its perplexity is reported)
        assert called and ev["teacher_ppl"] > 1
    finally:
        t.controller.remove()
