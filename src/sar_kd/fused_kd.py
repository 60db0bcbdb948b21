"""The fused KD chunk: KD and CE sums *and their gradients* in one pass over the LM heads.

The checkpointed path (:func:`sar_kd.losses._chunked`) runs each chunk's two vocabulary-wide LM
heads twice: once in the forward pass and once more in the backward pass, to rebuild the logits it
did not keep. Here each chunk of ``n`` tokens computes, in the forward pass, the sums

* ``kd  = τ² Σ_valid KL(softmax(z_t/τ) ‖ softmax(z_s/τ))``,
* ``ce  = Σ_valid CE(z_s, y)``, ``tce = Σ_valid CE(z_t, y)``,

and, from the same logits ``z_s = post_s(h_s W_sᵀ + b_s)``, ``z_t = post_t(h_t W_tᵀ + b_t)`` (both
``(n, V)``), the gradient of the **weighted** sum ``L = w_kd·kd + w_ce·ce + w_tce·tce``:

* ``∂L/∂z_s = w_kd·τ·(p_s − p_t) + w_ce·(softmax(z_s) − onehot(y))``,
* ``∂L/∂z_t = w_kd·τ·p_t ⊙ (log p_t − log p_s − KL) + w_tce·(softmax(z_t) − onehot(y))``,

where ``p = softmax(z/τ)`` and ``KL`` is the row's KL value (rows with label ``IGNORE_INDEX`` get 0),
through the output function ``post`` (``z = c·tanh(s·a/c)``: ``∂z/∂a = s·(1 − (z/c)²)``, ``s`` the
logit scale) to ``∂L/∂h = G W`` (``(n, H)``), ``∂L/∂W = Gᵀ h`` (``(V, H)``), ``∂L/∂b = Σ_rows G``. Only
these are kept — one ``(N, H)`` gradient per hidden input (N tokens in all) and one ``(V_rows, H)``
per trainable head weight — never an ``(n, V)`` tensor beyond the chunk. The backward pass multiplies
them by the incoming scalar: it does not touch the heads.

**Why the weights come first.** The KD and CE gradients of the student head weight are each
``(V, H)`` (350 MB for a 151,936 × 576 fp32 head): storing them per output would double that, while
combining with ``w`` in the forward stores one. The caller states the weights it will combine the
three sums with; the backward checks that the incoming gradient ``g`` (3,) is ``λ·w`` (a common factor
is fine: gradient accumulation, loss scaling) and raises otherwise, so a mismatch cannot give a wrong
gradient silently.

**Numerics.** The logits are computed exactly as the model's :class:`~sar_kd.heads.OutputHead` under
the same autocast state (same dtype, same operations: linear, ``/ logits_scaling``,
``· logit_scale``, soft-cap, trim), then upcast to fp32 for the softmaxes, as the checkpointed path
does. The logit gradient is formed in fp32, cast once to the logits' compute dtype for the two
products with the head (as autograd's linear backward would see it), and the products are kept in
fp32 buffers: they are multiplied by the incoming scalar later, and fp32 avoids a second rounding of
a gradient that is O(N·H) small (the weight buffer is the size of the fp32 ``.grad`` it becomes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100  # = sar_kd.losses.IGNORE_INDEX (not imported: losses imports this module)


@dataclass(frozen=True)
class Post:
    """A head's output function after its linear map, in the order :class:`~sar_kd.heads.OutputHead`
    applies it: ``/ divide``, ``· multiply``, ``softcap·tanh(·/softcap)``; then rows ``[:vocab_size]``."""

    divide: float | None = None
    multiply: float | None = None
    softcap: float | None = None

    @property
    def scale(self) -> float:
        """The linear part: ``∂z/∂a`` without soft-cap."""
        s = 1.0
        if self.divide:
            s /= self.divide
        if self.multiply:
            s *= self.multiply
        return s

    def apply_(self, logits: torch.Tensor) -> torch.Tensor:
        """In place on the raw head output ``a`` (n, V) -> ``z`` (same values as the out-of-place ops)."""
        if self.divide:
            logits.div_(self.divide)
        if self.multiply:
            logits.mul_(self.multiply)
        if self.softcap:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits


@dataclass(frozen=True)
class HeadSpec:
    """What the fused chunk needs of a head: its linear map, output function and vocabulary."""

    weight: torch.Tensor  # (V_rows, H)
    bias: torch.Tensor | None  # (V_rows,)
    post: Post
    vocab_size: int  # V <= V_rows: rows beyond it get no probability mass


def head_spec(head, vocab_size: int | None = None) -> HeadSpec | None:
    """The fusable description of ``head`` (an :class:`~sar_kd.heads.OutputHead` or a plain
    ``nn.Linear``), trimmed to ``vocab_size`` if given; ``None`` for anything else (a custom module,
    a Linear subclass with its own forward, hooks on the layer, e.g. accelerate's offloading hooks, a
    weight that is not a plain tensor): those keep the checkpointed path. (Under FSDP2 the heads sit in
    the root unit, whose weights are gathered plain tensors during the forward pass.)"""
    from .heads import OutputHead

    if isinstance(head, OutputHead):
        lin = head._model[0].get_output_embeddings()
        post, rows = Post(head.divide, head.multiply, head.softcap), head.vocab_size
    elif isinstance(head, nn.Linear):
        lin, post, rows = head, Post(), head.out_features
    else:
        return None
    if not isinstance(lin, nn.Linear) or type(lin).forward is not nn.Linear.forward:
        return None
    if lin._forward_hooks or lin._forward_pre_hooks or lin._backward_hooks or lin._backward_pre_hooks:
        return None
    if hasattr(lin, "_hf_hook"):
        return None
    g = nn.modules.module
    if g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks:
        return None
    if g._global_backward_pre_hooks:
        return None
    w = lin.weight
    # a plain 2-D tensor (not a DTensor shard between FSDP forwards, a quantised subclass or meta)
    if type(w.data) is not torch.Tensor or w.ndim != 2 or w.is_meta:
        return None
    vocab = min(rows, vocab_size) if vocab_size is not None else rows
    return HeadSpec(w, lin.bias, post, min(vocab, w.shape[0]))


@dataclass(frozen=True)
class FusedOptions:
    """Non-tensor arguments of :class:`FusedKDLoss`."""

    student_post: Post
    teacher_post: Post
    vocab_size: int
    temperature: float
    chunk_size: int
    loss_weights: tuple[float, float, float]  # (w_kd, w_ce, w_tce); w_tce 0 when the teacher CE has no gradient


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return h.dtype


def _head_grads(
    g: torch.Tensor,
    h: torch.Tensor,
    w: torch.Tensor,
    gh_out: torch.Tensor | None,
    gw: torch.Tensor | None,
    gb: torch.Tensor | None,
) -> None:
    """Backpropagate the fp32 logit gradient ``g`` (n, V) through ``a = h wᵀ + b`` (h (n, H) and w (V, H)
    in the compute dtype): ``gh_out = g w`` (written), ``gw += gᵀ h``, ``gb += Σ_rows g`` (accumulated,
    fp32, first V rows)."""
    v = g.shape[1]
    if gb is not None:
        gb[:v].add_(g.sum(0))
    gc = g.to(w.dtype)
    if gh_out is not None:
        gh_out.copy_(gc @ w)
    if gw is not None:
        if gc.dtype == gw.dtype:
            gw[:v].addmm_(gc.t(), h)
        else:
            gw[:v].add_(gc.t() @ h)


def fused_kd_sums(
    h_s: torch.Tensor,
    h_t: torch.Tensor,
    w_s: torch.Tensor,
    b_s: torch.Tensor | None,
    w_t: torch.Tensor,
    b_t: torch.Tensor | None,
    labels: torch.Tensor,
    opts: FusedOptions,
    need: tuple[bool, bool, bool, bool, bool, bool] = (False,) * 6,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """The sums and the gradients of their weighted sum, ``opts.chunk_size`` tokens at a time.

    h_s (N, Hs), h_t (N, Ht): final hidden states (flattened); w_s (Vs_rows, Hs), w_t (Vt_rows, Ht) and
    optional biases: the heads' linear maps; labels (N,) (``IGNORE_INDEX`` excluded). ``need`` says
    which of (h_s, h_t, w_s, b_s, w_t, b_t) want a gradient. Returns ``(sums, grads)``: sums = fp32
    ``[kd, ce, tce]`` (3,) and, for each of the six inputs, ``∂(Σ_i w'_i·sum_i)/∂input`` in fp32 (same
    shape as the input; ``None`` where not needed) with ``w' = loss_weights / max|loss_weights|`` (unit
    scale, so half-precision products neither over- nor underflow because of tiny weights). Chunks
    without a valid label are skipped (zero gradient), as in the checkpointed path.
    """
    tau = float(opts.temperature)
    v = opts.vocab_size
    wmax = max(abs(x) for x in opts.loss_weights)
    wk, wc, wt = (x / wmax for x in opts.loss_weights) if wmax > 0 else (0.0, 0.0, 0.0)
    need_hs, need_ht, need_ws, need_bs, need_wt, need_bt = need
    # a side gets a gradient only if some weighted term reaches it
    need_s = (need_hs or need_ws or need_bs) and (wk != 0 or wc != 0)
    need_t = (need_ht or need_wt or need_bt) and (wk != 0 or wt != 0)

    def zeros(t, on):
        return torch.zeros(t.shape, dtype=torch.float32, device=t.device) if on and t is not None else None

    gh_s, gh_t = zeros(h_s, need_s and need_hs), zeros(h_t, need_t and need_ht)
    gw_s, gb_s = zeros(w_s, need_s and need_ws), zeros(b_s, need_s and need_bs)
    gw_t, gb_t = zeros(w_t, need_t and need_wt), zeros(b_t, need_t and need_bt)

    cd_s, cd_t = _compute_dtype(h_s), _compute_dtype(h_t)
    sums = torch.zeros(3, dtype=torch.float32, device=h_s.device)
    n = labels.shape[0]
    chunks = [(i, min(i + opts.chunk_size, n)) for i in range(0, n, opts.chunk_size)]
    valid_all = labels != IGNORE_INDEX
    if not chunks:
        return sums, [gh_s, gh_t, gw_s, gb_s, gw_t, gb_t]
    has_valid = torch.stack([valid_all[a:b].any() for a, b in chunks]).tolist()  # one sync for all chunks
    with torch.autocast(h_s.device.type, enabled=False):
        # the heads in the compute dtype, once per call (autocast would cast a frozen weight per use)
        ws_c, wt_c = w_s[:v].to(cd_s), w_t[:v].to(cd_t)
        bs_c = b_s[:v].to(cd_s) if b_s is not None else None
        bt_c = b_t[:v].to(cd_t) if b_t is not None else None
        sp, tp = opts.student_post, opts.teacher_post
        for (a, b), ok in zip(chunks, has_valid):
            if not ok:
                continue
            lab = labels[a:b]
            valid = valid_all[a:b]
            m = valid.to(torch.float32)[:, None]  # (n, 1)
            idx = lab.masked_fill(~valid, 0)[:, None]  # (n, 1), a safe column for ignored rows
            hs_c, ht_c = h_s[a:b].to(cd_s), h_t[a:b].to(cd_t)

            # ---- teacher: logits, CE value, log p_t
            zt = tp.apply_(F.linear(ht_c, wt_c, bt_c)).float()  # (n, V) fp32
            fac_t = 1 - (zt / tp.softcap) ** 2 if (need_t and tp.softcap) else None
            lse_t = torch.logsumexp(zt, -1)
            sums[2] += (lse_t - zt.gather(1, idx).squeeze(1)).masked_fill(~valid, 0.0).sum()
            lt = torch.log_softmax(zt / tau if tau != 1 else zt, dim=-1)
            qt = zt.sub_(lse_t[:, None]).exp_() if (need_t and wt != 0) else None  # softmax(z_t), in place
            del zt

            # ---- student: logits, CE value, log p_s
            zs = sp.apply_(F.linear(hs_c, ws_c, bs_c)).float()
            fac_s = 1 - (zs / sp.softcap) ** 2 if (need_s and sp.softcap) else None
            lse_s = torch.logsumexp(zs, -1)
            sums[1] += (lse_s - zs.gather(1, idx).squeeze(1)).masked_fill(~valid, 0.0).sum()
            ls = torch.log_softmax(zs / tau if tau != 1 else zs, dim=-1)
            qs = zs.sub_(lse_s[:, None]).exp_() if (need_s and wc != 0 and tau != 1) else None
            del zs

            # ---- KD value: τ² Σ_valid Σ_v p_t (log p_t − log p_s)
            pt = lt.exp()
            diff = lt.sub_(ls)  # log p_t − log p_s, in place of log p_t
            del lt
            kl = torch.einsum("nv,nv->n", pt, diff)  # (n,), no (n, V) temporary
            sums[0] += tau**2 * kl.masked_fill(~valid, 0.0).sum()

            # ---- teacher gradient: w_kd τ p_t (diff − KL) + w_tce (softmax(z_t) − onehot), through post
            if need_t:
                g = diff.sub_(kl[:, None]).mul_(pt).mul_(m * (wk * tau * tp.scale))
                if qt is not None:
                    coef = m * (wt * tp.scale)
                    g.add_(qt.mul_(coef)).scatter_add_(1, idx, -coef)
                    del qt
                if fac_t is not None:
                    g.mul_(fac_t)
                    del fac_t
                _head_grads(g, ht_c, wt_c, gh_t[a:b] if gh_t is not None else None, gw_t, gb_t)
                del g
            del diff

            # ---- student gradient: w_kd τ (p_s − p_t) + w_ce (softmax(z_s) − onehot), through post
            if need_s:
                ck, cc = m * (wk * tau * sp.scale), m * (wc * sp.scale)
                g = ls.exp_()  # p_s, in place of log p_s
                if qs is None:  # τ = 1: softmax(z_s) is p_s
                    g.mul_(ck + cc)
                else:
                    g.mul_(ck).add_(qs.mul_(cc))
                    del qs
                g.addcmul_(pt, ck, value=-1.0).scatter_add_(1, idx, -cc)
                if fac_s is not None:
                    g.mul_(fac_s)
                    del fac_s
                _head_grads(g, hs_c, ws_c, gh_s[a:b] if gh_s is not None else None, gw_s, gb_s)
                del g
            del pt, ls
    return sums, [gh_s, gh_t, gw_s, gb_s, gw_t, gb_t]


class FusedKDLoss(torch.autograd.Function):
    """``[kd, ce, tce]`` (3,) of :func:`fused_kd_sums`, whose backward only rescales saved gradients.

    forward(h_s (N, Hs), h_t (N, Ht), w_s, b_s, w_t, b_t, labels (N,), opts) -> (3,) fp32. The
    gradient is valid for an incoming ``g = λ·opts.loss_weights`` (any λ, e.g. 1/accumulation steps ×
    a loss scale); any other ``g`` raises. Saved: the fp32 gradients of :func:`fused_kd_sums`, each
    the size of its input (a second backward through the same graph fails: they are scaled in place).
    Not to be wrapped in a checkpoint (there is nothing to recompute).
    """

    @staticmethod
    def forward(ctx, h_s, h_t, w_s, b_s, w_t, b_t, labels, opts: FusedOptions):
        sums, grads = fused_kd_sums(h_s, h_t, w_s, b_s, w_t, b_t, labels, opts, tuple(ctx.needs_input_grad[:6]))
        ctx.opts = opts
        ctx.dtypes = [t.dtype if t is not None else None for t in (h_s, h_t, w_s, b_s, w_t, b_t)]
        ctx.save_for_backward(*grads)
        return sums

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        w = ctx.opts.loss_weights
        wmax = max(abs(x) for x in w)
        g = g.float()
        wv = torch.tensor(w, dtype=torch.float32, device=g.device)
        ww = float(sum(x * x for x in w))
        lam = (g @ wv) / ww if ww > 0 else g.new_zeros(())
        # each component against its own declared part (a term weighted far below the others is checked
        # too), with an absolute floor for the rounding of the largest one
        bound = 1e-4 * (lam * wv).abs() + 1e-7 * g.abs().max()
        if bool(((g - lam * wv).abs() > bound).any() & torch.isfinite(g).all()):
            raise RuntimeError(
                f"the fused KD loss was built for loss weights {tuple(w)} (kd, ce, teacher_ce) but its "
                f"backward received {g.tolist()}, which is not proportional: pass the weights you combine the "
                "three sums with as loss_weights= to chunked_lm_losses, or fused=False"
            )
        scale = lam * wmax
        out = []
        for grad, dtype in zip(ctx.saved_tensors, ctx.dtypes):
            out.append(None if grad is None else grad.mul_(scale).to(dtype))
        return (*out, None, None)


def fused_lm_losses(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student: HeadSpec,
    teacher: HeadSpec,
    labels: torch.Tensor,
    temperature: float,
    chunk_size: int,
    loss_weights: tuple[float, float, float],
) -> torch.Tensor:
    """``[kd, ce, tce]`` sums (3,) over valid tokens, gradients computed in the forward pass.

    student_hidden (B, T, Hs), teacher_hidden (B, T, Ht), labels (B, T) shifted once; the heads as
    :func:`head_spec` describes them (same vocabulary). ``loss_weights`` (w_kd, w_ce, w_tce): how the
    caller combines the sums (w_tce 0 if the teacher CE carries no gradient). Without autograd (no
    grad mode, nothing requiring grad) only the sums are computed.
    """
    if student.vocab_size != teacher.vocab_size:
        raise ValueError(f"vocabularies differ: student {student.vocab_size}, teacher {teacher.vocab_size}")
    opts = FusedOptions(
        student.post,
        teacher.post,
        student.vocab_size,
        float(temperature),
        int(chunk_size),
        tuple(map(float, loss_weights)),
    )
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    lab = labels.reshape(-1)
    args = (hs, ht, student.weight, student.bias, teacher.weight, teacher.bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
        return FusedKDLoss.apply(*args, lab, opts)
    return fused_kd_sums(*args, lab, opts)[0]
