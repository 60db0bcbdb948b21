"""The joint SAR-KD module: student + teacher (+ projection) whose forward returns the loss.

Wrapping everything in one ``nn.Module`` lets accelerate/DDP synchronise the gradients of the
student, the teacher's routers and the projection in one place.

Two modes share it:

* **logit** (same tokenizer): ``T²·KL(teacher ‖ student)`` on the logits plus CE;
* **hidden** (different tokenizers): MSE between the student's hidden states and a learned
  projection of the teacher's hidden states pooled onto student tokens by character overlap,
  plus CE on the student's own tokens. The teacher's LM head is not run unless the teacher-CE
  term needs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import alignment, losses, xtok
from .heads import OutputHead
from .routers import RouterController


@dataclass
class ObjectiveWeights:
    """Loss weights and options of the SAR-KD objective."""

    temperature: float = 2.0
    alpha_kd: float = 0.9
    alpha_ce: float = 0.1
    router_anchor_weight: float = 1e-4
    router_entropy_weight: float = 1e-4
    router_load_balance_weight: float = 1e-3
    router_teacher_ce_weight: float = 0.0
    kd_chunk_size: int = 256
    train_router: bool = True  # False (--router_lr 0): native, no-grad teacher forward, no router terms
    dual_loss: str = "hidden"  # dual-tokenizer mode: "hidden" (MSE), "logit" (cross-tokenizer KD) or "both"
    alpha_hidden: float = 0.9  # weight of the hidden-state MSE when dual_loss is "both"
    router_objective: str = "joint"  # "joint" (the spec's) or "lookahead" (sar_kd.lookahead)
    lookahead_weight: float = 1.0  # weight of L_look (per student token)
    router_kl_weight: float = 0.0  # trust region: KL(initial routing ‖ current routing)
    lookahead_jvp: str = "forward"  # "forward" (exact) or "finite_difference"

    @property
    def lookahead(self) -> bool:
        return self.router_objective == "lookahead" and self.train_router and self.alpha_kd > 0

    @property
    def needs_teacher(self) -> bool:
        """Whether training runs the teacher at all (not for a CE-only baseline; with frozen routers
        the teacher-CE term has no gradient, so it does not need the teacher either)."""
        return self.alpha_kd > 0 or (self.router_teacher_ce_weight > 0 and self.train_router)


def make_projection(teacher_hidden: int, student_hidden: int, num_pairs: int) -> nn.ModuleList:
    """One linear map teacher width -> student width per hidden-layer pair (fp32, trained)."""
    return nn.ModuleList(nn.Linear(teacher_hidden, student_hidden) for _ in range(num_pairs))


class SARKDModel(nn.Module):
    """Student, teacher and (hidden mode) projection; ``forward`` computes the SAR-KD loss.

    ``forward(batch, norms)`` takes a micro-batch and the **global** token counts of the whole
    accumulation window (``norms``: ``kd``, ``ce``, ``tce``), and returns a dict of scalars:
    ``loss`` (token terms divided by those counts, plus the weighted router regulariser) and the
    unnormalised sums and statistics for logging.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        controller: RouterController,
        router_params: dict[str, nn.Parameter],
        weights: ObjectiveWeights,
        student_head: OutputHead | None = None,
        teacher_head: OutputHead | None = None,
        projection: nn.ModuleList | None = None,
        layer_pairs: list[tuple[int, int]] | None = None,
        vocab_map=None,
        mode: str | None = None,
    ) -> None:
        super().__init__()
        self._mode = mode or ("logit" if projection is None and vocab_map is None else "dual")
        self.vocab_map = vocab_map  # dual mode with a logit loss: the shared-bucket map (sar_kd.vocab_map)
        self.student = student
        self.teacher = teacher
        self.projection = projection
        self.controller = controller
        self.weights = weights
        # the models' own output functions, trimmed to the tokenizers' sizes (no parameters of their own)
        self.student_head = student_head if student_head is not None else OutputHead(student)
        self.teacher_head = teacher_head if teacher_head is not None else OutputHead(teacher)
        self.layer_pairs = layer_pairs or [(-1, -1)]
        # A plain dict (not registered again): the same Parameter objects the teacher owns; .to() and
        # DDP keep those objects, so the map stays valid.
        self._router_map = dict(router_params)
        self._router_names = list(router_params)
        # The anchor of the L2 regulariser: buffers move with the module; not saved (re-read from the teacher).
        for i, p in enumerate(router_params.values()):
            self.register_buffer(f"_anchor_{i}", p.detach().float().clone(), persistent=False)
        # lookahead: the quiz gradient g_q by student parameter name, set before each optimizer step
        self.direction: dict[str, torch.Tensor] | None = None
        controller.record_inputs = weights.router_kl_weight > 0 and weights.train_router
        # False under FSDP: the trainer adds the anchor's closed-form gradient to the sharded fp32 masters
        # after the backward pass (the gathered parameters may be bf16 copies)
        self.anchor_in_loss = True

    @property
    def mode(self) -> str:
        """``logit`` (same tokenizer) or ``dual`` (two tokenizers, blocks of shared text)."""
        return self._mode

    @property
    def kd_count_key(self) -> str:
        """Which token count normalises ``kd_sum``: aligned student tokens for the hidden MSE, student
        labels for the logit losses."""
        return "kd" if self.mode == "dual" and self.weights.dual_loss == "hidden" else "ce"

    @property
    def router_params(self) -> dict[str, nn.Parameter]:
        return self._router_map

    def _anchors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, f"_anchor_{i}") for i, n in enumerate(self._router_names)}

    # ------------------------------------------------------------------ pieces
    def _teacher_body(self, input_ids, attention_mask, hidden_states: bool = False):
        """Teacher forward with router records. While training with a learning router, the
        controller's gradient mode is on; with a frozen router (or in evaluation) the forward is
        the native one, without autograd."""
        ctl = self.controller
        ctl.records = []
        ctl.recording = True
        learn = self.training and self.weights.train_router and torch.is_grad_enabled()
        # left set after the forward: checkpointed teacher layers recompute it in the backward pass
        ctl.active = learn
        try:
            with torch.set_grad_enabled(learn):
                out = self.teacher.base_model(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    use_cache=False,
                    output_hidden_states=hidden_states,
                )
        finally:
            ctl.recording = False
        return out, ctl.pop_records()

    def _student_body(self, input_ids, attention_mask, hidden_states: bool = False):
        return self.student.base_model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=hidden_states
        )

    def _initial_routers(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(weight, bias) of each router at the start of training, in forward order."""
        anchors = self._anchors()
        out = []
        for r in self.controller.routers:
            weight = next(n for n in r.param_names if anchors[n].ndim == 2)
            bias = weight[: -len("weight")] + "bias"
            out.append((anchors[weight], anchors.get(bias)))
        return out

    def router_terms(self, records, token_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Weighted router regulariser and its parts, all carrying gradient to the routers."""
        w = self.weights
        names = ("router_anchor", "router_entropy", "router_load_balance", "router_kl")
        if not (w.train_router and records):  # a frozen router (or no teacher pass): nothing to regularise
            zero = torch.zeros((), device=next(self.student.parameters()).device)
            return {"router_loss": zero, **dict.fromkeys(names, zero)}
        if self.anchor_in_loss:
            anchor = losses.router_anchor(self.router_params, self._anchors())
        else:
            anchor = torch.zeros((), device=records[0].logits.device)
        entropy = losses.router_entropy(records, token_mask)
        balance = losses.router_load_balance(records, token_mask)
        kl = anchor * 0.0
        if w.router_kl_weight > 0:
            from .lookahead import routing_kl

            kl = routing_kl(records, [r.inputs for r in records], self._initial_routers(), token_mask)
        total = (
            w.router_anchor_weight * anchor
            - w.router_entropy_weight * entropy
            + w.router_load_balance_weight * balance
            + w.router_kl_weight * kl
        )
        return {"router_loss": total, **{n: t.detach() for n, t in zip(names, (anchor, entropy, balance, kl))}}

    def student_direction(self, input_ids, attention_mask) -> dict[str, torch.Tensor]:
        """The lookahead direction pieces for this batch: ``delta`` = J_θ(h) g_q and ``mean`` = h (the
        final hidden states, (B, T, H)), the LM head ``weight`` and its part ``grad_weight`` of g_q.

        Forward mode (exact; eager attention for the pass, which has forward-mode rules) or a central
        finite difference (``lookahead_jvp``); fp32, no autograd, the student in eval mode (no
        checkpointing) for the pass.
        """
        from torch.func import functional_call

        from .lookahead import finite_difference_states, jvp_states

        student, g = self.student, self.direction
        named = dict(student.named_parameters())
        head = student.get_output_embeddings().weight
        head_name = next(n for n, p in named.items() if p is head)
        base = student.base_model
        prefix = student.base_model_prefix + "."
        kwargs = {"attention_mask": attention_mask, "use_cache": False}
        flags = [(m, m.training) for m in student.modules()]
        student.eval()
        try:
            with torch.autocast(input_ids.device.type, enabled=False):
                if self.weights.lookahead_jvp == "forward":
                    attn = student.config._attn_implementation
                    student.set_attn_implementation("eager")
                    # checkpointing's input-requires-grad hook calls requires_grad_, which forward-mode
                    # transforms refuse: off for this pass
                    had_hooks = bool(getattr(student, "_require_grads_hooks", None))
                    if had_hooks:
                        student.disable_input_require_grads()
                    try:
                        params = {n.removeprefix(prefix): p for n, p in named.items() if n.startswith(prefix)}
                        tangents = {n.removeprefix(prefix): g[n] for n in named if n.startswith(prefix)}
                        delta, mean = jvp_states(
                            lambda p: functional_call(base, p, (input_ids,), kwargs).last_hidden_state,
                            params,
                            tangents,
                        )
                    finally:
                        student.set_attn_implementation(attn)
                        if had_hooks:
                            student.enable_input_require_grads()
                else:
                    delta, mean = finite_difference_states(
                        lambda: base(input_ids, **kwargs).last_hidden_state,
                        list(named.values()),
                        [g[n] for n in named],
                    )
        finally:
            for m, flag in flags:
                m.training = flag
        return {"delta": delta, "mean": mean, "weight": head, "grad_weight": g[head_name]}

    @staticmethod
    def _layer(out, index: int) -> torch.Tensor:
        # -1 is the final (normed) state both LM heads read; other indices come from hidden_states.
        return out.last_hidden_state if index == -1 else out.hidden_states[index]

    # ------------------------------------------------------------------ losses
    def forward(self, batch: dict[str, torch.Tensor], norms: dict[str, float]) -> dict[str, torch.Tensor]:
        """Loss of one micro-batch; ``norms`` are the window's global token counts (see class doc)."""
        w = self.weights
        if not w.needs_teacher:
            sums = self._ce_only_sums(batch)
        else:
            sums = self._logit_sums(batch, norms) if self.mode == "logit" else self._dual_sums(batch)
        token_loss = (
            w.alpha_kd * sums["kd_sum"] / norms[self.kd_count_key]
            + w.alpha_ce * sums["ce_sum"] / norms["ce"]
            + w.router_teacher_ce_weight * sums["teacher_ce_sum"] / norms["tce"]
        )
        if "hidden_sum" in sums:  # dual_loss "both": the MSE term with its own weight
            token_loss = token_loss + w.alpha_hidden * sums["hidden_sum"] / norms["kd"]
        if "look_sum" in sums:  # lookahead: the router's objective (the KD term above trains the student only)
            token_loss = token_loss + w.lookahead_weight * sums["look_sum"] / norms[self.kd_count_key]
        out = self.router_terms(sums.pop("records"), sums.pop("router_mask"))
        out["loss"] = token_loss + out["router_loss"] * norms.get("router_scale", 1.0)
        out.update({k: v.detach() for k, v in sums.items()})
        return out

    def _ce_only_sums(self, batch):
        """A CE-only baseline (``alpha_kd`` and the teacher CE weight 0): the teacher is not run."""
        key = "input_ids" if self.mode == "logit" else "student_ids"
        ids, mask = batch[key], batch.get("attention_mask" if self.mode == "logit" else "student_mask")
        labels = losses.shift_labels(ids, mask)
        s_out = self._student_body(ids, mask)
        ce = losses.chunked_ce(s_out.last_hidden_state, self.student_head, labels, self.weights.kd_chunk_size)
        zero = torch.zeros((), device=ids.device)
        sums = {"kd_sum": zero, "ce_sum": ce, "teacher_ce_sum": zero, "records": [], "router_mask": None}
        if self.mode == "dual":
            sums.update(aligned_tokens=zero, student_tokens=mask.sum())
        return sums

    def _logit_sums(self, batch, norms=None):
        w = self.weights
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        labels = losses.shift_labels(ids, mask)
        # the lookahead direction first: a finite difference shifts the student's weights in place
        d = self.student_direction(ids, mask) if w.lookahead else None
        t_out, records = self._teacher_body(ids, mask)
        s_out = self._student_body(ids, mask)
        router_mask = mask.reshape(-1).bool() if mask is not None else None
        if w.lookahead:
            kd, ce, t_ce, look = self._lookahead_logit_terms(s_out, t_out, d, labels)
            return {"kd_sum": kd, "ce_sum": ce, "teacher_ce_sum": t_ce, "look_sum": look,
                    "records": records, "router_mask": router_mask}  # fmt: skip
        tce_grad = w.router_teacher_ce_weight > 0 and w.train_router
        # the fused loss (sar_kd.fused_kd) stores one gradient: the one of the combination forward() makes
        loss_weights = None
        if norms is not None:
            inv = {k: 1.0 / float(norms[k]) if float(norms[k]) else 0.0 for k in (self.kd_count_key, "ce", "tce")}
            loss_weights = (
                w.alpha_kd * inv[self.kd_count_key],
                w.alpha_ce * inv["ce"],
                w.router_teacher_ce_weight * inv["tce"] if tce_grad else 0.0,
            )
        kd, ce, t_ce = losses.chunked_lm_losses(
            s_out.last_hidden_state,
            t_out.last_hidden_state,
            self.student_head,
            self.teacher_head,
            labels,
            temperature=w.temperature,
            chunk_size=w.kd_chunk_size,
            teacher_ce_grad=tce_grad,
            loss_weights=loss_weights,
        )
        return {"kd_sum": kd, "ce_sum": ce, "teacher_ce_sum": t_ce, "records": records, "router_mask": router_mask}

    def _lookahead_logit_terms(self, s_out, t_out, d, labels):
        """Same-tokenizer lookahead: KD against the detached teacher (student), CE, teacher CE, and
        ``L_look = T Σ ⟨u, p_t⟩`` (router), in checkpointed chunks of tokens."""
        from .lookahead import logit_direction, lookahead_logit_sum

        w = self.weights
        tce_grad = w.router_teacher_ce_weight > 0

        def chunk_fn(h_s, h_t, delta, mean, lab):
            ls, lt = self.student_head(h_s), self.teacher_head(h_t)
            t_ce = losses.ce_loss(lt, lab)
            u = logit_direction(delta, mean, d["weight"], d["grad_weight"], self.student_head)
            look = lookahead_logit_sum(u, lt, w.temperature, lab != losses.IGNORE_INDEX)
            kd = losses.kd_kl_loss(ls, lt.detach(), lab, w.temperature)
            return torch.stack([kd, losses.ce_loss(ls, lab), t_ce if tce_grad else t_ce.detach(), look])

        tensors = [s_out.last_hidden_state, t_out.last_hidden_state, d["delta"], d["mean"]]
        total = losses._chunked(chunk_fn, tensors, labels, w.kd_chunk_size, 4)
        return total[0], total[1], total[2], total[3]

    def _dual_sums(self, batch):
        """Dual-tokenizer mode: hidden-state MSE and/or the cross-tokenizer logit loss, plus CE."""
        w = self.weights
        s_ids, s_mask = batch["student_ids"], batch["student_mask"]
        t_ids, t_mask = batch["teacher_ids"], batch["teacher_mask"]
        use_hidden, use_logit = w.dual_loss in ("hidden", "both"), w.dual_loss in ("logit", "both")
        need_all = use_hidden and any(t != -1 or s != -1 for t, s in self.layer_pairs)
        # the lookahead direction first: a finite difference shifts the student's weights in place
        direction = self.student_direction(s_ids, s_mask) if w.lookahead else None
        t_out, records = self._teacher_body(t_ids, t_mask, hidden_states=need_all)
        s_out = self._student_body(s_ids, s_mask, hidden_states=need_all)
        sums = {}
        if use_hidden:
            weights, aligned = alignment.overlap_alignment(
                batch["student_offsets"], s_mask, batch["teacher_offsets"], t_mask
            )
            # with the lookahead objective the teacher learns from L_look alone: the MSE trains the student
            t_layer = (lambda t: self._layer(t_out, t).detach()) if w.lookahead else (lambda t: self._layer(t_out, t))
            mse = sum(
                alignment.hidden_mse_sum(self._layer(s_out, s), t_layer(t), weights, aligned, proj)
                for (t, s), proj in zip(self.layer_pairs, self.projection)
            ) / len(self.layer_pairs)
            sums.update(hidden_mse_sum=mse, aligned_tokens=aligned.sum())
        if use_logit:
            al = xtok.chunk_alignment(
                batch["student_offsets"], s_mask, batch["teacher_offsets"], t_mask, s_ids, t_ids, self.vocab_map
            )
            x = xtok.xtok_loss_sums(
                s_out.last_hidden_state,
                t_out.last_hidden_state,
                self.student_head,
                self.teacher_head,
                s_ids,
                t_ids,
                al,
                self.vocab_map,
                temperature=w.temperature,
                chunk_size=w.kd_chunk_size,
                lookahead=direction,
            )
            sums["kd_sum"] = x["kl_sum"] + x["chunk_sum"]
            if w.lookahead:
                sums["look_sum"] = x.pop("look_sum")
            sums.update({f"xtok_{k}": v.detach() for k, v in x.items()})
            if use_hidden:
                sums["hidden_sum"] = mse
        else:
            sums["kd_sum"] = mse
        s_labels = losses.shift_labels(s_ids, s_mask)
        ce = losses.chunked_ce(s_out.last_hidden_state, self.student_head, s_labels, w.kd_chunk_size)
        if w.router_teacher_ce_weight > 0:
            t_labels = losses.shift_labels(t_ids, t_mask)
            t_ce = losses.chunked_ce(t_out.last_hidden_state, self.teacher_head, t_labels, w.kd_chunk_size)
        else:  # the teacher's 151,936-wide head is not run for nothing
            t_ce = torch.zeros((), device=s_ids.device)
        return {
            **sums,
            "ce_sum": ce,
            "teacher_ce_sum": t_ce,
            "student_tokens": s_mask.sum(),
            "records": records,
            "router_mask": t_mask.reshape(-1).bool(),
        }

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def eval_nll(self, batch: dict[str, torch.Tensor]) -> dict:
        """Student and teacher NLL sums on their own tokens (native routing), token counts, the shifted labels
        (for the bytes they cover), router records."""
        chunk = self.weights.kd_chunk_size
        if self.mode == "logit":
            s_ids = t_ids = batch["input_ids"]
            s_mask = t_mask = batch.get("attention_mask")
        else:
            s_ids, s_mask = batch["student_ids"], batch["student_mask"]
            t_ids, t_mask = batch["teacher_ids"], batch["teacher_mask"]
        s_labels, t_labels = losses.shift_labels(s_ids, s_mask), losses.shift_labels(t_ids, t_mask)
        t_out, records = self._teacher_body(t_ids, t_mask)
        s_out = self._student_body(s_ids, s_mask)
        return {
            "student_nll": losses.chunked_ce(s_out.last_hidden_state, self.student_head, s_labels, chunk),
            "student_tokens": (s_labels != losses.IGNORE_INDEX).sum(),
            "teacher_nll": losses.chunked_ce(t_out.last_hidden_state, self.teacher_head, t_labels, chunk),
            "teacher_tokens": (t_labels != losses.IGNORE_INDEX).sum(),
            "student_labels": s_labels,
            "teacher_labels": t_labels,
            "records": records,
            "token_mask": t_mask.reshape(-1).bool() if t_mask is not None else None,
        }
