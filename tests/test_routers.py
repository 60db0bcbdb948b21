"""Router discovery, freezing and the router gradient modes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from family_configs import TINY_COMMON, TINY_DEEPSEEK
from sar_kd.config import ConfigError
from sar_kd.routers import (
    RouterController,
    find_routers,
    freeze_all_but_routers,
    router_params,
    routing_gives_no_gradient,
)
from sar_kd.toy import tiny_llama_config, tiny_moe_config

COMMON = TINY_COMMON
# family -> (extra config, expected router parameter names)
FAMILIES = {
    "qwen3_moe": (
        dict(num_experts=4, num_experts_per_tok=1, moe_intermediate_size=48, norm_topk_prob=True, head_dim=8),
        [f"model.layers.{i}.mlp.gate.weight" for i in range(2)],
    ),
    "qwen2_moe": (
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, shared_expert_intermediate_size=48),
        [f"model.layers.{i}.mlp.gate.weight" for i in range(2)],
    ),
    "mixtral": (
        dict(num_local_experts=4, num_experts_per_tok=2),
        [f"model.layers.{i}.mlp.gate.weight" for i in range(2)],
    ),
    "olmoe": (
        dict(num_experts=4, num_experts_per_tok=2, eos_token_id=1, pad_token_id=1),
        [f"model.layers.{i}.mlp.gate.weight" for i in range(2)],
    ),
    "deepseek_v3": (
        TINY_DEEPSEEK
        | dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, n_group=1, topk_group=1),
        ["model.layers.1.mlp.gate.weight"],  # layer 0 is dense (first_k_dense_replace=1)
    ),
    "gpt_oss": (
        dict(
            num_local_experts=4, num_experts_per_tok=2, head_dim=8, layer_types=["sliding_attention", "full_attention"]
        ),
        [f"model.layers.{i}.mlp.router.{p}" for i in range(2) for p in ("weight", "bias")],
    ),
}


def build(family: str, seed: int = 0):
    extra, _ = FAMILIES[family]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **{**COMMON, **extra}))
    for name, p in model.named_parameters():
        if name in FAMILIES[family][1] and p.ndim == 2:
            torch.nn.init.normal_(p, std=0.5)  # fresh routers are all-zero: make routing non-trivial
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_discovery_finds_exactly_the_routers(family):
    model = build(family)
    found = find_routers(model)
    names = sorted(n for r in found for n in r.param_names)
    assert names == sorted(FAMILIES[family][1])
    assert not any("expert" in n or "gate_proj" in n or "gate_up" in n for n in names)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_freeze_leaves_only_routers_trainable(family):
    model = build(family)
    freeze_all_but_routers(model, find_routers(model))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(FAMILIES[family][1])


def test_name_regex_gate_is_validated_by_shape():
    model = build("qwen2_moe")
    # `gate` also matches experts' fused gate_up_proj and shared_expert_gate (1, hidden): shape rejects them
    found = find_routers(model, patterns=["gate"])
    assert sorted(n for r in found for n in r.param_names) == sorted(FAMILIES["qwen2_moe"][1])
    narrowed = find_routers(model, patterns=[r"layers\.1\.mlp\.gate$"])
    assert [r.name for r in narrowed] == ["model.layers.1.mlp.gate"]


def test_patterns_matching_nothing_valid_is_an_error():
    model = build("qwen3_moe")
    with pytest.raises(ConfigError, match="no MoE routers found"):
        find_routers(model, patterns=[r"gate_up_proj", r"self_attn"])


def test_dense_model_is_rejected():
    model = AutoModelForCausalLM.from_config(tiny_llama_config(64))
    with pytest.raises(ConfigError, match="no mixture-of-experts"):
        find_routers(model)


def test_no_gradient_condition():
    assert routing_gives_no_gradient(tiny_moe_config(64, top_k=1, norm_topk_prob=True))
    assert not routing_gives_no_gradient(tiny_moe_config(64, top_k=1, norm_topk_prob=False))
    assert not routing_gives_no_gradient(tiny_moe_config(64, top_k=2, norm_topk_prob=True))


def _router_grad(model, mode: str, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    found = find_routers(model)
    params = freeze_all_but_routers(model, found)
    ctl = RouterController(found, mode)
    ctl.active = True
    try:
        logits = model(ids).logits
        # any loss on the output: cross-entropy against shifted ids
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
        loss.backward()
    finally:
        ctl.remove()
    norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in params.values() if p.grad is not None))
    return logits.detach(), float(norm)


def _top1_teacher(seed=0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_moe_config(96, hidden=32, layers=2, experts=3, top_k=1))
    for r in find_routers(model):
        torch.nn.init.normal_(r.module.weight, std=0.5)
    return model


@pytest.mark.parametrize("mode", ["straight_through", "straight_through_topk"])
def test_straight_through_matches_native_forward_and_gives_real_gradient(mode):
    ids = torch.randint(0, 96, (1, 24), generator=torch.Generator().manual_seed(0))
    native_logits, native_norm = _router_grad(_top1_teacher(), "native", ids)
    st_logits, st_norm = _router_grad(_top1_teacher(), mode, ids)
    assert torch.allclose(native_logits, st_logits, atol=1e-5, rtol=0)
    assert native_norm < 1e-6  # top-1 renormalised: weight is exactly 1.0, no gradient
    assert st_norm > 1e-3
    assert st_norm > 1e4 * max(native_norm, 1e-12)


def test_straight_through_gradient_is_the_expert_switching_derivative():
    """Router gradient = Σ_t J_softmax(p_t)ᵀ v_t ⊗ x_t with v_t,i = <∂L/∂y_t, expert_i(x_t)>."""
    torch.manual_seed(0)
    model = _top1_teacher()
    block = model.model.layers[0].mlp
    found = [r for r in find_routers(model) if r.module is block.gate]
    ctl = RouterController(found, "straight_through")
    ctl.active = True
    x = torch.randn(10, 32)
    g = torch.randn(10, 32)
    y = block(x[None])[0]
    (y * g).sum().backward()
    ctl.remove()
    with torch.no_grad():
        logits = x @ block.gate.weight.T
        p = torch.softmax(logits, -1)
        outs = torch.stack(
            [block.experts(x, torch.full((10, 1), i), torch.ones(10, 1)) for i in range(3)], 1
        )  # (tokens, experts, hidden)
        v = (outs * g[:, None, :]).sum(-1)  # (tokens, experts)
        d_logits = p * (v - (p * v).sum(-1, keepdim=True))  # softmax Jacobian-vector product
        expected = d_logits.T @ x
    assert torch.allclose(block.gate.weight.grad, expected, atol=1e-5, rtol=1e-4)


def test_dense_mode_mixes_all_experts_with_gradient():
    ids = torch.randint(0, 96, (1, 24), generator=torch.Generator().manual_seed(1))
    native_logits, _ = _router_grad(_top1_teacher(), "native", ids)
    dense_logits, dense_norm = _router_grad(_top1_teacher(), "dense", ids)
    assert dense_norm > 1e-3
    assert not torch.allclose(native_logits, dense_logits, atol=1e-4)  # a different (soft) forward


def test_inactive_controller_is_native_and_records_logits_with_grad():
    model = _top1_teacher()
    found = find_routers(model)
    freeze_all_but_routers(model, found)
    ctl = RouterController(found, "dense")
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        ref = model(ids).logits
    ctl.recording = True
    out = model(ids).logits
    ctl.recording = False
    recs = ctl.pop_records()
    assert torch.equal(ref, out)  # active=False: native routing even in dense mode
    assert len(recs) == 2 and recs[0].logits.shape == (20, 3) and recs[0].indices.shape == (20, 1)
    assert recs[0].logits.requires_grad
    ctl.remove()


def test_router_params_keys_are_state_dict_names():
    model = _top1_teacher()
    params = router_params(model, find_routers(model))
    sd = model.state_dict()
    for n, p in params.items():
        assert n in sd and sd[n].data_ptr() == p.data_ptr()
