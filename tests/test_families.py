"""Exact router gradients, routing weights and logits on every MoE family the package claims.

Each family is a tiny random model from its transformers config. References are written here from
each family's modeling code (scoring function, renormalisation, scaling factor), independently of
``sar_kd.router_grad``, which infers them by probing the router.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from family_configs import TINY_COMMON, TINY_DEEPSEEK
from sar_kd.config import ConfigError
from sar_kd.heads import OutputHead, check_head
from sar_kd.router_grad import RoutingSpec
from sar_kd.routers import RouterController, find_routers, freeze_all_but_routers

COMMON = TINY_COMMON
_DS = TINY_DEEPSEEK
# name -> (model_type, config overrides, (score, renormalised, scale) from the family's modeling code)
FAMILIES = {
    "qwen3_moe_top1": (
        "qwen3_moe",
        dict(num_experts=4, num_experts_per_tok=1, moe_intermediate_size=16, norm_topk_prob=True, head_dim=8),
        ("softmax", True, 1.0),
    ),
    "qwen3_moe_top8": (
        "qwen3_moe",
        dict(num_experts=10, num_experts_per_tok=8, moe_intermediate_size=16, norm_topk_prob=True, head_dim=8),
        ("softmax", True, 1.0),
    ),
    "qwen3_moe_top2_plain": (
        "qwen3_moe",
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=False, head_dim=8),
        ("softmax", False, 1.0),
    ),
    "qwen2_moe_shared": (
        "qwen2_moe",
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16),
        ("softmax", False, 1.0),
    ),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2), ("softmax", True, 1.0)),
    "olmoe": (
        "olmoe",
        dict(num_experts=4, num_experts_per_tok=2, eos_token_id=1, pad_token_id=1),
        ("softmax", False, 1.0),
    ),
    "deepseek_v3": (
        "deepseek_v3",
        dict(
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            **_DS,
        ),
        ("sigmoid", True, 2.5),
    ),
    "deepseek_v3_plain": (
        "deepseek_v3",
        dict(
            n_routed_experts=4,
            num_experts_per_tok=1,
            n_group=1,
            topk_group=1,
            routed_scaling_factor=1.0,
            norm_topk_prob=False,
            **_DS,
        ),
        ("sigmoid", False, 1.0),
    ),
    "gpt_oss": (
        "gpt_oss",
        dict(
            num_local_experts=4, num_experts_per_tok=2, head_dim=8, layer_types=["sliding_attention", "full_attention"]
        ),
        ("softmax", True, 1.0),
    ),
    "granitemoe": (
        "granitemoe",
        dict(num_local_experts=4, num_experts_per_tok=2, logits_scaling=8.0),
        ("softmax", True, 1.0),
    ),
}


def build(name: str, seed: int = 0, vocab_size: int | None = None):
    family, extra, _ = FAMILIES[name]
    over = {**COMMON, **extra}
    if vocab_size is not None:
        over.update(vocab_size=vocab_size, eos_token_id=0, pad_token_id=0, bos_token_id=0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **over)).eval()
    for r in find_routers(model):
        for p in r.module.parameters():
            torch.nn.init.normal_(p, std=0.5)  # fresh routers are all-zero: make routing non-trivial
    return model


def ref_scores(z: torch.Tensor, score: str) -> torch.Tensor:
    return torch.softmax(z, -1) if score == "softmax" else torch.sigmoid(z)


def ref_dense(z: torch.Tensor, spec) -> torch.Tensor:
    """The family's routing function with every expert chosen."""
    score, renorm, scale = spec
    p = ref_scores(z, score)
    return scale * (p / p.sum(-1, keepdim=True) if renorm else p)


def _block_and_router(model):
    router = find_routers(model)[0]
    block = model.get_submodule(router.name.rpartition(".")[0])
    return block, router


def _router_logits(router, x):
    m = router.module
    return F.linear(x.float(), m.weight.float(), getattr(m, "bias", None))


