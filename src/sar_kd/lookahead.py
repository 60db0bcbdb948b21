"""The ``lookahead`` router objective: make the student's distillation step good for its quiz loss.

First-order "learning to teach". The student takes θ' = θ − η ∇θ L_kd(θ, φ); the router (φ) wants
the student's CE on a quiz batch, L_q(θ'), low. To first order

    L_q(θ') ≈ L_q(θ) − η ⟨g_q, ∇θ L_kd(θ, φ)⟩,      g_q = ∇θ L_q(θ)  (held constant).

For ``L_kd = T²·KL(p_t ‖ p_s)`` on logits z at temperature T, ``∂L_kd/∂z_s = T (p_s − p_t)`` per token,
so ``⟨g_q, ∇θ L_kd⟩ = T Σ_tokens ⟨u, p_s − p_t⟩`` with ``u = J_θ(z_s) g_q``: how the student's logits
move along g_q (one Jacobian-vector product). Only ``p_t`` depends on φ, so the router minimises

    L_look(φ) = T Σ_tokens ⟨u, p_t(φ)⟩

(teacher mass moves toward the tokens whose student logits rise when the student descends its quiz
loss; no term pulls the teacher toward the student). For the cross-tokenizer loss on bucketed
distributions ``B = bucket(p)`` the same derivation gives ``∂L/∂z_s,v = T p_s,v (1 − B_t,b(v) / B_s,b(v))``
and ``L_look = T Σ_tokens Σ_b B_t,b ũ_b`` with ``ũ_b = Σ_{v∈b} u_v p_s,v / B_s,b`` (identity buckets:
ũ = u). For the hidden-state MSE ``mean_d (h_s − y_t)²``: ``L_look = (2/d) Σ_tokens ⟨u_h, y_t(φ)⟩`` with
``u_h = J_θ(h_s) g_q``.

``u`` is computed by forward-mode AD (:func:`jvp_states`, exact; default) or by a central finite difference of two no-grad student forwards at θ ± ε g_q
(ε = ``rel_eps`` / ‖g_q‖, the approximation DARTS uses for the same term). The step must be small:
a Llama student's RMSNorm right after its small embeddings (std ~0.02) makes the logits strongly
nonlinear along g_q, which is dominated by the embedding's gradient. Measured on tiny random
students against forward-mode AD: in float64 the error falls with ε as it should; in float32 it is
never much below 1e-3 (0.7 at rel_eps 1e-3 from truncation, 1e-3–4e-2 below 3e-5 from round-off),
which is why forward mode is the default. The LM head is bilinear in
(weight, hidden), so its part is exact from the two final hidden states:
``u = W Δh + G_W h̄`` with ``Δh = (h⁺ − h⁻)/(2ε)``, ``h̄ = (h⁺ + h⁻)/2`` and ``G_W`` the head weight's
part of g_q: no perturbed copy of a vocabulary-wide matrix is ever made.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def quiz_gradient(loss: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
    """``g_q = ∇θ L_q``, without touching ``.grad`` (zeros for parameters the loss does not reach)."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]


