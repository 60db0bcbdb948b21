"""The joint SAR-KD module: student + teacher (+ projection) whose forward returns the loss terms.

Wrapping everything in one ``nn.Module`` lets accelerate/DDP synchronise the gradients of the
student, the teacher's routers and the projection in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import losses
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


class SARKDModel(nn.Module):
    """Student, teacher and (dual-tokenizer mode) projection, computing the SAR-KD loss terms.

    ``forward`` returns a dict of scalar tensors:

    * ``token_loss_sum``: α_kd·KD + α_ce·CE (+ teacher-CE weight·teacher CE), **summed** over the
      valid tokens of this micro-batch (the trainer divides by the tokens of the whole window);
    * ``router_loss``: anchor − entropy bonus + load balance, already weighted (a per-micro-batch mean);
    * the individual sums and statistics for logging.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        controller: RouterController,
        router_params: dict[str, nn.Parameter],
        weights: ObjectiveWeights,
        vocab_size: int | None = None,
        projection: nn.Module | None = None,
        layer_pairs: list[tuple[int, int]] | None = None,
    ) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.projection = projection
        self.controller = controller
        self.weights = weights
        self.vocab_size = vocab_size
        self.layer_pairs = layer_pairs or [(-1, -1)]
        # Parameter names relative to the teacher -> parameter; anchors registered as buffers so they
        # move with the module and are saved in its state.
        self._router_names = list(router_params)
        for i, p in enumerate(router_params.values()):
            self.register_buffer(f"_anchor_{i}", p.detach().float().clone(), persistent=False)

    @property
    def router_params(self) -> dict[str, nn.Parameter]:
        params = dict(self.teacher.named_parameters())
        return {n: params[n] for n in self._router_names}

    def _anchors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, f"_anchor_{i}") for i, n in enumerate(self._router_names)}

    def _teacher_body(self, input_ids, attention_mask, hidden_states: bool = False):
        ctl = self.controller
        ctl.records = []
        ctl.recording = True
        try:
            out = self.teacher.base_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                use_cache=False,
                output_hidden_states=hidden_states,
            )
        finally:
            ctl.recording = False
        return out, ctl.pop_records()

    def router_terms(self, records, token_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Weighted router regulariser and its parts, all carrying gradient to the routers."""
        w = self.weights
        anchor = losses.router_anchor(self.router_params, self._anchors())
        entropy = losses.router_entropy(records, token_mask)
        balance = losses.router_load_balance(records, token_mask)
        total = (
            w.router_anchor_weight * anchor - w.router_entropy_weight * entropy + w.router_load_balance_weight * balance
        )
        return {
            "router_loss": total,
            "router_anchor": anchor.detach(),
            "router_entropy": entropy.detach(),
            "router_load_balance": balance.detach(),
        }

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Same-tokenizer (logit) mode. input_ids (B, T) shared by both models."""
        w = self.weights
        labels = losses.shift_labels(input_ids, attention_mask)
        t_out, records = self._teacher_body(input_ids, attention_mask)
        s_out = self.student.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        kd, ce, t_ce = losses.chunked_lm_losses(
            s_out.last_hidden_state,
            t_out.last_hidden_state,
            self.student.get_output_embeddings(),
            self.teacher.get_output_embeddings(),
            labels,
            temperature=w.temperature,
            chunk_size=w.kd_chunk_size,
            vocab_size=self.vocab_size,
            teacher_ce_grad=w.router_teacher_ce_weight > 0,
        )
        token_mask = attention_mask.reshape(-1).bool() if attention_mask is not None else None
        out = self.router_terms(records, token_mask)
        out["token_loss_sum"] = w.alpha_kd * kd + w.alpha_ce * ce + w.router_teacher_ce_weight * t_ce
        out["kd_sum"] = kd.detach()
        out["ce_sum"] = ce.detach()
        out["teacher_ce_sum"] = t_ce.detach()
        out["num_tokens"] = (labels != losses.IGNORE_INDEX).sum()
        return out

    @torch.no_grad()
    def eval_nll(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Student and teacher NLL sums (native routing) and the token count, for perplexity."""
        labels = losses.shift_labels(input_ids, attention_mask)
        t_out, records = self._teacher_body(input_ids, attention_mask)
        s_out = self.student.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        _, ce, t_ce = losses.chunked_lm_losses(
            s_out.last_hidden_state,
            t_out.last_hidden_state,
            self.student.get_output_embeddings(),
            self.teacher.get_output_embeddings(),
            labels,
            temperature=1.0,
            chunk_size=self.weights.kd_chunk_size,
            vocab_size=self.vocab_size,
        )
        n = (labels != losses.IGNORE_INDEX).sum()
        token_mask = attention_mask.reshape(-1).bool() if attention_mask is not None else None
        return {
            "student_nll": ce,
            "student_tokens": n,
            "teacher_nll": t_ce,
            "teacher_tokens": n,
            "records": records,
            "token_mask": token_mask,
        }