def _expert_outputs(block, x, num_experts):
    """(T, E, H): every expert's output on every token, weight 1."""
    t = x.shape[0]
    return torch.stack(
        [block.experts(x, torch.full((t, 1), i, dtype=torch.long), torch.ones(t, 1)) for i in range(num_experts)], 1
    )


def _grad_of_block(block, router, mode, x, g):
    params = list(router.module.parameters())
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    ctl = RouterController([router], mode)
    ctl.active = True
    try:
        out = block(x[None])
        out = out[0] if isinstance(out, tuple) else out
        (out[0] * g).sum().backward()
    finally:
        ctl.remove()
    return [p.grad.clone() for p in params]


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_routing_function_is_inferred(name):
    model = build(name)
    freeze_all_but_routers(model, find_routers(model))
    ctl = RouterController(find_routers(model), "straight_through")
    ctl.remove()
    score, renorm, scale = FAMILIES[name][2]
    assert set(ctl.specs.values()) == {RoutingSpec(score, renorm, scale)}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_straight_through_gradient_is_the_closed_form(name):
    """∂L/∂z = J_q(z)ᵀ v, v_i = <∂L/∂y, expert_i(x)> for every expert; no native term on top."""
    model = build(name)
    block, router = _block_and_router(model)
    torch.manual_seed(1)
    x, g = torch.randn(12, 32), torch.randn(12, 32)
    got = _grad_of_block(block, router, "straight_through", x, g)
    params = [p.detach().clone().requires_grad_(True) for p in router.module.parameters()]
    with torch.no_grad():
        v = (_expert_outputs(block, x, router.num_experts) * g[:, None, :]).sum(-1)
    z = F.linear(x, params[0], params[1] if len(params) > 1 else None)
    expected = torch.autograd.grad((ref_dense(z, FAMILIES[name][2]) * v).sum(), params)
    for a, b in zip(got, expected):
        assert _rel(a, b) < 1e-5


@pytest.mark.parametrize("name", list(FAMILIES))
def test_straight_through_topk_gradient_is_the_closed_form(name):
    """∂L/∂z = Σ_{i∈S} v_i · w_i · ∂log p_i/∂z over the chosen experts only."""
    model = build(name)
    block, router = _block_and_router(model)
    torch.manual_seed(2)
    x, g = torch.randn(12, 32), torch.randn(12, 32)
    got = _grad_of_block(block, router, "straight_through_topk", x, g)
    with torch.no_grad():
        _, w, idx = router.module(x)
        v = (_expert_outputs(block, x, router.num_experts) * g[:, None, :]).sum(-1).gather(-1, idx)
    params = [p.detach().clone().requires_grad_(True) for p in router.module.parameters()]
    z = F.linear(x, params[0], params[1] if len(params) > 1 else None)
    logp = torch.log(ref_scores(z, FAMILIES[name][2][0])).gather(-1, idx)
    expected = torch.autograd.grad((v * w.float() * logp).sum(), params)
    for a, b in zip(got, expected):
        assert _rel(a, b) < 1e-5


@pytest.mark.parametrize("name", list(FAMILIES))
def test_dense_weights_are_the_native_function_with_every_expert(name):
    model = build(name)
    _, router = _block_and_router(model)
    m = router.module
    x = torch.randn(9, 32)
    with torch.no_grad():
        _, native_w, _ = m(x)
        k = m.top_k
        m.top_k = router.num_experts
        _, all_w, all_idx = m(x)  # the model's own function with k = E
        m.top_k = k
    ctl = RouterController([router], "dense")
    ctl.active = True
    with torch.no_grad():
        _, dense_w, dense_idx = m(x)
    ctl.remove()
    expected = torch.zeros(9, router.num_experts).scatter(-1, all_idx, all_w.float())
    assert torch.equal(dense_idx[0], torch.arange(router.num_experts))
    assert torch.allclose(dense_w.float(), expected, atol=1e-6)
    score, renorm, scale = FAMILIES[name][2]
    if renorm:  # the native weights always sum to the scale: so do the dense ones
        assert torch.allclose(native_w.float().sum(-1), torch.full((9,), scale), atol=1e-5)
        assert torch.allclose(dense_w.float().sum(-1), torch.full((9,), scale), atol=1e-5)


