"""Validation: student and teacher perplexity and bits per byte on their own tokens, routing entropy and
expert load."""

from __future__ import annotations

import math
from typing import Any

import torch

from . import data, losses
from .bpb import bits_per_byte, label_bytes


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors the model reads (the per-block counts ``n_*`` are for normalisation only)."""
    return {k: v for k, v in batch.items() if not k.startswith("n_")}


@torch.no_grad()
def evaluate(m, routers, val_blocks, cfg, acc, byte_tables: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Perplexities (exp of the token-mean NLL over all processes), bits per byte (summed NLL over the
    UTF-8 bytes the evaluated tokens cover, :mod:`sar_kd.bpb`; ``byte_tables`` maps ``student`` and
    ``teacher`` to their tokenizers' byte-length tables), routing entropy and expert load of ``m`` (a
    :class:`~sar_kd.objective.SARKDModel`, native routing, the student in eval mode) on ``val_blocks``,
    at most ``cfg.eval_max_batches`` batches split over the processes of ``acc``."""
    m.student.eval()
    m.controller.active = False
    dev = acc.device
    # NLLs, token counts, entropy sum, router tokens, student bytes, teacher bytes
    totals = torch.zeros(8, dtype=torch.float64, device=dev)
    tables = {k: v.to(dev) for k, v in byte_tables.items()}
    counts = torch.zeros(len(routers), routers[0].num_experts, dtype=torch.float64, device=dev)
    batches = data.eval_batches(val_blocks, cfg.per_device_batch_size, cfg.eval_max_batches)
    for batch, counted in rank_share(batches, acc.process_index, acc.num_processes, cfg.fsdp):
        batch = {k: v.to(dev) for k, v in model_inputs(batch).items()}
        with acc.autocast():
            r = m.eval_nll(batch)
        if not counted:  # FSDP: a repeated pass, so that every process gathers as often as the others
            continue
        mask = r["token_mask"]
        totals[:4] += torch.stack(
            [r[k].double() for k in ("student_nll", "student_tokens", "teacher_nll", "teacher_tokens")]
        )
        totals[6] += label_bytes(r["student_labels"], tables["student"]).double()
        totals[7] += label_bytes(r["teacher_labels"], tables["teacher"]).double()
        if not r["records"]:  # routers whose output layout is not recorded (native mode only)
            continue
        n_router_tokens = r["records"][0].logits.shape[0] if mask is None else mask.sum()
        totals[4] += losses.router_entropy(r["records"], mask).double() * n_router_tokens
        totals[5] += n_router_tokens
        counts += losses.expert_counts(r["records"], mask).double()
    totals = acc.reduce(totals, reduction="sum")
    counts = acc.reduce(counts, reduction="sum")
    m.student.train()
    loads = counts / counts.sum(-1, keepdim=True).clamp(min=1)
    row = {
        "student_ppl": math.exp(totals[0] / totals[1]),
        "teacher_ppl": math.exp(totals[2] / totals[3]),
        "student_bpb": bits_per_byte(float(totals[0]), float(totals[6])),
        "teacher_bpb": bits_per_byte(float(totals[2]), float(totals[7])),
        "eval_tokens": int(totals[1]),
        "eval_bytes": int(totals[6]),
        "eval_teacher_bytes": int(totals[7]),  # dual mode: the same text, less each block's first token
    }
    if totals[5] > 0:  # routers left native and unrecorded (their layout is not understood): not measured
        row["eval_router_entropy"] = float(totals[4] / totals[5])
        row["expert_load"] = [[round(float(v), 4) for v in r] for r in loads]
    return row


def rank_share(batches, rank: int, world: int, pad: bool) -> list[tuple[dict, bool]]:
    """This process's evaluation batches, ``(batch, counted)``: every ``world``-th one from ``rank``.
    With ``pad`` (FSDP, whose passes are collective) every process runs as many passes: one short of
    batches repeats its first (or the first overall) batch, not counted."""
    batches = list(batches)
    mine = [(b, True) for b in batches[rank::world]]
    if pad and batches:
        filler = (mine[0][0] if mine else batches[0], False)
        mine += [filler] * (-(-len(batches) // world) - len(mine))
    return mine
