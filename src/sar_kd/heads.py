"""The output function of a causal LM, as the model itself computes it: hidden state -> logits.

The losses run the LM head on chunks of final hidden states instead of calling ``model(...)``, so
they must apply the same post-processing the model's forward applies after its LM head:

* GraniteMoE / Granite: ``logits / config.logits_scaling``;
* Gemma-2/3 (and others with ``final_logit_softcapping``): ``tanh(logits / c) · c``;
* Cohere / Cohere-2: ``logits · config.logit_scale``.

and only over the rows the tokenizer can produce: padded head rows beyond the tokenizer's size
(Qwen: 151,936 rows for 151,669 tokens) get no probability mass. :func:`check_head` compares the
result with ``model(input_ids).logits`` on a probe sequence, so a family with any other
post-processing is refused instead of trained on the wrong function.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ConfigError


class OutputHead(nn.Module):
    """``logits = post(lm_head(hidden))[..., :vocab_size]``, the model's own output function.

    hidden (N, H) -> logits (N, vocab_size). Holds no parameters of its own (the LM head is the
    model's, shared), so it adds nothing to state dicts.
    """

    def __init__(self, model: nn.Module, vocab_size: int | None = None) -> None:
        super().__init__()
        self._model = [model]  # not a submodule: the head's weights stay owned by the model
        conf = model.config
        self.divide = getattr(conf, "logits_scaling", None)
        self.multiply = getattr(conf, "logit_scale", None)
        self.softcap = getattr(conf, "final_logit_softcapping", None)
        rows = model.get_output_embeddings().out_features
        if vocab_size is not None and vocab_size > rows:
            raise ConfigError(
                f"the tokenizer has {vocab_size} tokens but the model's output layer only {rows} rows: "
                "wrong tokenizer for this model"
            )
        self.vocab_size = vocab_size if vocab_size is not None else rows

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self._model[0].get_output_embeddings()(hidden)
        if self.divide:
            logits = logits / self.divide
        if self.multiply:
            logits = logits * self.multiply
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits[..., : self.vocab_size]


@torch.no_grad()
def check_head(model: nn.Module, head: OutputHead, role: str) -> None:
    """Refuse a model whose ``model(input_ids).logits`` is not ``head(base_model(input_ids))``.

    Runs both on a short probe sequence in eval mode (every module's training flag is restored
    afterwards). Raises :class:`ConfigError` naming the largest difference.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        device = model.get_output_embeddings().weight.device
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, head.vocab_size, (1, 8), generator=gen).to(device)
        ref = model(input_ids=ids, use_cache=False).logits[..., : head.vocab_size].float()
        hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        got = head(hidden).float()
    finally:
        for m, flag in flags:
            m.training = flag
    scale = ref.abs().max().clamp(min=1e-6)
    err = float((got - ref).abs().max() / scale)
    if not err <= 1e-3:
        raise ConfigError(
            f"the {role} ({type(model).__name__}) post-processes its logits in a way SAR-KD does not reproduce "
            f"(relative difference {err:.2e} to model(...).logits); this model family is not supported"
        )
