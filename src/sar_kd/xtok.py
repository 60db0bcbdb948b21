"""Cross-tokenizer logit distillation: chunk alignment of two tokenizations and the loss on it.

Both tokenizers read **the same text** (each may normalise internally, e.g. Qwen's NFC, but the
offsets they report are character spans of that one text), and the offsets of a block count
characters from the block's first character on both sides, as :func:`sar_kd.data.pack_dual_blocks`
produces them. Text normalised separately before tokenisation would break the alignment.

*Chunks* are the maximal spans of text between consecutive places where both tokenisations have a
token boundary. Most chunks hold one token on each side (*one-to-one*): both models predict "the
same thing" there and their full next-token distributions are compared after summing each into the
buckets of a :class:`~sar_kd.vocab_map.VocabMap`. The other chunks compare only the probability of
the chunk's text under each model (chain rule over its tokens), as a binarised likelihood match.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from .vocab_map import VocabMap, bucket_probs


@dataclass
class ChunkAlignment:
    """Chunks of a batch of two tokenisations of the same texts (:func:`chunk_alignment`).

    student_chunk (B, Ts), teacher_chunk (B, Tt): int64 chunk id of each token, numbered from 0 in
    text order within its row; -1 for padding and for tokens after the last shared boundary (text
    that is not closed on both sides, e.g. a block whose two tokenisations end at different places).
    student_count, teacher_count (B, C): int64 tokens per chunk on each side (C = most chunks of a
    row; 0 beyond a row's chunks). pairs (P, 3): int64 ``(row, student position, teacher position)``
    of every one-to-one chunk, in row-major text order. student_valid (B, Ts), teacher_valid (B, Tt):
    bool masks of real tokens.
    """

    student_chunk: torch.Tensor
    teacher_chunk: torch.Tensor
    student_count: torch.Tensor
    teacher_count: torch.Tensor
    pairs: torch.Tensor
    student_valid: torch.Tensor
    teacher_valid: torch.Tensor

    @property
    def one_to_one(self) -> torch.Tensor:
        """(B, C) bool: chunks of exactly one token on each side."""
        return (self.student_count == 1) & (self.teacher_count == 1)


def _cuts(offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For one row's real tokens, offsets (n, 2) in text order: (reach (n,), cuts (k,) sorted unique).

    ``reach[k]`` = furthest end among tokens 0..k. A boundary after token k is clean when no later
    token starts before ``reach[k]``; the cuts are those reach values. Byte-level pieces of one
    character share its span, so no cut falls between them. The end of the row is always a cut.
    """
    starts, ends = offsets[:, 0], offsets[:, 1]
    reach = torch.cummax(ends, 0).values
    later = torch.cummin(starts.flip(0), 0).values.flip(0)
    clean = torch.ones_like(reach, dtype=torch.bool)
    clean[:-1] = reach[:-1] <= later[1:]
    return reach, torch.unique(reach[clean])


def _split_by_bytes(
    s_chunk: torch.Tensor, s_nbytes: torch.Tensor, t_chunk: torch.Tensor, t_nbytes: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Cut chunks further where both sides share a *byte* boundary inside a character.

    One row: chunk ids (-1 = none) and byte lengths of its real tokens, in text order, ``n`` chunks.
    A chunk whose two sides hold the same number of bytes, none of them a special (0-byte) token, has
    its tokens' byte ends counted from the chunk start; an end present on both sides is a boundary.
    Other chunks are left whole. Returns the new chunk ids of both sides and the new chunk count.
    """
    sides = []
    for chunk, nb in ((s_chunk, s_nbytes), (t_chunk, t_nbytes)):
        inside = chunk >= 0
        c, nb = chunk[inside], nb[inside].long()
        total = torch.zeros(n, dtype=torch.long, device=chunk.device).index_add_(0, c, nb)
        special = torch.zeros(n, dtype=torch.long, device=chunk.device).index_add_(0, c, (nb == 0).long())
        cum = torch.cumsum(nb, 0)
        end = cum - (cum - nb)[torch.searchsorted(c, c, side="left")]  # byte end within the chunk
        sides.append((inside, c, end, total, special))
    ok = (sides[0][3] == sides[1][3]) & (sides[0][4] == 0) & (sides[1][4] == 0)
    width = int(torch.maximum(sides[0][3], sides[1][3]).max()) + 2 if n else 2
    # Keys (chunk, byte end) in text order; a chunk that is not cut has one key, shared by both sides.
    keys = [c * width + torch.where(ok[c], end, 1) for _, c, end, _, _ in sides]
    shared = torch.unique(keys[0][torch.isin(keys[0], keys[1])])
    out = []
    for (inside, *_), key, chunk in zip(sides, keys, (s_chunk, t_chunk)):
        new = torch.full_like(chunk, -1)
        new[inside] = torch.searchsorted(shared, key, side="left")
        out.append(new)
    return out[0], out[1], len(shared)


def chunk_alignment(
    student_offsets: torch.Tensor,
    student_mask: torch.Tensor,
    teacher_offsets: torch.Tensor,
    teacher_mask: torch.Tensor,
    student_ids: torch.Tensor | None = None,
    teacher_ids: torch.Tensor | None = None,
    vocab_map: VocabMap | None = None,
) -> ChunkAlignment:
    """Chunks where both tokenisations share a boundary, per token and per chunk, as tensors.

    student_offsets (B, Ts, 2), teacher_offsets (B, Tt, 2): character ``[start, end)`` of each token
    from the block's first character (the same origin and text on both sides, see the module
    docstring); masks (B, Ts), (B, Tt): nonzero for real tokens, which are in text order.

    Per row: each side's clean cuts (:func:`_cuts`), their intersection (the shared boundaries, sorted
    ``S``), and each token's chunk ``= #{s ∈ S : s < reach}`` by ``searchsorted``; tokens whose reach
    is past the last shared boundary get -1. Byte-level pieces of one character share its character
    span, so they stay in one chunk. Given the ids (B, Ts), (B, Tt) and the ``vocab_map`` (its byte
    lengths), such chunks are cut further at shared byte boundaries (:func:`_split_by_bytes`): a
    character split into the same pieces on both sides becomes one-to-one chunks, so two identical
    tokenizers always give one-to-one chunks only. Counts by ``bincount``; the one-to-one pairs by
    scattering positions into chunk slots. Only the batch dimension is looped over.
    """
    bsz, ts = student_mask.shape
    tt = teacher_mask.shape[1]
    dev = student_offsets.device
    by_bytes = student_ids is not None and teacher_ids is not None and vocab_map is not None
    if by_bytes:
        s_len, t_len = vocab_map.student_nbytes.to(dev), vocab_map.teacher_nbytes.to(dev)
    s_valid, t_valid = student_mask.bool(), teacher_mask.bool()
    s_chunk = torch.full((bsz, ts), -1, dtype=torch.long, device=dev)
    t_chunk = torch.full((bsz, tt), -1, dtype=torch.long, device=dev)
    rows = []
    for b in range(bsz):
        s_pos, t_pos = s_valid[b].nonzero().squeeze(1), t_valid[b].nonzero().squeeze(1)
        if len(s_pos) == 0 or len(t_pos) == 0:
            rows.append(None)
            continue
        s_reach, s_cuts = _cuts(student_offsets[b, s_pos].long())
        t_reach, t_cuts = _cuts(teacher_offsets[b, t_pos].long())
        shared = s_cuts[torch.isin(s_cuts, t_cuts)]
        n = len(shared)
        sc = torch.searchsorted(shared, s_reach, side="left")
        tc = torch.searchsorted(shared, t_reach, side="left")
        sc, tc = sc.masked_fill(sc >= n, -1), tc.masked_fill(tc >= n, -1)
        if by_bytes and n:
            sc, tc, n = _split_by_bytes(sc, s_len[student_ids[b, s_pos]], tc, t_len[teacher_ids[b, t_pos]], n)
        s_chunk[b, s_pos], t_chunk[b, t_pos] = sc, tc
        rows.append((n, s_pos, sc, t_pos, tc))

    n_max = max([r[0] for r in rows if r is not None] + [0])
    s_count = torch.zeros(bsz, n_max, dtype=torch.long, device=dev)
    t_count = torch.zeros(bsz, n_max, dtype=torch.long, device=dev)
    pairs = []
    for b, r in enumerate(rows):
        if r is None or r[0] == 0:
            continue
        n, s_pos, sc, t_pos, tc = r
        s_in, t_in = sc >= 0, tc >= 0
        s_count[b, :n] = torch.bincount(sc[s_in], minlength=n)
        t_count[b, :n] = torch.bincount(tc[t_in], minlength=n)
        one = (s_count[b, :n] == 1) & (t_count[b, :n] == 1)
        # For a one-to-one chunk the scatter writes its single token's position.
        s_at = torch.full((n,), -1, dtype=torch.long, device=dev).scatter_(0, sc[s_in], s_pos[s_in])
        t_at = torch.full((n,), -1, dtype=torch.long, device=dev).scatter_(0, tc[t_in], t_pos[t_in])
        k = int(one.sum())
        pairs.append(torch.stack([torch.full((k,), b, dtype=torch.long, device=dev), s_at[one], t_at[one]], 1))
    pairs_t = torch.cat(pairs) if pairs else torch.zeros(0, 3, dtype=torch.long, device=dev)
    return ChunkAlignment(s_chunk, t_chunk, s_count, t_count, pairs_t, s_valid, t_valid)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both ends (Mächler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def binarised_kl(log_p_teacher: torch.Tensor, log_p_student: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """KL(Bernoulli(P_t) ‖ Bernoulli(P_s)) elementwise from log-probabilities, in float64.

    ``P_t·(log P_t − log P_s) + (1 − P_t)·(log(1 − P_t) − log(1 − P_s))`` with ``log(1 − P)`` by
    :func:`_log1mexp`. A log-probability that rounds to 0 (P = 1 in fp32) would make ``log(1 − P)``
    infinite: values are clamped to ``≤ −eps`` with a straight-through gradient, so the gradient still
    flows. Returns float64 of the inputs' shape.
    """

    def clamp(x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        return x + (x.clamp(max=-eps) - x).detach()

    lt, ls = clamp(log_p_teacher), clamp(log_p_student)
    l1t, l1s = _log1mexp(lt), _log1mexp(ls)
    return lt.exp() * (lt - ls) + l1t.exp() * (l1t - l1s)


def _sliced(fn: Callable[..., torch.Tensor], tensors: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    """``fn`` over row slices of ``size`` of the tensors (each checkpointed under autograd): outputs."""
    outs = []
    for start in range(0, tensors[0].shape[0], size):
        args = [t[start : start + size] for t in tensors]
        outs.append(checkpoint(fn, *args, use_reentrant=False) if torch.is_grad_enabled() else fn(*args))
    return outs


def _predictable(valid: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: real tokens whose previous position is a real token (so some logits predict them)."""
    out = torch.zeros_like(valid)
    out[:, 1:] = valid[:, 1:] & valid[:, :-1]
    return out


