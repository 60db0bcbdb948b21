"""The routing function of an MoE router and the router-gradient estimators built on it.

Every transformers 5.x top-k router maps router logits ``z`` (tokens, E) to the weights of the
chosen experts ``S`` (tokens, k) by one of these functions, described by a :class:`RoutingSpec`:

* a score per expert ``p = score(z)``: ``softmax`` over all experts (Qwen2/3-MoE, OLMoE, Mixtral,
  GPT-OSS and GraniteMoE — the last two take a softmax over the top-k logits, which equals the
  renormalised full softmax) or an independent ``sigmoid`` per expert (DeepSeek-V3, GLM-4-MoE, ...;
  a selection bias such as ``e_score_correction_bias`` changes which experts are chosen, never the
  weights);
* the chosen scores, optionally renormalised over the chosen experts (``renorm``);
* times a constant ``scale`` (DeepSeek-V3's ``routed_scaling_factor``, 2.5; else 1).

So the native weight of chosen expert ``i ∈ S`` is ``w_i = scale · p_i / (Σ_{j∈S} p_j if renorm else 1)``.

The **dense relaxation** ``q(z)`` is the same function with every expert chosen (``k = E``):
``q_i = scale · p_i / (Σ_j p_j if renorm else 1)``. The estimators (shapes: tokens × E):

* ``straight_through``: forward weights = the native ones (zero for unchosen experts), backward
  ``∂L/∂z = J_q(z)ᵀ v`` with ``v_i = ⟨∂L/∂y, expert_i(x)⟩`` for **every** expert i;
* ``straight_through_topk``: only the chosen experts; ``∂L/∂z = Σ_{i∈S} v_i · w_i · ∂log p_i/∂z``;
* ``dense``: forward and backward of ``q(z)`` (a different forward while training).

The native gradient through the top-k weights is never added on top (the native weights enter
detached).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

SCORES = ("softmax", "sigmoid")


@dataclass(frozen=True)
class RoutingSpec:
    """How a router turns logits into expert weights (see the module docstring)."""

    score: str = "softmax"  # "softmax" | "sigmoid"
    renorm: bool = True
    scale: float = 1.0

    def describe(self) -> str:
        s = f"{self.score}{', renormalised' if self.renorm else ''}"
        return s + (f", x{self.scale:g}" if self.scale != 1.0 else "")


def expert_scores(z: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    """``p = score(z)`` in fp32. z (..., E) -> (..., E)."""
    z = z.float()
    return torch.softmax(z, dim=-1) if spec.score == "softmax" else torch.sigmoid(z)


def log_expert_scores(z: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    """``log p`` in fp32, computed stably. z (..., E) -> (..., E)."""
    z = z.float()
    return torch.log_softmax(z, dim=-1) if spec.score == "softmax" else nn.functional.logsigmoid(z)


def routing_distribution(z: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    """The routing distribution over experts, ``p / Σ_j p_j`` (sums to 1; softmax: ``p`` itself).

    This is what the entropy and load-balance regularisers and the expert statistics read.
    z (..., E) -> (..., E), fp32.
    """
    p = expert_scores(z, spec)
    return p if spec.score == "softmax" else p / p.sum(-1, keepdim=True)


def dense_weights(z: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    """``q(z)``: the native routing function with every expert chosen. z (..., E) -> (..., E), fp32."""
    p = expert_scores(z, spec)
    if spec.renorm:
        p = p / p.sum(-1, keepdim=True)
    return p * spec.scale


def native_weights(z: torch.Tensor, indices: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    """The weights the model itself gives its chosen experts. z (T, E), indices (T, k) -> (T, k)."""
    w = expert_scores(z, spec).gather(-1, indices)
    if spec.renorm:
        w = w / w.sum(-1, keepdim=True)
    return w * spec.scale


def straight_through_weights(z: torch.Tensor, scores: torch.Tensor, indices: torch.Tensor, spec: RoutingSpec):
    """All-experts straight-through weights: forward == native, backward == ``q(z)``'s.

    z (T, E) router logits; scores (T, k) the model's own weights of ``indices`` (T, k).
    Returns (T, E) fp32: ``scatter(scores) + q(z) − stop_grad(q(z))``.
    """
    q = dense_weights(z, spec)
    native = torch.zeros_like(q).scatter(-1, indices, scores.detach().float())
    return native + (q - q.detach())


def topk_straight_through_weights(z: torch.Tensor, scores: torch.Tensor, indices: torch.Tensor, spec: RoutingSpec):
    """Chosen-experts straight-through weights: forward == native, ``∂w_i/∂z = w_i · ∂log p_i/∂z``.

    z (T, E), scores and indices (T, k). Returns (T, k) fp32.
    """
    logp = log_expert_scores(z, spec).gather(-1, indices)
    return scores.detach().float() * torch.exp(logp - logp.detach())


def infer_routing_spec(module: nn.Module, num_experts: int, hidden: int) -> tuple[RoutingSpec | None, str]:
    """Find the :class:`RoutingSpec` that reproduces a router's own weights, by probing it.

    The router is run on random inputs twice: as it is, and (when it has a ``top_k`` attribute)
    with every expert chosen, which tells softmax from sigmoid and renormalised from not even for
    a top-1 renormalised router (whose weights are a constant). Returns ``(spec, "")`` or
    ``(None, reason)`` when the output is not ``(logits (T, E), weights (T, k), indices (T, k))``
    or no spec reproduces it.
    """
    import copy

    # An fp32 copy: bf16/fp16 router weights would fit the scale to rounding noise.
    probe = copy.deepcopy(module).float()
    weight = next(p for p in probe.parameters())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, hidden, generator=gen).to(device=weight.device, dtype=torch.float32)
    runs = []
    top_k = getattr(probe, "top_k", None)
    ks = [top_k, num_experts] if isinstance(top_k, int) and top_k < num_experts else [top_k]
    with torch.no_grad():
        for k in ks:
            if k is not None:
                probe.top_k = k
            try:
                out = probe(x)
            except Exception as e:  # e.g. a forward that also needs a selection bias passed in
                return None, f"its forward needs more than the hidden states ({type(e).__name__})"
            problem = _layout_problem(out, num_experts, x.shape[0])
            if problem:
                return None, problem
            runs.append(out)
    for score in SCORES:
        for renorm in (True, False):
            spec = _fit_scale(runs[-1], RoutingSpec(score, renorm))
            if spec is not None and all(_reproduces(out, spec) for out in runs):
                if len(runs) == 1 and bool(torch.allclose(out[1], out[1].flatten()[0].expand_as(out[1]))):
                    # constant weights (top-1 renormalised) and no top_k to widen the probe with:
                    # softmax and sigmoid cannot be told apart
                    return None, "its routing function cannot be identified (constant weights and no top_k attribute)"
                return spec, ""
    return None, "its weights are not a softmax or sigmoid of its logits (renormalised or not, times a constant)"


def _layout_problem(out, num_experts: int, tokens: int) -> str:
    if not (isinstance(out, tuple) and len(out) >= 3):
        return f"it returns {type(out).__name__}, not (logits, weights, indices)"
    logits, weights, indices = out[0], out[1], out[2]
    if not (isinstance(logits, torch.Tensor) and logits.is_floating_point() and logits.shape == (tokens, num_experts)):
        return f"its first output is not floating logits of shape (tokens, {num_experts})"
    if not (isinstance(indices, torch.Tensor) and not indices.is_floating_point() and indices.ndim == 2):
        return "its third output is not integer expert indices (tokens, k)"
    if not (isinstance(weights, torch.Tensor) and weights.is_floating_point() and weights.shape == indices.shape):
        return "its second output is not floating routing weights of the indices' shape"
    if indices.numel() and not (int(indices.min()) >= 0 and int(indices.max()) < num_experts):
        return "its expert indices are out of range"
    return ""


def _fit_scale(out, spec: RoutingSpec) -> RoutingSpec | None:
    w = native_weights(out[0], out[2], spec)
    ratio = out[1].float() / w.clamp(min=1e-30)
    scale = float(ratio.median())
    if not (scale > 0 and torch.isfinite(torch.tensor(scale))):
        return None
    return RoutingSpec(spec.score, spec.renorm, 1.0 if abs(scale - 1.0) < 1e-5 else round(scale, 6))


def _reproduces(out, spec: RoutingSpec) -> bool:
    w = native_weights(out[0], out[2], spec)
    tol = 1e-2 if out[1].dtype in (torch.float16, torch.bfloat16) else 1e-4
    return bool(torch.allclose(w, out[1].float(), rtol=tol, atol=tol * 1e-2))
