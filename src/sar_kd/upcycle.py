"""A realistic MoE teacher from a pretrained dense model: Branch-Train-MiX-style sparse upcycling.

The recipe (Sukhbaatar et al. 2024, "Branch-Train-MiX"; Komatsuzaki et al. 2023, "Sparse Upcycling"):

1. **Branch**: one copy of the dense model's MLPs per domain, each fine-tuned on its domain's text
   (attention, embeddings and norms stay the dense model's, as in BTX's averaged non-expert weights
   when the branches share them).
2. **MiX**: a Mixtral model (Llama attention, softmax router, renormalised top-k) whose expert ``e``
   in every layer is branch ``e``'s MLP; attention, embeddings and norms copied from the dense model.
3. **Route**: the routers are fitted so that routing means something: each layer's router is trained
   by cross-entropy to put a token on its document's domain expert (hidden states from the MoE's own
   forward pass, so later layers see the routing of earlier ones).

With top-1 routing the kept weight is exactly 1.0 (Mixtral always renormalises), so — as with the
default teacher ``Huihui-MoE-1B-A0.6B`` — the model's own forward gives its routers no gradient.

Everything here is a plain function of models and token blocks; ``bench/real_weights.py`` and
``sar-kd demo --scenario real`` drive it.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

logger = logging.getLogger("sar_kd")


def mixtral_config_from_llama(dense_config, num_experts: int, top_k: int = 1):
    """A ``MixtralConfig`` with the Llama model's shapes, ``num_experts`` experts of its MLP width."""
    from transformers import MixtralConfig

    c = dense_config
    if getattr(c, "model_type", None) != "llama":
        raise ValueError(f"upcycling expects a Llama model, got model_type {getattr(c, 'model_type', None)!r}")
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise ValueError("upcycling into Mixtral needs a Llama model without attention or MLP biases")
    rope = getattr(c, "rope_parameters", None) or {"rope_type": "default", "rope_theta": c.rope_theta}
    return MixtralConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=getattr(c, "head_dim", c.hidden_size // c.num_attention_heads),
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(rope),
        tie_word_embeddings=c.tie_word_embeddings,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        router_jitter_noise=0.0,
        output_router_logits=False,
        sliding_window=None,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
    )


def mlp_state(dense: nn.Module) -> list[dict[str, torch.Tensor]]:
    """Per decoder layer, the dense MLP's ``gate_proj`` / ``up_proj`` / ``down_proj`` weights (copies)."""
    return [
        {k: getattr(layer.mlp, k).weight.detach().clone() for k in ("gate_proj", "up_proj", "down_proj")}
        for layer in dense.model.layers
    ]