@contextlib.contextmanager
def shifted(params: list[nn.Parameter], direction: list[torch.Tensor], step: float):
    """Temporarily set ``θ ← θ + step · direction`` (restored exactly on exit)."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(d.to(p.dtype), alpha=step)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def finite_difference_states(forward, params: list[nn.Parameter], direction: list[torch.Tensor], rel_eps: float = 3e-5):
    """Final hidden states at θ ± ε·direction, ε = rel_eps / ‖direction‖.

    ``forward()`` runs the student (no grad) and returns its final hidden states (B, T, H).
    Returns ``(delta, mean)``: ``Δh = (h⁺ − h⁻) / (2ε)`` ≈ J_θ(h) · direction and ``h̄ = (h⁺ + h⁻)/2``,
    both (B, T, H) fp32.
    """
    norm = torch.sqrt(sum(d.float().pow(2).sum() for d in direction))
    eps = rel_eps / float(norm.clamp(min=1e-12))
    with torch.no_grad():
        with shifted(params, direction, eps):
            h_plus = forward().float()
        with shifted(params, direction, -eps):
            h_minus = forward().float()
    return (h_plus - h_minus) / (2 * eps), (h_plus + h_minus) / 2


def jvp_states(body, params: dict[str, torch.Tensor], tangents: dict[str, torch.Tensor]):
    """Final hidden states h and their exact directional derivative ``J_θ(h) · tangents`` (forward mode).

    ``body(params)`` runs the student's base model with the given parameters (``torch.func.functional_call``)
    and returns its final hidden states (B, T, H). Returns ``(delta, h)`` as fp32, in the same form as
    :func:`finite_difference_states` (``mean`` = h). Needs every op to have a forward-mode rule: run the
    student with eager attention (the fused CPU attention kernel has none).
    """
    from torch.func import jvp

    with torch.no_grad():
        h, delta = jvp(body, (params,), (tangents,))
    return delta.float(), h.float()


def logit_direction(
    delta: torch.Tensor, mean: torch.Tensor, weight: torch.Tensor, grad_weight: torch.Tensor, head=None
) -> torch.Tensor:
    """``u = J_θ(z) g`` for logits ``z = post(W h)``: ``W Δh + G_W h̄``, through ``post``'s derivative.

    delta, mean (N, H) from :func:`finite_difference_states`; weight and grad_weight (V, H): the head
    weight and its part of the direction (zeros if the head is not trained). ``head``: an
    :class:`sar_kd.heads.OutputHead` whose post-processing (scaling, soft-capping) and vocabulary
    trim are applied (soft-capping to first order at h̄). Returns (N, V) fp32.
    """
    w = weight.float()
    u = delta.float() @ w.T + mean.float() @ grad_weight.float().T
    if head is None:
        return u
    vocab = head.vocab_size
    u = u[..., :vocab]
    scale = 1.0
    if head.divide:
        scale /= head.divide
    if head.multiply:
        scale *= head.multiply
    u = u * scale
    if head.softcap:
        z = (mean.float() @ w[:vocab].T) * scale
        u = u * (1 - torch.tanh(z / head.softcap) ** 2)
    return u


def lookahead_logit_sum(u: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, valid: torch.Tensor):
    """``T Σ_valid ⟨u, softmax(z_t / T)⟩``: gradient to the teacher only. u, teacher_logits (N, V); valid (N,)."""
    p_t = torch.softmax(teacher_logits.float() / temperature, dim=-1)
    return temperature * (u.detach() * p_t).sum(-1).masked_fill(~valid, 0.0).sum()


def bucketed_direction(u: torch.Tensor, student_logits: torch.Tensor, temperature: float, to_bucket, num_buckets):
    """``ũ_b = Σ_{v∈b} u_v p_s,v / B_s,b``: the student-probability-weighted mean of u in each bucket.

    u, student_logits (N, Vs); to_bucket (Vs,) bucket of each student token. Returns (N, B), no grad.
    """
    with torch.no_grad():
        p_s = torch.softmax(student_logits.float() / temperature, dim=-1)
        idx = to_bucket.to(u.device)
        num = u.new_zeros(u.shape[0], num_buckets).index_add_(1, idx, u.float() * p_s)
        den = u.new_zeros(u.shape[0], num_buckets).index_add_(1, idx, p_s)
        return num / den.clamp(min=1e-30)


def hidden_lookahead_sum(u_h: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(2/d) Σ_valid ⟨u_h, y_t⟩`` for the MSE ``mean_d (h_s − y_t)²``. u_h, target (B, T, d); valid (B, T)."""
    d = target.shape[-1]
    return (2.0 / d) * (u_h.detach().float() * target.float()).sum(-1).masked_fill(~valid, 0.0).sum()


def routing_kl(records, inputs: list[torch.Tensor], initial: list[tuple[torch.Tensor, torch.Tensor | None]], mask):
    """Mean over routers and tokens of ``KL(p_initial ‖ p_current)`` of the routing distributions.

    records: the current forward's :class:`sar_kd.routers.RouterRecord` (logits with gradient);
    inputs: each router's input hidden states (N, H), detached; initial: each router's initial
    (weight, bias). The initial router's logits are recomputed on the same inputs (routers only:
    cheap). Zero at the start of training, with a gradient away from it.
    """
    import torch.nn.functional as F

    from .router_grad import routing_distribution

    vals = []
    for rec, x, (w0, b0) in zip(records, inputs, initial):
        p = rec.distribution()
        with torch.no_grad():
            p0 = routing_distribution(F.linear(x.float(), w0.float(), None if b0 is None else b0.float()), rec.spec)
        kl = (p0 * (torch.log(p0.clamp(min=1e-30)) - torch.log(p.clamp(min=1e-30)))).sum(-1)
        vals.append(kl[mask].mean() if mask is not None else kl.mean())
    return torch.stack(vals).mean()
