"""Loss functions of SAR-KD: pure functions of tensors.

Conventions: softmax and log-softmax run in fp32; positions whose label is ``IGNORE_INDEX`` (-100)
are excluded; functions return **sums over valid tokens** unless they say otherwise, so the trainer
can normalise by the number of valid tokens of a whole accumulation window.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .routers import RouterRecord

IGNORE_INDEX = -100


def shift_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token labels for causal LM losses: ``labels[:, i] = input_ids[:, i + 1]``.

    (B, T) -> (B, T). The last position and padded positions get ``IGNORE_INDEX``. This is the only
    place in SAR-KD where labels are shifted; losses then compare logits[:, i] with labels[:, i].
    """
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    if attention_mask is not None:
        valid = attention_mask.bool()
        labels[:, :-1] = labels[:, :-1].masked_fill(~(valid[:, :-1] & valid[:, 1:]), IGNORE_INDEX)
    return labels


def kd_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Temperature-scaled KL(teacher ‖ student), summed over valid tokens.

    student_logits, teacher_logits: (N, V); labels: (N,) with ``IGNORE_INDEX`` marking excluded
    positions (only the mask is used). Returns ``T² · Σ_valid KL(softmax(t/T) ‖ softmax(s/T))``, a
    scalar; identical inputs give 0.
    """
    valid = labels != IGNORE_INDEX
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)
    return temperature**2 * kl.masked_fill(~valid, 0.0).sum()


def ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over valid tokens. logits (N, V), labels (N,) already shifted."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def _chunked(
    fn: Callable[..., torch.Tensor], tensors: list[torch.Tensor], labels: torch.Tensor, chunk_size: int, n_out: int
):
    """Σ over token chunks of ``fn(*chunk_tensors, chunk_labels)`` (a vector of ``n_out`` sums).

    Under autograd each chunk is checkpointed: its logits are recomputed in the backward pass, so
    at most one chunk of vocabulary-wide logits is alive at a time. Chunks without a valid label
    are skipped.
    """
    flat = [t.reshape(-1, t.shape[-1]) for t in tensors]
    flat_labels = labels.reshape(-1)
    total = flat[0].new_zeros(n_out, dtype=torch.float32)
    for start in range(0, flat_labels.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        lab = flat_labels[sl]
        if not bool((lab != IGNORE_INDEX).any()):
            continue
        args = [t[sl] for t in flat]
        if torch.is_grad_enabled():
            total = total + checkpoint(fn, *args, lab, use_reentrant=False)
        else:
            total = total + fn(*args, lab)
    return total


def chunked_lm_losses(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: Callable[[torch.Tensor], torch.Tensor],
    teacher_head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    temperature: float,
    chunk_size: int,
    vocab_size: int | None = None,
    teacher_ce_grad: bool = False,
    loss_weights: tuple[float, float, float] | None = None,
    fused: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KD, student CE and teacher CE sums computed ``chunk_size`` tokens at a time.

    student_hidden (B, T, Hs), teacher_hidden (B, T, Ht): final hidden states (after the final
    norm); ``*_head`` map them to logits; labels (B, T) shifted once. At most one chunk of
    full-vocabulary logits of each model exists at any time.
    ``vocab_size`` trims padded vocabulary rows beyond the shared tokenizer. The teacher CE carries
    gradient only with ``teacher_ce_grad``. Returns three scalar sums over valid tokens: (kd, ce, teacher_ce).

    ``fused`` (default): :mod:`sar_kd.fused_kd` computes each chunk's gradients in the forward pass, so
    the backward pass does not run the heads again; it needs ``loss_weights`` = (w_kd, w_ce, w_tce),
    the weights the caller combines the three sums with (default ``(1, 1, 1)``, w_tce 0 without
    ``teacher_ce_grad``; a common factor does not matter, other combinations raise in the backward
    pass). Heads it cannot describe (:func:`sar_kd.fused_kd.head_spec` gives ``None``) and
    ``fused=False`` take the checkpointed path (:func:`_chunked`: the heads run again in the backward).
    """
    if fused:
        from .fused_kd import fused_lm_losses, head_spec

        spec_s, spec_t = head_spec(student_head, vocab_size), head_spec(teacher_head, vocab_size)
        if spec_s is not None and spec_t is not None and spec_s.vocab_size == spec_t.vocab_size:
            if loss_weights is None:
                loss_weights = (1.0, 1.0, 1.0)
            weights = (loss_weights[0], loss_weights[1], loss_weights[2] if teacher_ce_grad else 0.0)
            total = fused_lm_losses(
                student_hidden, teacher_hidden, spec_s, spec_t, labels, temperature, chunk_size, weights
            )
            return total[0], total[1], total[2] if teacher_ce_grad else total[2].detach()

    def chunk_fn(h_s: torch.Tensor, h_t: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        ls = student_head(h_s)
        lt = teacher_head(h_t)
        if vocab_size is not None:
            ls, lt = ls[:, :vocab_size], lt[:, :vocab_size]
        t_ce = ce_loss(lt, lab)
        if not teacher_ce_grad:
            t_ce = t_ce.detach()
        return torch.stack([kd_kl_loss(ls, lt, lab, temperature), ce_loss(ls, lab), t_ce])

    total = _chunked(chunk_fn, [student_hidden, teacher_hidden], labels, chunk_size, 3)
    return total[0], total[1], total[2] if teacher_ce_grad else total[2].detach()


def chunked_ce(
    hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """Cross-entropy sum of one model, ``chunk_size`` tokens at a time. hidden (B, T, H), labels (B, T)."""
    return _chunked(lambda h, lab: ce_loss(head(h), lab).reshape(1), [hidden], labels, chunk_size, 1)[0]


def router_entropy(records: list[RouterRecord], token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean routing entropy (nats) over tokens and routers, with gradient.

    records: router logits (N, E) per router for the same N flattened tokens; token_mask (N,) bool
    selects the tokens that count. The distribution is the router's own (softmax, or normalised
    sigmoid scores ``σ(z)/Σσ(z)`` for sigmoid routers: :meth:`RouterRecord.distribution`).
    """
    vals = []
    for r in records:
        p = r.distribution()
        ent = -(p * torch.log(p.clamp(min=1e-30))).sum(-1)
        vals.append(ent[token_mask].mean() if token_mask is not None else ent.mean())
    return torch.stack(vals).mean()


def router_load_balance(records: list[RouterRecord], token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer load-balance penalty, averaged over routers, with gradient.

    Per router: ``E · Σ_i f_i · P_i`` where f_i is the fraction of (token, slot) assignments that
    chose expert i (no gradient) and P_i the mean routing probability of expert i (gradient; the
    normalised sigmoid scores for sigmoid routers, as DeepSeek-V3's sequence-wise balance loss).
    Equals 1.0 for perfectly uniform routing, E when everything goes to one expert.
    """
    vals = []
    for r in records:
        probs = r.distribution()
        idx = r.indices
        if token_mask is not None:
            probs, idx = probs[token_mask], idx[token_mask]
        num_experts = probs.shape[-1]
        counts = torch.zeros(num_experts, device=probs.device).index_add_(
            0, idx.reshape(-1), torch.ones(idx.numel(), device=probs.device)
        )
        frac = counts / idx.numel()
        vals.append(num_experts * (frac * probs.mean(0)).sum())
    return torch.stack(vals).mean()


def router_anchor(params: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> torch.Tensor:
    """L2 distance of the router parameters to their initial values: Σ ‖θ - θ₀‖², with gradient."""
    return sum(((p.float() - initial[n]) ** 2).sum() for n, p in params.items())


def expert_counts(records: list[RouterRecord], token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(routers, experts) number of (token, slot) assignments to each expert (no gradient)."""
    rows = []
    for r in records:
        idx = r.indices if token_mask is None else r.indices[token_mask]
        rows.append(torch.bincount(idx.reshape(-1), minlength=r.logits.shape[-1]).float())
    return torch.stack(rows)


def expert_load(records: list[RouterRecord], token_mask: torch.Tensor | None = None) -> list[list[float]]:
    """Per router, the fraction of (token, slot) assignments that went to each expert (no gradient)."""
    counts = expert_counts(records, token_mask)
    return (counts / counts.sum(-1, keepdim=True).clamp(min=1)).tolist()