@pytest.mark.parametrize("mode", ["straight_through", "straight_through_topk"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_training_forward_is_native(name, mode):
    model = build(name)
    found = find_routers(model)
    freeze_all_but_routers(model, found)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    ctl = RouterController(found, mode)
    ctl.active = True
    out = model(ids).logits
    ctl.remove()
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_output_head_is_the_models_own(name):
    model = build(name)
    head = OutputHead(model)
    check_head(model, head, "teacher")
    ids = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        ref = model(ids).logits
        got = head(model.base_model(ids).last_hidden_state)
    assert torch.allclose(got, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "family,extra",
    [
        ("gemma2", dict(final_logit_softcapping=2.0, head_dim=8, query_pre_attn_scalar=8)),
        ("cohere", dict(logit_scale=0.25)),
        ("granite", dict(logits_scaling=4.0)),
    ],
)
def test_output_head_applies_softcapping_and_scaling(family, extra):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **{**COMMON, **extra})).eval()
    head = OutputHead(model, 90)  # trimmed to a tokenizer of 90 ids
    ids = torch.randint(0, 90, (1, 10))
    with torch.no_grad():
        ref = model(ids).logits[..., :90]
        got = head(model.base_model(ids).last_hidden_state)
    plain = model.get_output_embeddings()(model.base_model(ids).last_hidden_state)[..., :90]
    assert not torch.allclose(plain, ref, atol=1e-3)  # the post-processing matters
    assert got.shape[-1] == 90 and torch.allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_unknown_logit_postprocessing_is_refused():
    model = build("mixtral")
    head = OutputHead(model)
    head.multiply = 3.0  # a head that is not the model's own function
    with pytest.raises(ConfigError, match="post-processes its logits"):
        check_head(model, head, "teacher")


def test_tokenizer_larger_than_the_head_is_refused():
    with pytest.raises(ConfigError, match="wrong tokenizer"):
        OutputHead(build("mixtral"), 97)


class _RemoteCodeGate(torch.nn.Module):
    """A DeepSeek remote-code style gate: returns (topk_idx, topk_weight, aux_loss)."""

    def __init__(self, experts: int, hidden: int) -> None:
        super().__init__()
        self.top_k = 2
        self.weight = torch.nn.Parameter(torch.randn(experts, hidden))

    def forward(self, x):
        w, idx = torch.softmax(x @ self.weight.T, -1).topk(self.top_k, -1)
        return idx, w, None


def test_router_with_another_output_layout_is_refused():
    model = build("mixtral")
    router = find_routers(model)[0]
    router.module = _RemoteCodeGate(4, 32)
    with pytest.raises(ConfigError, match="not floating logits"):
        RouterController([router], "straight_through")
    RouterController([router], "native").remove()  # native mode leaves it alone


def test_router_with_an_unknown_routing_function_is_refused():
    model = build("mixtral")
    router = find_routers(model)[0]
    real_forward = router.module.forward

    def squared(x):
        logits, w, idx = real_forward(x)
        return logits, w**2, idx

    router.module.forward = squared
    with pytest.raises(ConfigError, match="not a softmax or sigmoid"):
        RouterController([router], "dense")


# ---------------------------------------------------------------- trainer end to end, per family


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tiny_pair):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_pair["teacher"])
    root = tmp_path_factory.mktemp("families")
    dirs = {}
    for name in FAMILIES:
        model = build(name, vocab_size=len(tok))
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        dirs[name] = str(root / name)
    return dirs


