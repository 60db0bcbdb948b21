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
* ``straight_through`` with ``M`` sampled experts (``--router_grad_samples``): the chosen experts plus
  M of the others drawn per token (weight 0 in the forward), and a backward that is an unbiased
  estimate of the all-experts one, ``J_qᵀ û`` with a baseline (:func:`sampled_straight_through_weights`);
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
    return p if spec.score == "softmax" else p / p.sum(-1, keepdim=True).clamp(min=1e-20)


def dense_weights(z: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    """``q(z)``: the native routing function with every expert chosen. z (..., E) -> (..., E), fp32."""
    p = expert_scores(z, spec)
    if spec.renorm:
        p = p / p.sum(-1, keepdim=True).clamp(min=1e-20)  # (DeepSeek's own guard: scores that all underflow)
    return p * spec.scale


def native_weights(z: torch.Tensor, indices: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    """The weights the model itself gives its chosen experts. z (T, E), indices (T, k) -> (T, k)."""
    w = expert_scores(z, spec).gather(-1, indices)
    if spec.renorm:
        w = w / w.sum(-1, keepdim=True).clamp(min=1e-20)
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


# ---------------------------------------------------------------------------------------------------
# Sampled all-experts straight-through (``--router_grad_samples M``)
# ---------------------------------------------------------------------------------------------------

# ``--router_grad_samples -1`` (auto): every expert when the teacher has at most this many ...
AUTO_ALL_EXPERTS_MAX = 8
# ... else this many sampled experts per token besides the chosen ones (bench/bench_router_samples.py)
AUTO_SAMPLES = 8
BASELINES = ("shrunk", "mean", "top", "none")


def resolve_samples(samples: int, num_experts: int, top_k: int) -> int:
    """How many extra experts per token the sampled estimator runs; 0 means every expert.

    ``samples`` -1 (auto): 0 when ``num_experts <= AUTO_ALL_EXPERTS_MAX``, else ``AUTO_SAMPLES``.
    A value with ``top_k + samples >= num_experts`` is 0 too (all experts is then no dearer).
    """
    if samples < 0:
        samples = 0 if num_experts <= AUTO_ALL_EXPERTS_MAX else AUTO_SAMPLES
    return 0 if samples >= num_experts - top_k else int(samples)


def inclusion_probabilities(r: torch.Tensor, m: int) -> torch.Tensor:
    """Inclusion probabilities of a size-``m`` sample proportional to ``r``, capped at 1.

    r (T, R) positive proposal weights, ``m <= R``. Returns π (T, R) float64 with ``Σ_i π_i = m`` and
    ``π_i = min(1, λ r_i)`` (λ per row): the items whose ``λ r_i`` would exceed 1 are taken with
    certainty and the remaining ``m − #capped`` draws are spread over the others in proportion to r.
    The capped set only grows, so ``min(m, R)`` rounds reach the fixed point (no host sync).
    """
    r = r.double()
    capped = torch.zeros_like(r, dtype=torch.bool)
    pi = r * (m / r.sum(-1, keepdim=True))
    for _ in range(min(m, r.shape[-1])):
        capped = capped | (pi >= 1)
        left = m - capped.sum(-1, keepdim=True)
        mass = (r * ~capped).sum(-1, keepdim=True).clamp(min=1e-300)
        pi = torch.where(capped, torch.ones_like(r), r * (left / mass))
    return pi.clamp(max=1.0)


def systematic_sample(pi: torch.Tensor, m: int) -> torch.Tensor:
    """Systematic πps sampling: ``m`` distinct positions per row, position i included with probability π_i.

    pi (T, R) with rows summing to m and entries in [0, 1]. One uniform U per row (torch's global RNG
    on pi's device, so a checkpointed recompute, which restores the RNG state, draws the same sample);
    the points ``U, U+1, ..., U+m−1`` fall into the intervals ``[C_{i−1}, C_i)`` of the cumulative sums
    C of π, and an interval of length π_i ≤ 1 receives one point with probability exactly π_i.
    Returns (T, m) int64 positions into the R columns.
    """
    c = pi.double().cumsum(-1)
    c = c * (m / c[:, -1:].clamp(min=1e-300))  # exact total m despite rounding
    u = torch.rand(pi.shape[0], 1, device=pi.device, dtype=torch.float64)
    points = u + torch.arange(m, device=pi.device, dtype=torch.float64)
    return torch.searchsorted(c, points, right=True).clamp(max=pi.shape[-1] - 1)


def sample_other_experts(z: torch.Tensor, indices: torch.Tensor, m: int, spec: RoutingSpec, mix: float = 0.1):
    """Draw ``m`` of the ``E − k`` unchosen experts per token, without replacement.

    Proposal over the unchosen set R: ``r_i = (1 − mix) · d_i / Σ_{j∈R} d_j + mix / |R|`` with ``d`` the
    routing distribution (:func:`routing_distribution`), so likely experts, whose ``∇q_i`` is large,
    are drawn more often and every expert keeps at least ``mix·m/|R|`` inclusion probability (the
    importance weights ``1/π_i`` are bounded by ``|R|/(mix·m)``). The sampled term's variance is about
    ``Σ_{i∈R} (1/π_i − 1) (v_i − b)² ‖∇q_i‖²`` with ``‖∇q_i‖ ∝ q_i``, smallest for π ∝ q: measured on
    64 experts top-8, mix 0.1 costs 2–10 % more variance than mix 0 and mix 0.5 20–110 % more.
    The sample is systematic πps with the exact inclusion probabilities of
    :func:`inclusion_probabilities`.

    z (T, E) logits, indices (T, k) distinct chosen experts. Returns ``(sampled (T, m) int64 expert
    ids, inv_prob (T, m) fp32 = 1/π of each)``.
    """
    t, e = z.shape
    k = indices.shape[-1]
    with torch.no_grad():
        rest_mask = torch.ones(t, e, dtype=torch.bool, device=z.device).scatter(-1, indices, False)
        # (T, R) unchosen expert ids, ascending (a stable sort, not nonzero(): no host sync on a GPU)
        rest = torch.sort(rest_mask.to(torch.uint8), dim=-1, descending=True, stable=True).indices[:, : e - k]
        # the scores themselves (renormalised over the rest just below): a sigmoid router's scores may all
        # underflow to 0 for a token, where p / Σp would be NaN; such a row falls back to uniform
        d = expert_scores(z.detach(), spec).gather(-1, rest)
        r = (1 - mix) * d / d.sum(-1, keepdim=True).clamp(min=1e-30) + mix / (e - k)
        pi = inclusion_probabilities(r, m)
        pos = systematic_sample(pi, m)
        return rest.gather(-1, pos), (1.0 / pi.gather(-1, pos)).float()


def baseline_coefficients(scores: torch.Tensor, baseline: str = "shrunk") -> torch.Tensor:
    """β (T, k), detached: the per-token baseline is ``b = Σ_{j∈S} β_j v_j``.

    ``mean``: the native-weighted mean of the chosen experts' v (``β = w / Σ w``); ``shrunk``: that
    mean times ``λ = 1 / (1 + Σ_j β_j²)`` (k/(k+1) for equal weights, ½ for top-1); ``top``: v of the
    chosen expert with the largest weight; ``none``: b = 0.

    Why shrink: with the experts' v of variance σ² and correlation ρ across experts, an unchosen
    expert's ``Var(v_i − λ·mean) = σ² (1 − 2λρ + λ² (Σβ² + ρ (1 − Σβ²)))``; λ = 1 doubles the variance
    of a top-1 router's sampled term when ρ = 0 and only helps when ρ > ½, λ = 0 never helps. The λ
    above is the best one at ρ = ½: at ρ = 0 it costs a factor ``1 + Σβ²/(1 + Σβ²)² ≤ 1.25`` and it
    keeps most of the gain when the experts share a common part (measured: docs/router_gradient.md).
    """
    w = scores.detach().float()
    if baseline in ("mean", "shrunk"):
        beta = w / w.sum(-1, keepdim=True).clamp(min=1e-30)
        return beta if baseline == "mean" else beta / (1 + beta.pow(2).sum(-1, keepdim=True))
    if baseline == "top":
        return torch.zeros_like(w).scatter(-1, w.argmax(-1, keepdim=True), 1.0)
    if baseline == "none":
        return torch.zeros_like(w)
    raise ValueError(f"baseline must be one of {BASELINES}, not {baseline!r}")


def sampled_straight_through_weights(
    z: torch.Tensor,
    scores: torch.Tensor,
    indices: torch.Tensor,
    sampled: torch.Tensor,
    inv_prob: torch.Tensor,
    spec: RoutingSpec,
    baseline: str = "shrunk",
) -> torch.Tensor:
    """Sampled all-experts straight-through weights: forward == native, backward unbiased for ``J_qᵀ v``.

    z (T, E) logits; scores, indices (T, k) the model's own weights and chosen experts; sampled,
    inv_prob (T, m) from :func:`sample_other_experts`. Returns (T, k + m) fp32 for the experts
    ``cat(indices, sampled)``: the native weights for the chosen ones, exactly 0 for the sampled ones.

    The backward receives ``v_i = ⟨∂L/∂y, expert_i(x)⟩`` for those k + m columns and gives
    ``∂L/∂z = J_qᵀ û`` with, per token, ``b = Σ_{j∈S} β_j v_j`` (:func:`baseline_coefficients`) and

        û_i = v_i                      i ∈ S (chosen, exact)
        û_i = b + (v_i − b) / π_i      i sampled
        û_i = b                        otherwise

    i.e. ``J_qᵀ û = Σ_{i∈S} (v_i − b) ∇q_i + Σ_{i sampled} (v_i − b)/π_i ∇q_i + b ∇(Σ_i q_i)``.
    Unbiased: ``E[1{i sampled}/π_i] = 1`` and b does not depend on the sample, so
    ``E[J_qᵀ û] = J_qᵀ (v − b·1) + b ∇(Σ_i q_i) = J_qᵀ v`` for any b. For softmax (renormalised or
    not) and renormalised sigmoid routers ``Σ_i q_i`` is a constant (1 or the scale), so the last term
    vanishes and subtracting b from every expert only removes what the experts share, which lowers
    the variance of the sampled part; for a plain sigmoid router ``b ∇(Σ_i q_i) = b · scale · σ'(z)``
    (elementwise), an exact term that needs no expert output, and is kept.

    Written as a straight-through expression (no custom Function), with β, 1/π detached:
    chosen column j: ``q_j + β_j (Σ_i q_i − Σ_{l∈S} q_l − Σ_{l sampled} q_l/π_l)``; sampled column i:
    ``q_i/π_i``; each plus the native weight minus its own detached value.
    """
    q = dense_weights(z, spec)
    total = q.sum(-1, keepdim=True)
    q_chosen = q.gather(-1, indices)
    q_sampled = q.gather(-1, sampled) * inv_prob
    beta = baseline_coefficients(scores, baseline)
    rest = total - q_chosen.sum(-1, keepdim=True) - q_sampled.sum(-1, keepdim=True)
    f = torch.cat([q_chosen + beta * rest, q_sampled], -1)
    native = torch.cat([scores.detach().float(), torch.zeros_like(q_sampled)], -1)
    return native + (f - f.detach())


def sampled_all_experts_gradient(
    z: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, sampled: torch.Tensor, inv_prob: torch.Tensor,
    scores: torch.Tensor, spec: RoutingSpec, baseline: str = "shrunk",
) -> torch.Tensor:  # fmt: skip
    """The estimator in closed form, from every expert's v: ∂L/∂z (T, E) = ``J_qᵀ û`` (see above).

    z, v (T, E); indices, scores (T, k); sampled, inv_prob (T, m). For tests and benchmarks: the
    training path never has the unsampled experts' v.
    """
    b = (baseline_coefficients(scores, baseline) * v.gather(-1, indices)).sum(-1, keepdim=True)
    u = b.expand_as(v).clone()
    u.scatter_(-1, indices, v.gather(-1, indices))
    u.scatter_add_(-1, sampled, (v.gather(-1, sampled) - b) * inv_prob)
    zz = z.detach().float().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(dense_weights(zz, spec), zz, u)
    return g