def upcycle(dense: nn.Module, branches: list[list[dict[str, torch.Tensor]]], top_k: int = 1) -> nn.Module:
    """A Mixtral model whose expert ``e`` in layer ``l`` is ``branches[e][l]`` and whose every other
    weight is the dense Llama model's. Routers start at zero (uniform scores)."""
    from transformers import MixtralForCausalLM

    conf = mixtral_config_from_llama(dense.config, len(branches), top_k)
    moe = MixtralForCausalLM(conf).to(next(dense.parameters()).dtype)
    dense_sd = dense.state_dict()
    sd = moe.state_dict()
    for name in sd:
        if ".mlp." in name:
            continue
        sd[name] = dense_sd[name].clone()
    for i in range(conf.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        sd[p + "gate.weight"] = torch.zeros_like(sd[p + "gate.weight"])
        sd[p + "experts.gate_up_proj"] = torch.stack(
            [torch.cat([b[i]["gate_proj"], b[i]["up_proj"]], dim=0) for b in branches]
        )
        sd[p + "experts.down_proj"] = torch.stack([b[i]["down_proj"] for b in branches])
    moe.load_state_dict(sd, strict=True)
    if conf.tie_word_embeddings:
        moe.tie_weights()
    return moe.eval()


def _batches(blocks: torch.Tensor, batch: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield blocks[torch.randint(0, len(blocks), (batch,), generator=g)]


def train_branch(dense: nn.Module, blocks: torch.Tensor, steps: int, lr: float, batch: int, seed: int = 0):
    """Fine-tune only the MLPs of ``dense`` (in place) on ``blocks`` ([N, T] token ids) with CE; returns
    the per-layer MLP weights and the mean loss of the first and last tenth of the steps."""
    mlp_params = [p for n, p in dense.named_parameters() if ".mlp." in n]
    for p in dense.parameters():
        p.requires_grad_(False)
    for p in mlp_params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(mlp_params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)))
    dense.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    for step, ids in enumerate(_batches(blocks, batch, steps, seed)):
        loss = dense(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(mlp_params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if (step + 1) % 10 == 0:
            logger.info("  branch step %d/%d loss %.3f (%.0fs)", step + 1, steps, losses[-1], time.perf_counter() - t0)
    dense.eval()
    for p in dense.parameters():
        p.requires_grad_(False)
    tenth = max(1, steps // 10)
    return mlp_state(dense), (sum(losses[:tenth]) / tenth, sum(losses[-tenth:]) / tenth)


class _RouterInputs:
    """Forward hooks capturing each router's input hidden states (detached)."""

    def __init__(self, moe: nn.Module) -> None:
        self.routers = [layer.mlp.gate for layer in moe.model.layers]
        self.inputs: list[torch.Tensor | None] = [None] * len(self.routers)
        self.handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(self.routers)]

    def _hook(self, i: int):
        def hook(module, args, output):
            self.inputs[i] = args[0].detach().reshape(-1, args[0].shape[-1])

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def fit_routers(
    moe: nn.Module, domain_blocks: list[torch.Tensor], steps: int, lr: float, blocks_per_domain: int, seed: int = 0
) -> list[float]:
    """Train every router of ``moe`` (in place) to send each token to its domain's expert.

    ``domain_blocks[e]`` ([N_e, T] token ids) is domain ``e``'s text, whose expert is ``e``. Each step
    runs the MoE forward (no gradient) on ``blocks_per_domain`` blocks of every domain, and each
    router takes an Adam step on the cross-entropy of its logits against the domain label. Returns the
    loss per step (mean over layers)."""
    cap = _RouterInputs(moe)
    params = [r.weight for r in cap.routers]
    opt = torch.optim.Adam(params, lr=lr)
    gens = [torch.Generator().manual_seed(seed + e) for e in range(len(domain_blocks))]
    history = []
    try:
        for _ in range(steps):
            ids = torch.cat(
                [b[torch.randint(0, len(b), (blocks_per_domain,), generator=g)] for b, g in zip(domain_blocks, gens)]
            )
            label = torch.arange(len(domain_blocks)).repeat_interleave(blocks_per_domain * ids.shape[1])
            with torch.no_grad():
                moe(input_ids=ids)
            loss = sum(
                nn.functional.cross_entropy(nn.functional.linear(h, r.weight).float(), label)
                for h, r in zip(cap.inputs, cap.routers)
            ) / len(params)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            history.append(float(loss.detach()))
    finally:
        cap.remove()
    for p in params:
        p.requires_grad_(False)
    return history


@torch.no_grad()
def routing_accuracy(moe: nn.Module, domain_blocks: list[torch.Tensor], max_blocks: int = 8) -> list[float]:
    """Per layer, the fraction of tokens whose top-1 expert is their domain's expert."""
    cap = _RouterInputs(moe)
    hits = torch.zeros(len(cap.routers))
    total = 0
    try:
        for e, blocks in enumerate(domain_blocks):
            ids = blocks[:max_blocks]
            moe(input_ids=ids)
            for i, (h, r) in enumerate(zip(cap.inputs, cap.routers)):
                hits[i] += (nn.functional.linear(h, r.weight).argmax(-1) == e).sum()
            total += ids.numel()
    finally:
        cap.remove()
    return [round(float(v), 4) for v in hits / total]
