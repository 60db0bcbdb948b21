"""Properties of the loss functions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from sar_kd import losses
from sar_kd.routers import RouterRecord
from sar_kd.toy import tiny_llama_config

IGN = losses.IGNORE_INDEX


def _logits(n=12, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * 3


def test_kd_zero_for_identical_inputs_and_positive_otherwise():
    s = _logits()
    labels = torch.zeros(12, dtype=torch.long)
    assert losses.kd_kl_loss(s, s.clone(), labels, 2.0).abs() < 1e-5
    assert losses.kd_kl_loss(s, _logits(seed=1), labels, 2.0) > 0


def test_kd_t1_equals_torch_kl_div_and_scales_with_t_squared():
    s, t = _logits(), _logits(seed=1)
    labels = torch.zeros(12, dtype=torch.long)
    ref = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")
    assert torch.allclose(losses.kd_kl_loss(s, t, labels, 1.0), ref, rtol=1e-5)
    T = 3.0
    ref_t = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="sum")
    assert torch.allclose(losses.kd_kl_loss(s, t, labels, T), T**2 * ref_t, rtol=1e-5)


def test_kd_and_ce_exclude_ignored_positions():
    s, t = _logits(), _logits(seed=1)
    labels = torch.arange(12) % 50
    masked = labels.clone()
    masked[6:] = IGN
    assert torch.allclose(losses.kd_kl_loss(s, t, masked, 2.0), losses.kd_kl_loss(s[:6], t[:6], labels[:6], 2.0))
    assert torch.allclose(losses.ce_loss(s, masked), losses.ce_loss(s[:6], labels[:6]))


def test_kd_is_fp32_even_for_half_inputs():
    s, t = _logits().bfloat16(), _logits(seed=1).bfloat16()
    out = losses.kd_kl_loss(s, t, torch.zeros(12, dtype=torch.long), 2.0)
    assert out.dtype == torch.float32


def test_shift_labels_is_a_single_shift_matching_hf():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(64, hidden=32))
    ids = torch.randint(0, 64, (2, 16))
    labels = losses.shift_labels(ids)
    assert torch.equal(labels[:, :-1], ids[:, 1:]) and (labels[:, -1] == IGN).all()
    logits = model(ids).logits
    ours = losses.ce_loss(logits.reshape(-1, 64), labels.reshape(-1)) / (labels != IGN).sum()
    hf = model(ids, labels=ids).loss  # HF shifts internally, once
    assert torch.allclose(ours, hf, atol=1e-5)


def test_shift_labels_masks_padding():
    ids = torch.tensor([[5, 6, 7, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    assert losses.shift_labels(ids, mask).tolist() == [[6, 7, IGN, IGN, IGN]]


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_chunked_losses_equal_unchunked_values_and_gradients(chunk):
    torch.manual_seed(0)
    hs = torch.randn(2, 16, 8, requires_grad=True)
    ht = torch.randn(2, 16, 12, requires_grad=True)
    head_s, head_t = torch.nn.Linear(8, 40, bias=False), torch.nn.Linear(12, 44, bias=False)
    labels = torch.randint(0, 40, (2, 16))
    labels[:, -1] = IGN
    labels[1, :3] = IGN

    kd, ce, tce = losses.chunked_lm_losses(
        hs, ht, head_s, head_t, labels, 2.0, chunk, vocab_size=40, teacher_ce_grad=True
    )
    (kd + ce + tce).backward()
    grads = [hs.grad.clone(), ht.grad.clone(), head_s.weight.grad.clone(), head_t.weight.grad.clone()]
    for t in (hs, ht, head_s.weight, head_t.weight):
        t.grad = None

    ls, lt = head_s(hs).reshape(-1, 40), head_t(ht).reshape(-1, 44)[:, :40]
    flat = labels.reshape(-1)
    ref = (losses.kd_kl_loss(ls, lt, flat, 2.0), losses.ce_loss(ls, flat), losses.ce_loss(lt, flat))
    sum(ref).backward()
    for a, b in zip((kd, ce, tce), ref):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    for g, t in zip(grads, (hs, ht, head_s.weight, head_t.weight)):
        assert torch.allclose(g, t.grad, rtol=1e-4, atol=1e-6)


def test_teacher_ce_without_grad_flag_carries_no_gradient():
    hs = torch.randn(1, 8, 4)
    ht = torch.randn(1, 8, 4, requires_grad=True)
    head = torch.nn.Linear(4, 10)
    labels = torch.randint(0, 10, (1, 8))
    _, _, tce = losses.chunked_lm_losses(hs, ht, head, head, labels, 1.0, 4)
    assert not tce.requires_grad


def _record(logits: torch.Tensor, k: int = 1) -> RouterRecord:
    return RouterRecord(logits, logits.detach().topk(k, -1).indices)


def test_entropy_is_log_e_for_uniform_and_has_gradient():
    logits = torch.zeros(10, 4, requires_grad=True)
    ent = losses.router_entropy([_record(logits)])
    assert math.isclose(float(ent), math.log(4), rel_tol=1e-6)
    peaked = torch.tensor([[5.0, 0, 0, 0]] * 10, requires_grad=True)
    e2 = losses.router_entropy([_record(peaked)])
    assert e2 < ent
    e2.backward()
    assert peaked.grad.abs().sum() > 0


def test_load_balance_is_one_when_balanced_and_e_when_collapsed():
    E = 4
    balanced = torch.eye(E).repeat(5, 1) * 10  # each expert chosen equally, peaked probs
    lb = losses.router_load_balance([_record(balanced)])
    assert math.isclose(float(lb), 1.0, rel_tol=1e-3)
    collapsed = torch.tensor([[20.0, 0, 0, 0]] * 20, requires_grad=True)
    lb2 = losses.router_load_balance([_record(collapsed)])
    assert math.isclose(float(lb2), E, rel_tol=1e-3)
    lb2.backward()
    assert collapsed.grad is not None and collapsed.grad.abs().sum() > 0


def test_load_balance_respects_token_mask():
    logits = torch.tensor([[5.0, 0], [0, 5.0], [0, 5.0]])
    mask = torch.tensor([True, True, False])
    assert math.isclose(float(losses.router_load_balance([_record(logits)], mask)), 1.0, rel_tol=1e-2)


def test_anchor_zero_at_init_and_gradient_after_move():
    p = torch.nn.Parameter(torch.randn(3, 5))
    init = {"w": p.detach().clone()}
    a0 = losses.router_anchor({"w": p}, init)
    assert float(a0) == 0.0
    with torch.no_grad():
        p.add_(0.1)
    a1 = losses.router_anchor({"w": p}, init)
    assert math.isclose(float(a1), 15 * 0.01, rel_tol=1e-4)
    a1.backward()
    assert torch.allclose(p.grad, torch.full_like(p, 0.2))


def test_expert_load_fractions_sum_to_one():
    logits = torch.randn(30, 3)
    loads = losses.expert_load([_record(logits, 2)])
    assert len(loads) == 1 and math.isclose(sum(loads[0]), 1.0, rel_tol=1e-6)
