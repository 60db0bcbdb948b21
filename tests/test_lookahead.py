"""The lookahead router objective: the Jacobian-vector product, its sign, the trust region."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, jvp
from transformers import AutoModelForCausalLM

from sar_kd import losses
from sar_kd.heads import OutputHead
from sar_kd.lookahead import (
    bucketed_direction,
    finite_difference_states,
    jvp_states,
    logit_direction,
    lookahead_logit_sum,
    quiz_gradient,
    routing_kl,
)
from sar_kd.routers import RouterController, find_routers, freeze_all_but_routers
from sar_kd.toy import tiny_llama_config, tiny_moe_config

V = 64


def _student(seed=0, **kw):
    torch.manual_seed(seed)
    # eager attention: forward-mode AD (the reference below) has no rule for the fused CPU kernel.
    # No padding_idx: autograd drops the embedding-lookup gradient of the padding row by design, which
    # the true Jacobian (finite differences, forward mode) keeps.
    config = tiny_llama_config(V, hidden=32, pad_token_id=None, **kw)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def _teacher(seed=1, top_k=2):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        tiny_moe_config(V, hidden=32, experts=4, top_k=top_k),
        attn_implementation="eager",
        experts_implementation="eager",
    ).eval()
    found = find_routers(model)
    for r in found:
        torch.nn.init.normal_(r.module.weight, std=0.5)
    return model, found


def _ids(seed, n=2, t=16):
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(seed))


def _ce(model, ids):
    return F.cross_entropy(model(ids).logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))


def _u_fd(student, ids, g, rel_eps=3e-5):
    params = list(student.parameters())
    delta, mean = finite_difference_states(lambda: student.base_model(ids).last_hidden_state, params, g, rel_eps)
    head = student.get_output_embeddings()
    g_w = g[[i for i, p in enumerate(params) if p is head.weight][0]]
    return logit_direction(delta, mean, head.weight, g_w, OutputHead(student))


def _u_jvp(student, ids, g):
    names = [n for n, _ in student.named_parameters()]
    params = {n: p.detach() for n, p in student.named_parameters()}
    tangents = {n: t for n, t in zip(names, g)}

    def logits(p):
        return functional_call(student, p, (ids,)).logits

    return jvp(logits, (params,), (tangents,))[1]


def test_forward_mode_states_give_the_exact_logit_direction():
    student = _student(seed=4, tie_word_embeddings=True)
    g = quiz_gradient(_ce(student, _ids(6)), list(student.parameters()))
    ids = _ids(7)
    params = dict(student.named_parameters())

    def body(p):
        base = {k.removeprefix("model."): v for k, v in p.items() if k.startswith("model.")}
        return functional_call(student.base_model, base, (ids,)).last_hidden_state

    delta, h = jvp_states(body, params, dict(zip(params, g)))
    head = student.get_output_embeddings()
    g_w = g[list(params).index("model.embed_tokens.weight")]
    u = logit_direction(delta, h, head.weight, g_w, OutputHead(student))
    exact = _u_jvp(student, ids, g)  # forward mode through the whole model, head included
    assert float((u - exact).norm() / exact.norm()) <= 1e-5


def test_finite_difference_u_matches_forward_mode():
    # Llama's RMSNorm computes in float32 even in a float64 model: the finite difference cannot get
    # much below 1e-3 on these tiny students (tiny embeddings make the logits very nonlinear along g)
    student = _student(tie_word_embeddings=True)
    quiz = _ids(0)
    g = quiz_gradient(_ce(student, quiz), list(student.parameters()))
    ids = _ids(1)
    fd, exact = _u_fd(student, ids, g), _u_jvp(student, ids, g)
    assert float((fd - exact).norm() / exact.norm()) <= 3e-3
    before = [p.detach().clone() for p in student.parameters()]
    _u_fd(student, ids, g)
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))  # θ restored exactly


def test_finite_difference_u_through_untied_scaled_head():
    student = _student(tie_word_embeddings=False)
    student.config.logits_scaling = 4.0  # as GraniteMoE's: the head divides its logits
    head = OutputHead(student)
    quiz = _ids(2)
    g = quiz_gradient(_ce(student, quiz), list(student.parameters()))
    ids = _ids(3)
    params = list(student.parameters())
    delta, mean = finite_difference_states(lambda: student.base_model(ids).last_hidden_state, params, g)
    g_w = g[[i for i, p in enumerate(params) if p is student.lm_head.weight][0]]
    fd = logit_direction(delta, mean, student.lm_head.weight, g_w, head)
    exact = _u_jvp(student, ids, g) / 4.0  # the model's own forward does not scale: the head does
    assert float((fd - exact).norm() / exact.norm()) <= 3e-3


def _kd(student, teacher, ids, temperature):
    labels = losses.shift_labels(ids)
    return losses.kd_kl_loss(
        student(ids).logits.reshape(-1, V), teacher(ids).logits.reshape(-1, V), labels.reshape(-1), temperature
    )


def test_lookahead_step_helps_the_quiz_loss_more_than_the_opposite_step():
    """A small router step along −∇L_look lowers the student's quiz loss after a pilot KD update more
    than the step along +∇L_look does (dense routing: the teacher's forward is differentiable as is)."""
    temperature, lr, step = 2.0, 1e-2, 0.1
    student = _student(seed=3).double()  # float64: the effect is second order in small steps
    teacher, found = _teacher()
    rparams = freeze_all_but_routers(teacher, found)
    teacher.double()
    ctl = RouterController(found, "dense")
    ctl.active = True
    kd_ids, quiz = _ids(10, n=4), _ids(11, n=4)
    s_params = list(student.parameters())
    g_q = quiz_gradient(_ce(student, quiz), s_params)
    u = _u_jvp(student, kd_ids, g_q)  # exact (forward mode)
    valid = losses.shift_labels(kd_ids).reshape(-1) != losses.IGNORE_INDEX
    look = lookahead_logit_sum(u.reshape(-1, V), teacher(kd_ids).logits.reshape(-1, V), temperature, valid)
    grads = torch.autograd.grad(look, list(rparams.values()))
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    base_student = {n: p.detach().clone() for n, p in student.named_parameters()}
    base_router = [p.detach().clone() for p in rparams.values()]

    def quiz_after_pilot(sign: float) -> float:
        with torch.no_grad():
            for p, p0, g in zip(rparams.values(), base_router, grads):
                p.copy_(p0 + sign * step * g / norm)
            for n, p in student.named_parameters():
                p.copy_(base_student[n])
        pilot = torch.autograd.grad(_kd(student, teacher, kd_ids, temperature), s_params)
        with torch.no_grad():
            for p, g in zip(s_params, pilot):
                p.sub_(lr * g)
            return float(_ce(student, quiz))

    down, up = quiz_after_pilot(-1.0), quiz_after_pilot(+1.0)
    ctl.remove()
    print(down, up, up - down, 2 * lr * step * float(norm))
    # To first order L_q(θ'(φ)) = const + lr · L_look(φ), so the two steps differ by 2·lr·step·‖∇L_look‖.
    predicted = 2 * lr * step * float(norm)
    assert down < up
    assert abs((up - down) / predicted - 1) < 0.2


def test_bucketed_direction_with_identity_buckets_is_u():
    u, z = torch.randn(5, V), torch.randn(5, V)
    got = bucketed_direction(u, z, 2.0, torch.arange(V), V)
    assert torch.allclose(got, u, atol=1e-6)
    # two tokens in one bucket: the p_s-weighted mean of their u
    to_bucket = torch.arange(V)
    to_bucket[1] = 0
    got = bucketed_direction(u, z, 1.0, to_bucket, V)
    p = torch.softmax(z, -1)
    expected = (u[:, 0] * p[:, 0] + u[:, 1] * p[:, 1]) / (p[:, 0] + p[:, 1])
    assert torch.allclose(got[:, 0], expected, atol=1e-6)


def test_routing_kl_is_zero_at_start_and_has_a_gradient():
    teacher, found = _teacher(top_k=1)
    rparams = freeze_all_but_routers(teacher, found)
    initial = [(r.module.weight.detach().clone(), None) for r in found]
    ctl = RouterController(found, "straight_through")
    inputs = []
    handles = [r.module.register_forward_hook(lambda m, a, o: inputs.append(a[0].detach())) for r in found]
    ids = _ids(5)

    def kl():
        inputs.clear()
        ctl.recording, ctl.active = True, True
        teacher(ids)
        ctl.recording = False
        return routing_kl(ctl.pop_records(), [x.reshape(-1, x.shape[-1]) for x in inputs], initial, None)

    k0 = kl()
    assert abs(float(k0)) < 1e-7
    with torch.no_grad():
        for p in rparams.values():
            p.add_(0.3 * torch.randn_like(p))
    k1 = kl()
    assert float(k1) > 1e-3
    k1.backward()
    assert all(p.grad is not None and p.grad.norm() > 0 for p in rparams.values())
    for h in handles:
        h.remove()
    ctl.remove()


# ---------------------------------------------------------------- through the trainer


def _trainer(pair, out, **over):
    from conftest import base_args
    from sar_kd.config import config_from_args
    from sar_kd.trainer import Trainer

    quiet = dict(router_anchor_weight=0, router_entropy_weight=0, router_load_balance_weight=0, eval_steps=0)
    t = Trainer(config_from_args(base_args(pair, out, save_steps=0, **{**quiet, **over})))
    t.setup()
    return t


@pytest.mark.parametrize("jvp", ["forward", "finite_difference"])
def test_lookahead_trains_the_router_only_through_l_look(tiny_pair, tmp_path, jvp):
    t = _trainer(tiny_pair, tmp_path / "a", router_objective="lookahead", lookahead_jvp=jvp)
    try:
        m = t.train_step()
        assert m["router_grad_norm"] > 0 and m["student_grad_norm"] > 0 and m["kd_loss"] > 0
        assert m["lookahead"] is not None and math.isfinite(m["lookahead"])
        w = t.model.weights  # the logged loss is the whole objective (regularisers are 0 here)
        assert m["loss"] == pytest.approx(w.alpha_kd * m["kd_loss"] + w.alpha_ce * m["ce_loss"] + m["lookahead"])
        # with L_look weighted 0 nothing else reaches the router: the KD term trains the student only
        t.model.weights.lookahead_weight = 0.0
        m0 = t.train_step()
        assert m0["router_grad_norm"] == 0.0 and m0["student_grad_norm"] > 0
    finally:
        t.controller.remove()


def test_lookahead_with_holdout_quiz_and_trust_region(tiny_pair, tmp_path):
    t = _trainer(tiny_pair, tmp_path / "b", router_objective="lookahead", lookahead_quiz="holdout",
                 router_kl_weight=1.0, router_lr=0.05)  # fmt: skip
    try:
        assert data_blocks(t.quiz_blocks) >= 1
        first = t.train_step()
        second = t.train_step()
    finally:
        t.controller.remove()
    assert first["router_kl"] == pytest.approx(0.0, abs=1e-7)  # the routers have not moved yet
    assert second["router_kl"] > 0


def test_lookahead_in_dual_mode_needs_a_logit_loss(dual_pair, tmp_path):
    from sar_kd.config import ConfigError

    with pytest.raises(ConfigError, match="--dual_loss logit or both"):
        _trainer(dual_pair, tmp_path / "c", block_size=64, router_objective="lookahead", dual_loss="hidden")
    t = _trainer(dual_pair, tmp_path / "d", block_size=64, router_objective="lookahead", dual_loss="logit",
                 grad_accum_steps=1)  # fmt: skip
    try:
        m = t.train_step()
    finally:
        t.controller.remove()
    assert m["router_grad_norm"] > 0 and math.isfinite(m["lookahead"]) and m["xtok_kl"] > 0


def data_blocks(blocks) -> int:
    from sar_kd.data import num_blocks

    return num_blocks(blocks)