@pytest.mark.parametrize("name", list(FAMILIES))
def test_reported_teacher_perplexity_is_the_models_own(name, family_dirs, tiny_pair, tmp_path):
    """Step-0 teacher perplexity (hooks installed, as the trainer runs) == CE of model(input_ids).logits."""
    from conftest import base_args
    from sar_kd import data
    from sar_kd.config import config_from_args
    from sar_kd.trainer import Trainer

    cfg = config_from_args(base_args(tiny_pair, tmp_path / "out", teacher_model=family_dirs[name], eval_max_batches=2))
    t = Trainer(cfg)
    t.setup()
    try:
        reported = t.evaluate()["teacher_ppl"]
        teacher = t.model.teacher
        nll, n = 0.0, 0
        with torch.no_grad():
            for batch in data.eval_batches(t.val_blocks, cfg.per_device_batch_size, cfg.eval_max_batches):
                ids = batch["input_ids"]
                logits = teacher(input_ids=ids).logits
                nll += float(
                    F.cross_entropy(
                        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
                    )
                )
                n += ids[:, 1:].numel()
    finally:
        t.controller.remove()
    assert abs(reported / math.exp(nll / n) - 1) < 1e-4


# ---------------------------------------------------------------- discovery on every MoE family transformers ships

_TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    vocab_size=128,
    max_position_embeddings=64,
    first_k_dense_replace=1,
    pad_token_id=0,
    bos_token_id=0,
    eos_token_id=0,
)
_FAMILY_OVERRIDES = {
    "deepseek_v2": dict(num_experts_per_tok=2),
    "hunyuan_v1_moe": dict(num_experts=4, moe_topk=2),
    "beam": dict(mlp_layer_types=["dense", "sparse", "sparse", "sparse"]),
}
# Routers SAR-KD does not train (discovery must refuse, never pick a wrong module):
UNSUPPORTED = {
    "inkling_text": "the router has more logits than routed experts (extra shared-expert logits)",
    "longcat_flash": "zero-computation experts: the router has more logits than experts",
    "zaya": "the router is an MLP, not one (experts, hidden) matrix",
    "doge": "product-key retrieval of experts, no per-expert router row",
}

# Routers beyond the class transformers records router logits from (module class, why they are routers):
EXTRA_ROUTERS = {
    "deepseek_v4": ("DeepseekV4HashRouter", "hash-selected experts weighted by a learned (experts, hidden) router"),
    "jetmoe": ("JetMoeTopKGating", "the mixture-of-attention heads has a top-k router of its own"),
}


def _moe_causal_lm_families() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from sar_kd.routers import num_experts_of

    names = []
    for fam in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        try:
            cfg = AutoConfig.for_model(fam)
        except Exception:
            continue
        if not hasattr(cfg, "text_config") and (num_experts_of(cfg) or fam in _FAMILY_OVERRIDES):
            names.append(fam)
    return names


def _tiny_meta_model(fam: str):
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        cfg = AutoConfig.for_model(fam)
        over = {k: v for k, v in _TINY.items() if hasattr(cfg, k)} | _FAMILY_OVERRIDES.get(fam, {})
        cfg = AutoConfig.for_model(fam, **over)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # a config that cannot be shrunk generically
        pytest.skip(f"{fam}: no tiny config ({type(e).__name__})")
    finally:
        transformers.logging.set_verbosity(verbosity)


