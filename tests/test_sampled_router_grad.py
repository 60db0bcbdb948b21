"""The sampled all-experts router gradient (``--router_grad_samples M``).

On tiny teachers of each routing function (softmax renormalised top-1, plain softmax top-2, sigmoid
renormalised with a scale, plain sigmoid): the training forward is the native one (its weights
exactly; the output up to the experts' GEMM rounding, as with every expert),
the mean of the sampled gradient over many draws is the all-experts gradient (within 5 standard
errors measured from the draws themselves), and the baseline lowers its variance. Many draws are one
pass: the tokens are repeated and each copy draws its own experts; the gradient of each copy's logits
gives that copy's router-weight gradient.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from family_configs import TINY_COMMON, TINY_DEEPSEEK
from sar_kd.config import ConfigError, TrainConfig, validate_config
from sar_kd.loading import enable_checkpointing, set_frozen_teacher_mode
from sar_kd.router_grad import (
    AUTO_SAMPLES,
    RoutingSpec,
    dense_weights,
    inclusion_probabilities,
    native_weights,
    resolve_samples,
    sample_other_experts,
    sampled_all_experts_gradient,
    sampled_straight_through_weights,
    systematic_sample,
)
from sar_kd.routers import RouterController, find_routers, freeze_all_but_routers

H = 32
COMMON = TINY_COMMON | dict(hidden_size=H)
_DS = TINY_DEEPSEEK | dict(n_group=1, topk_group=1)
# name -> (model_type, config overrides, samples M, expected RoutingSpec)
FAMILIES = {
    "softmax_renorm_top1": (
        "qwen3_moe",
        dict(num_experts=8, num_experts_per_tok=1, moe_intermediate_size=16, norm_topk_prob=True, head_dim=8),
        2,
        RoutingSpec("softmax", True, 1.0),
    ),
    "softmax_top2_of_16": (
        "qwen3_moe",
        dict(num_experts=16, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=False, head_dim=8),
        3,
        RoutingSpec("softmax", False, 1.0),
    ),
    "sigmoid_renorm_scaled": (
        "deepseek_v3",
        dict(n_routed_experts=8, num_experts_per_tok=2, routed_scaling_factor=2.5, norm_topk_prob=True, **_DS),
        2,
        RoutingSpec("sigmoid", True, 2.5),
    ),
    "sigmoid_plain": (
        "deepseek_v3",
        dict(n_routed_experts=8, num_experts_per_tok=1, routed_scaling_factor=1.0, norm_topk_prob=False, **_DS),
        2,
        RoutingSpec("sigmoid", False, 1.0),
    ),
}
DRAWS = 400
TOKENS = 6


def build(name: str, seed: int = 0, spread: float = 0.3):
    """A tiny random teacher whose experts share a common part (``spread``: each expert's own part)
    as upcycled and trained experts do; independent random experts share nothing."""
    family, extra, _, _ = FAMILIES[name]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **{**COMMON, **extra})).eval()
    routers = find_routers(model)
    for r in routers:
        for p in r.module.parameters():
            torch.nn.init.normal_(p, std=0.5)  # fresh routers are all-zero: make routing non-trivial
        block = model.get_submodule(r.name.rpartition(".")[0])
        with torch.no_grad():
            for p in block.experts.parameters():
                if p.ndim == 3 and p.shape[0] == r.num_experts:
                    p.copy_(p[:1] + spread * (p - p[:1]))
    return model


def _block_and_router(model):
    router = find_routers(model)[0]
    return model.get_submodule(router.name.rpartition(".")[0]), router


def _per_copy_weight_grads(block, router, samples, x, g, copies, seed, baseline="shrunk"):
    """(copies, E, H) router-weight gradients, one per copy of the tokens, each with its own draw."""
    ctl = RouterController([router], "straight_through", samples=samples)
    ctl.baseline = baseline
    ctl.active = True
    kept = {}

    def keep(_m, _a, out):
        out[0].retain_grad()
        kept["logits"] = out[0]

    handle = router.module.register_forward_hook(keep)  # after the controller's: sees its output
    try:
        torch.manual_seed(seed)
        out = block(x.repeat(copies, 1)[None])
        out = out[0] if isinstance(out, tuple) else out
        (out[0] * g.repeat(copies, 1)).sum().backward()
    finally:
        handle.remove()
        ctl.remove()
    dz = kept["logits"].grad.view(copies, x.shape[0], -1).double()
    return torch.einsum("nte,th->neh", dz, x.double())


def _inputs(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(TOKENS, H, generator=gen), torch.randn(TOKENS, H, generator=gen)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_spec_and_forward_is_native(name):
    model = build(name)
    found = find_routers(model)
    freeze_all_but_routers(model, found)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    _, _, m, spec = FAMILIES[name]
    ctl = RouterController(found, "straight_through", samples=m)
    assert set(ctl.specs.values()) == {spec}
    assert set(ctl.samples.values()) == {m}
    ctl.active = True
    seen = []
    ctl_hook = found[0].module.register_forward_hook(lambda _m, _a, out: seen.append(out[2].shape[-1]))
    out = model(ids).logits
    ctl_hook.remove()
    ctl.remove()
    assert seen and seen[0] == found[0].top_k + m  # k chosen + m sampled experts ran
    # the weights are exactly the native ones and 0 (test_pure_estimator_matches_its_closed_form); the
    # output differs from native only by GEMM rounding, as the experts see more rows (all-experts too)
    assert torch.allclose(out, ref, rtol=1e-6, atol=1e-6)


def _draws(name, spread, baseline, copies=DRAWS):
    model = build(name, spread=spread)
    block, router = _block_and_router(model)
    freeze_all_but_routers(model, [router])
    x, g = _inputs()
    exact = _per_copy_weight_grads(block, router, 0, x, g, 1, 0)[0]
    return exact, _per_copy_weight_grads(block, router, FAMILIES[name][2], x, g, copies, 7, baseline)


@pytest.mark.parametrize("baseline", ["shrunk", "none"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_sampled_gradient_is_unbiased(name, baseline):
    exact, draws = _draws(name, 0.3, baseline)
    mean, se = draws.mean(0), draws.std(0) / DRAWS**0.5
    # elements with no sampled part (a plain sigmoid's chosen experts) are exact: rounding only
    tol = 5 * se + 1e-6 * exact.abs().max()
    worst = float(((mean - exact).abs() / tol).max())
    print(f"{name} {baseline}: max |mean - exact| / (5 s.e.) {worst:.2f}")
    assert worst < 1, f"{name} {baseline}: the sampled gradient is biased"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_baseline_lowers_the_variance_when_experts_share_a_common_part(name):
    """Experts that share most of their weights (upcycled-like, spread 0.1): the baseline removes the
    shared part of v. With independent random experts (spread 1, printed) it cannot help: the shrunk
    baseline is built to cost little there (≤ 1.25× at zero correlation, see baseline_coefficients)."""
    var = {}
    for spread in (0.1, 1.0):
        for baseline in ("shrunk", "mean", "none"):
            var[spread, baseline] = float(_draws(name, spread, baseline, 200)[1].var(0).sum())
        print(
            f"{name} spread {spread}: total variance "
            + ", ".join(f"{b} {var[spread, b]:.3e}" for b in ("shrunk", "mean", "none"))
        )
    assert var[0.1, "shrunk"] < var[0.1, "none"] and var[0.1, "mean"] < var[0.1, "none"]


def test_a_checkpointed_recompute_draws_the_same_experts():
    """Gradient checkpointing recomputes each layer in the backward: it must sample the same experts
    (torch.utils.checkpoint restores the RNG state), so the gradients equal an uncheckpointed run's."""

    def grads(checkpointing: bool, seed: int):
        model = build("softmax_top2_of_16")
        found = find_routers(model)
        params = freeze_all_but_routers(model, found)
        if checkpointing:
            enable_checkpointing(model)
        set_frozen_teacher_mode(model)
        ctl = RouterController(found, "straight_through", samples=3)
        ctl.active = True
        ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
        torch.manual_seed(seed)
        model(ids, labels=ids).loss.backward()
        ctl.remove()
        return torch.cat([p.grad.flatten() for p in params.values()])

    plain, ckpt, other = grads(False, 5), grads(True, 5), grads(False, 6)
    assert torch.allclose(ckpt, plain, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(other, plain, rtol=1e-3, atol=1e-5)  # the draw matters: the check has teeth


def test_inclusion_probabilities_and_systematic_sample():
    torch.manual_seed(0)
    r = torch.tensor([[8.0, 1.0, 1.0, 1.0, 1.0, 0.5], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    pi = inclusion_probabilities(r, 3)
    assert torch.allclose(pi.sum(-1), torch.full((2,), 3.0, dtype=torch.float64))
    assert pi[0, 0] == 1 and torch.allclose(pi[1], torch.full((6,), 0.5, dtype=torch.float64))
    assert torch.allclose(pi[0, 1:5] / pi[0, 5], torch.full((4,), 2.0, dtype=torch.float64))  # ∝ r below the cap
    counts = torch.zeros(2, 6, dtype=torch.float64)
    n = 4000
    for _ in range(n):
        pos = systematic_sample(pi, 3)
        assert all(len(set(row.tolist())) == 3 for row in pos)  # without replacement
        counts.scatter_add_(-1, pos, torch.ones_like(pos, dtype=torch.float64))
    assert torch.allclose(counts / n, pi, atol=4 * (0.25 / n) ** 0.5)


def test_pure_estimator_matches_its_closed_form():
    """The straight-through expression's backward is J_qᵀ û of the docstring, for every routing function."""
    torch.manual_seed(0)
    z, v = torch.randn(5, 10) * 1.5, torch.randn(5, 10) + 2
    for spec in (RoutingSpec("softmax", True), RoutingSpec("sigmoid", False, 1.5), RoutingSpec("sigmoid", True, 2.5)):
        idx = z.topk(2, -1).indices
        scores = torch.softmax(z, -1).gather(-1, idx)  # any weights: only the detached forward value
        sampled, inv_prob = sample_other_experts(z, idx, 3, spec)
        zz = z.clone().requires_grad_(True)
        w = sampled_straight_through_weights(zz, scores, idx, sampled, inv_prob, spec)
        assert torch.equal(w[:, :2], scores) and torch.equal(w[:, 2:], torch.zeros(5, 3))
        (got,) = torch.autograd.grad((w * v.gather(-1, torch.cat([idx, sampled], -1))).sum(), zz)
        expected = sampled_all_experts_gradient(z, v, idx, sampled, inv_prob, scores, spec)
        assert torch.allclose(got, expected, atol=1e-5)


def test_resolution_fallback_and_config():
    assert resolve_samples(-1, 8, 1) == 0 and resolve_samples(-1, 64, 8) == AUTO_SAMPLES
    assert resolve_samples(4, 8, 2) == 4 and resolve_samples(6, 8, 2) == 0  # k + M >= E: every expert
    model = build("softmax_renorm_top1")
    found = find_routers(model)
    ctl = RouterController(found, "straight_through", samples=7)  # 1 + 7 = 8 experts: all of them
    assert set(ctl.samples.values()) == {0}
    ctl.active = True
    with torch.no_grad():
        _, _, idx = found[0].module(torch.randn(3, H))
    ctl.remove()
    assert torch.equal(idx[0], torch.arange(8))
    topk = RouterController(found, "straight_through_topk", samples=4)
    topk.remove()
    assert set(topk.samples.values()) == {0}
    base = dict(train_file=None, dataset_name="x")
    validate_config(TrainConfig(**base, router_grad_samples=-1, router_grad="dense"))
    validate_config(TrainConfig(**base, router_grad_samples=4))
    with pytest.raises(ConfigError, match="router_grad_samples"):
        validate_config(TrainConfig(**base, router_grad_samples=-2))
    with pytest.raises(ConfigError, match="router_grad_samples"):
        validate_config(TrainConfig(**base, router_grad_samples=4, router_grad="straight_through_topk"))


def test_memory_estimate_counts_the_experts_that_run():
    from sar_kd.estimate import LayerMLP, _layer_elements, count_model, estimate_memory
    from sar_kd.toy import tiny_llama_config, tiny_moe_config

    big = tiny_moe_config(500, hidden=64, layers=2, experts=64, top_k=8)
    mlp = LayerMLP(dense=0, expert=big.moe_intermediate_size)
    for samples, run in ((0, 64), (4, 12), (-1, 8 + AUTO_SAMPLES), (56, 64)):
        assert count_model(big, all_experts=True, samples=samples).layer_elements == _layer_elements(big, mlp, run)
    student = tiny_llama_config(500)
    act = {
        m: estimate_memory(big, student, router_grad_samples=m, cuda=False)["activations"] for m in (0, 4, -1)
    }  # fmt: skip
    assert act[4] < act[-1] < act[0]
    topk = estimate_memory(big, student, router_grad="straight_through_topk", router_grad_samples=4, cuda=False)
    assert topk["activations"] < act[4]  # M only applies to straight_through
    small = tiny_moe_config(500, hidden=64, layers=2, experts=4)
    assert count_model(small, all_experts=True, samples=-1).layer_elements == _layer_elements(
        small, LayerMLP(dense=0, expert=small.moe_intermediate_size), 4
    )


def test_the_trainer_passes_the_option_and_logs_the_resolved_m(tiny_pair, tmp_path, caplog):
    from conftest import base_args
    from sar_kd.config import config_from_args
    from sar_kd.trainer import Trainer

    args = base_args(tiny_pair, tmp_path / "o", router_grad_samples=2, train_steps=1, eval_steps=0, save_steps=0)
    trainer = Trainer(config_from_args(args))
    with caplog.at_level("INFO", logger="sar_kd"):
        trainer.setup()
    assert set(trainer.controller.samples.values()) == {2}  # the tiny teacher: 4 experts top-1
    assert any("chosen + 2 sampled experts per token" in r.getMessage() for r in caplog.records)
    m = trainer.train_step()
    trainer.controller.remove()
    assert m["router_grad_norm"] > 0 and torch.isfinite(torch.tensor(m["router_grad_norm"]))


def test_a_sigmoid_router_whose_scores_all_underflow_stays_finite():
    """Every logit of a token below about -104: the sigmoid scores are 0 in fp32; the sampled weights
    must stay finite (native forward) and the sample must not repeat an expert."""
    spec = RoutingSpec("sigmoid", False, 1.0)
    z = torch.tensor([[-200.0, -190.0, -180.0, -170.0, -160.0, -150.0], [0.5, -1.0, 2.0, 0.1, -0.3, 1.5]])
    indices = z.topk(1, dim=-1).indices
    scores = native_weights(z, indices, spec)
    torch.manual_seed(0)
    ids, inv_prob = sample_other_experts(z, indices, 3, spec)
    assert torch.isfinite(inv_prob).all()
    for row, chosen in zip(ids.tolist(), indices.tolist()):
        assert len(set(row)) == 3 and not set(row) & set(chosen)
    w = sampled_straight_through_weights(z.requires_grad_(), scores, indices, ids, inv_prob, spec)
    assert torch.equal(w[:, 0], scores[:, 0]) and torch.equal(w[:, 1:], torch.zeros_like(w[:, 1:]))
    for renorm in (False, True):
        q = dense_weights(z, RoutingSpec("sigmoid", renorm, 1.0))
        assert torch.isfinite(q).all()