def xtok_loss_sums(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: Callable[[torch.Tensor], torch.Tensor],
    teacher_head: Callable[[torch.Tensor], torch.Tensor],
    student_ids: torch.Tensor,
    teacher_ids: torch.Tensor,
    alignment: ChunkAlignment,
    vocab_map: VocabMap,
    temperature: float = 1.0,
    chunk_size: int = 256,
    lookahead: dict | None = None,
) -> dict[str, torch.Tensor]:
    """Cross-tokenizer KD sums of a batch: bucketed KL on one-to-one chunks, likelihood match elsewhere.

    student_hidden (B, Ts, Hs), teacher_hidden (B, Tt, Ht): final hidden states (after the final
    norm); ``*_head``: (N, H) -> (N, V) logits, already trimmed to the tokenizer's size (V =
    ``len(vocab_map.*_to_bucket)``); student_ids (B, Ts), teacher_ids (B, Tt); ``alignment`` from
    :func:`chunk_alignment`. A token at position j is predicted by the logits at j − 1 (and needs a
    real token there): the first token of a block is never predicted. With ``p = softmax(logits / T)``
    in fp32 and ``q = bucket_probs(p)``:

    - ``kl_sum`` = Σ over one-to-one chunks (student token at j, teacher token at i) of
      ``T² · KL(q_t[i−1] ‖ q_s[j−1])``;
    - ``chunk_sum`` = Σ over the other closed chunks whose tokens are all predicted of
      ``T² · KL(Bernoulli(P_t) ‖ Bernoulli(P_s))``, ``log P = Σ_chunk tokens log p(token)`` per side
      (:func:`binarised_kl`).

    Both carry gradient into both hidden states (hence into the teacher's routers). The heads run on
    gathered rows, ``chunk_size`` rows per checkpointed slice, so at most one slice of
    vocabulary-wide logits exists at a time. Also returned (no gradient): ``n_pairs``, ``n_chunks``
    (the terms of each sum), ``mass_sum`` (Σ over those pairs of the teacher's probability, at T, on
    tokens that are exactly a shared bucket), ``student_tokens`` (real student tokens),
    ``student_tokens_in_pairs`` (student tokens in one-to-one chunks, predicted or not) and
    ``student_tokens_in_chunks`` (student tokens in the chunks of ``chunk_sum``). All 0-d tensors.

    ``lookahead`` (the ``lookahead`` router objective, :mod:`sar_kd.lookahead`): a dict with the
    student's logit direction pieces ``delta``/``mean`` (B, Ts, Hs), the head ``weight`` and its
    direction ``grad_weight``. Then the teacher enters ``kl_sum`` detached (the KL trains the student
    only) and ``look_sum`` = Σ over the pairs of ``T · ⟨ũ, q_t⟩`` (ũ: the bucketed logit direction)
    carries the teacher's gradient. The chunk term is then computed for the student only.
    """
    al, vm, temp = alignment, vocab_map, float(temperature)
    dev = student_hidden.device
    t2b, s2b = vm.teacher_to_bucket.to(dev), vm.student_to_bucket.to(dev)
    t_exact = vm.teacher_exact.to(dev, torch.float32)
    s_pred, t_pred = _predictable(al.student_valid.to(dev)), _predictable(al.teacher_valid.to(dev))
    # Zero sums that still belong to the graph, so a batch without terms backpropagates cleanly.
    zero = (student_hidden.sum() + teacher_hidden.sum()).float() * 0.0

    # One-to-one chunks: full bucketed distributions.
    pairs = al.pairs.to(dev)
    row, sj, ti = pairs[:, 0], pairs[:, 1], pairs[:, 2]
    keep = s_pred[row, sj] & t_pred[row, ti]
    row, sj, ti = row[keep], sj[keep], ti[keep]
    kl_sum, mass_sum, look_sum = zero, zero.detach(), zero
    if len(row):

        def pair_fn(h_s: torch.Tensor, h_t: torch.Tensor, *direction: torch.Tensor) -> torch.Tensor:
            z_s = student_head(h_s).float()
            p_s = torch.softmax(z_s / temp, dim=-1)
            p_t = torch.softmax(teacher_head(h_t).float() / temp, dim=-1)
            q_s = bucket_probs(p_s, s2b, vm.num_buckets)
            q_t = bucket_probs(p_t, t2b, vm.num_buckets)
            tiny = torch.finfo(torch.float32).tiny
            q_kl = q_t.detach() if direction else q_t
            kl = (q_kl * (q_kl.clamp(min=tiny).log() - q_s.clamp(min=tiny).log())).sum()
            mass = (p_t.detach() @ t_exact).sum()  # a matrix-vector product: no (N, V) temporary
            look = kl * 0.0
            if direction:
                from .lookahead import bucketed_direction, logit_direction

                u = logit_direction(
                    direction[0], direction[1], lookahead["weight"], lookahead["grad_weight"], student_head
                )
                u_b = bucketed_direction(u, z_s.detach(), temp, s2b, vm.num_buckets)
                look = temp * (u_b * q_t).sum()
            return torch.stack([kl, mass, look])

        rows = [student_hidden[row, sj - 1], teacher_hidden[row, ti - 1]]
        if lookahead is not None:
            rows += [lookahead["delta"][row, sj - 1], lookahead["mean"][row, sj - 1]]
        sums = torch.stack(_sliced(pair_fn, rows, chunk_size)).sum(0)
        kl_sum, mass_sum = zero + temp**2 * sums[0], sums[1].detach()
        look_sum = zero + sums[2]

    # Other chunks: closed, not one-to-one, every token predicted on both sides.
    n_c = al.student_count.shape[1]
    closed = (al.student_count > 0) & (al.teacher_count > 0) & ~al.one_to_one
    sides = []
    for hidden, head, ids, chunk, pred in (
        (student_hidden, student_head, student_ids, al.student_chunk, s_pred),
        (teacher_hidden, teacher_head, teacher_ids, al.teacher_chunk, t_pred),
    ):
        chunk = chunk.to(dev)
        in_chunk = chunk >= 0
        # A chunk with an unpredicted token (the block's first) cannot be scored on that side.
        bad = torch.zeros(chunk.shape[0], n_c + 1, dtype=torch.long, device=dev)
        bad.scatter_add_(1, chunk.masked_fill(~in_chunk, n_c), (in_chunk & ~pred).long())
        sides.append((hidden, head, ids, chunk, in_chunk, bad[:, :n_c] == 0))
    selected = closed.to(dev) & sides[0][5] & sides[1][5]
    slot = torch.cumsum(selected.flatten(), 0).view_as(selected) - 1  # (B, C) -> index among selected
    n_chunks = int(selected.sum())
    chunk_sum = zero
    tokens_in_chunks = 0
    if n_chunks:
        log_p = []
        for hidden, head, ids, chunk, in_chunk, _ in sides:
            sel = in_chunk & selected.gather(1, chunk.clamp(min=0))
            b, pos = sel.nonzero(as_tuple=True)

            def token_logp(h: torch.Tensor, tgt: torch.Tensor, head=head) -> torch.Tensor:
                logp = torch.log_softmax(head(h).float() / temp, dim=-1)
                return logp.gather(1, tgt[:, None]).squeeze(1)

            lp = torch.cat(_sliced(token_logp, [hidden[b, pos - 1], ids[b, pos]], chunk_size))
            seg = slot[b, chunk[b, pos]]
            log_p.append(torch.zeros(n_chunks, dtype=torch.float64, device=dev).index_add(0, seg, lp.double()))
        tokens_in_chunks = int((sides[0][4] & selected.gather(1, sides[0][3].clamp(min=0))).sum())
        teacher_logp = log_p[1].detach() if lookahead is not None else log_p[1]
        chunk_sum = zero + temp**2 * binarised_kl(teacher_logp, log_p[0]).sum().float()

    one = al.one_to_one.to(dev)
    return {
        "kl_sum": kl_sum,
        "chunk_sum": chunk_sum,
        "look_sum": look_sum,
        "n_pairs": torch.tensor(len(row), device=dev),
        "n_chunks": torch.tensor(n_chunks, device=dev),
        "mass_sum": mass_sum,
        "student_tokens": al.student_valid.sum().to(dev),
        "student_tokens_in_pairs": one.sum().to(dev),
        "student_tokens_in_chunks": torch.tensor(tokens_in_chunks, device=dev),
    }