@pytest.mark.parametrize("fam", _moe_causal_lm_families())
def test_discovery_on_every_transformers_moe_family(fam):
    """The routers found are exactly the modules transformers itself records router logits from."""
    model = _tiny_meta_model(fam)
    truth_cls = None
    for cls in type(model).__mro__:
        truth_cls = truth_cls or (getattr(cls, "_can_record_outputs", None) or {}).get("router_logits")
    truth = sorted(n for n, m in model.named_modules() if truth_cls is not None and type(m) is truth_cls.target_class)
    if fam in UNSUPPORTED:
        with pytest.raises(ConfigError, match="no MoE routers found"):
            find_routers(model)
        return
    found = find_routers(model)
    names = sorted(r.name for r in found)
    if truth_cls is None:  # the family declares no router recorder: the found modules must be routers by class
        assert names and all(("Router" in r.kind or "Gate" in r.kind or "Gating" in r.kind) for r in found)
    elif not truth:
        pytest.skip(f"{fam}: no MoE layer at this tiny size")
    else:
        extra = EXTRA_ROUTERS.get(fam, ("", ""))[0]
        assert names == sorted(set(truth) | {r.name for r in found if extra and r.kind == extra})
    for r in found:  # never an expert weight or a shared expert's projection
        for n in r.param_names:
            assert not re.search(r"(^|\.)experts\.\d+\.|shared_expert", n), n
            assert not n.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight", "gate_up_proj")), n


def test_router_whose_forward_needs_more_inputs_is_refused_not_crashed():
    model = build("mixtral")
    router = find_routers(model)[0]
    real_forward = router.module.forward
    router.module.forward = lambda x, expert_bias: real_forward(x)  # a selection bias passed in by the block
    with pytest.raises(ConfigError, match="needs more than the hidden states"):
        RouterController([router], "straight_through")
    RouterController([router], "native").remove()


def test_bf16_router_weights_give_an_exact_scale():
    model = build("deepseek_v3").to(torch.bfloat16)
    ctl = RouterController(find_routers(model), "native")
    ctl.remove()
    assert set(ctl.specs.values()) == {RoutingSpec("sigmoid", True, 2.5)}


# ---------------------------------------------------------------- routers SAR-KD cannot hook: the advice must work

_NATIVE_ONLY = {  # family -> (config overrides, what the refusal says about its routers)
    "phimoe": (dict(num_local_experts=4, num_experts_per_tok=2), "not a softmax or sigmoid of its logits"),
    "jetmoe": (dict(num_local_experts=4, num_experts_per_tok=2, kv_channels=8), "not floating logits"),
}


@pytest.mark.parametrize("fam", list(_NATIVE_ONLY))
def test_refusal_advice_for_unhookable_routers_leads_to_a_finished_run(fam, tiny_pair, tmp_path, capsys, caplog):
    """Issue 18 item 5: PhiMoE (SparseMixer routing) and JetMoE are refused in one line naming
    --router_grad native, and that run finishes, routers trained, nothing invented in its summary
    (JetMoE cannot checkpoint activations: it runs without, said once)."""
    import json
    import logging

    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from conftest import base_args
    from sar_kd.cli import main

    extra, why = _NATIVE_ONLY[fam]
    tok = AutoTokenizer.from_pretrained(tiny_pair["teacher"])
    over = {**COMMON, **extra, "vocab_size": len(tok), "eos_token_id": 0, "pad_token_id": 0, "bos_token_id": 0}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(fam, **over))
    for r in find_routers(model):
        for p in r.module.parameters():
            torch.nn.init.normal_(p, std=0.5)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / fam)
    tok.save_pretrained(tmp_path / fam)
    args = base_args(tiny_pair, tmp_path / "out", teacher_model=str(tmp_path / fam), train_steps=2, eval_steps=2,
                     save_steps=0)  # fmt: skip
    assert main(["train", *args]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(err) == 1 and why in err[0] and "--router_grad native" in err[0], err
    caplog.set_level(logging.INFO, logger="sar_kd")
    assert main(["train", *args, "--router_grad", "native"]) == 0  # the advice, with the default checkpointing
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and "final_student_bpb" in summary
    assert "final_expert_load" not in summary and "final_eval_router_entropy" not in summary  # not measured
    update = load_file(out / "router_update.safetensors")
    assert update and all(not torch.equal(v, initial[k]) for k, v in update.items())  # the routers trained
    said = [r.getMessage() for r in caplog.records if "does not support activation checkpointing" in r.getMessage()]
    assert len(said) == (1 if fam == "jetmoe" else 0), said
