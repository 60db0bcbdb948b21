"""Aligning two tokenizations of the same text by character-span overlap, as tensor work.

For every student token i and teacher token j the weight is the number of characters their
spans share, normalised so that each student token's weights sum to 1. Student tokens that share
no character with any teacher token (zero-width special tokens, padding) are *unaligned*: they are
masked from the hidden-state loss and counted.
"""

from __future__ import annotations

import torch


def overlap_alignment(
    student_offsets: torch.Tensor,
    student_mask: torch.Tensor,
    teacher_offsets: torch.Tensor,
    teacher_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense alignment matrices of a batch.

    student_offsets (B, Ts, 2), teacher_offsets (B, Tt, 2): character ``[start, end)`` of each token
    in the shared text; masks (B, Ts), (B, Tt): 1 for real tokens. Returns ``weights`` (B, Ts, Tt)
    float32 whose rows sum to 1 for aligned student tokens and 0 otherwise, and ``aligned`` (B, Ts)
    bool.
    """
    s_start = student_offsets[..., 0].unsqueeze(-1).float()  # (B, Ts, 1)
    s_end = student_offsets[..., 1].unsqueeze(-1).float()
    t_start = teacher_offsets[..., 0].unsqueeze(-2).float()  # (B, 1, Tt)
    t_end = teacher_offsets[..., 1].unsqueeze(-2).float()
    overlap = (torch.minimum(s_end, t_end) - torch.maximum(s_start, t_start)).clamp_(min=0)
    overlap = overlap * student_mask.unsqueeze(-1).float() * teacher_mask.unsqueeze(-2).float()
    total = overlap.sum(-1, keepdim=True)
    aligned = total.squeeze(-1) > 0
    return overlap / total.clamp(min=1.0), aligned


def aligned_teacher_states(weights: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """Teacher hidden states pooled onto student positions: (B, Ts, Tt) @ (B, Tt, H) -> (B, Ts, H)."""
    return torch.bmm(weights.to(teacher_hidden.dtype), teacher_hidden)


def hidden_mse_sum(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    weights: torch.Tensor,
    aligned: torch.Tensor,
    projection: torch.nn.Module,
) -> torch.Tensor:
    """Σ over aligned student tokens of mean_d (h_s − P(Σ_j w_ij h_t,j))², in fp32.

    student_hidden (B, Ts, Hs); teacher_hidden (B, Tt, Ht); weights (B, Ts, Tt) and aligned (B, Ts)
    from :func:`overlap_alignment`; ``projection`` maps Ht -> Hs. Pooling then projecting equals
    projecting then pooling (both linear) and is cheaper. Differentiable in the student, the
    projection and the teacher hidden states (hence the teacher's routers).
    """
    target = projection(aligned_teacher_states(weights, teacher_hidden))
    err = (student_hidden.float() - target.float()).pow(2).mean(-1)
    return err.masked_fill(~aligned, 0.0).sum()
