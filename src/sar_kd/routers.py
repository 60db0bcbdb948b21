"""Finding the teacher's routers, freezing everything else, and giving the routers a gradient.

A *router* is the module inside a sparse-MoE block that maps a hidden state to one logit per
expert. Discovery is structural (shape ``(num_experts, hidden)`` beside a module that holds the
experts), never by name alone: the name ``gate`` also matches every expert's ``gate_proj`` and the
fused ``experts.gate_up_proj`` of transformers 5.x.

With top-1 routing and renormalised weights (``norm_topk_prob=True``, the default teacher) the kept
routing weight is exactly 1.0, so the model's own forward gives the router no gradient at all.
:class:`RouterController` fixes that during training with a forward hook on each router:

* ``straight_through`` (default): every expert is evaluated, the forward weights are the native
  ones (``w = w_native + p − stop_grad(p)``, so the output is bit-identical to the native model) and
  the backward pass sees ``∂out/∂p_i = expert_i(x)`` for *every* expert i: the first-order effect of
  moving routing mass toward each expert. Costs all experts' compute while training.
* ``straight_through_topk``: only the chosen experts run; their weight is multiplied by
  ``exp(log p − stop_grad(log p))`` (== 1.0 forward), so the backward sees
  ``∂w/∂logits = w · ∂log p``. Cheap, but it only tells whether the chosen expert's output should be
  scaled up or down, not whether another expert would do better: measured on the demo teacher,
  training the routers on the teacher's *own* CE with it raised the teacher's perplexity from 33.5
  to 61.4, where ``straight_through`` lowered it to 33.4 (docs/router_gradient.md).
* ``dense``: every expert runs and is weighted by the full softmax of the router logits (a
  different forward while training).
* ``native``: the model as it is.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import ConfigError

logger = logging.getLogger(__name__)

_NUM_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
# Families whose routing weights are renormalised over the chosen experts whatever the config says.
_ALWAYS_RENORMALISED = {"mixtral": True, "gpt_oss": True}


@dataclass
class RouterInfo:
    """One discovered router."""

    name: str
    module: nn.Module = field(repr=False)
    num_experts: int
    top_k: int
    param_names: list[str]

    @property
    def kind(self) -> str:
        return type(self.module).__name__


def num_experts_of(config) -> int | None:
    """The number of routed experts a config declares (None for a dense model)."""
    return next((getattr(config, k) for k in _NUM_EXPERT_KEYS if getattr(config, k, None)), None)


def moe_dims(config) -> tuple[int, int, int]:
    """(num_experts, hidden_size, experts per token) read from a model config; ConfigError if not MoE."""
    num_experts = num_experts_of(config)
    if not isinstance(num_experts, int) or num_experts < 2:
        raise ConfigError(
            f"teacher {getattr(config, 'model_type', '?')!r} has no mixture-of-experts layers "
            f"(none of {', '.join(_NUM_EXPERT_KEYS)} in its config): SAR-KD needs an MoE teacher"
        )
    top_k = int(getattr(config, "num_experts_per_tok", None) or getattr(config, "moe_topk", 1) or 1)
    return num_experts, int(config.hidden_size), top_k


def _holds_experts(module: nn.Module, num_experts: int, exclude: nn.Module) -> bool:
    """True when a child of ``module`` (other than ``exclude``) holds one set of weights per expert."""
    for child in module.children():
        if child is exclude:
            continue
        if isinstance(child, nn.ModuleList) and len(child) == num_experts:
            return True
        if any(p.ndim == 3 and p.shape[0] == num_experts for p in child.parameters(recurse=False)):
            return True
    return False


def find_routers(model: nn.Module, patterns: list[str] | None = None) -> list[RouterInfo]:
    """Discover the router modules of an MoE causal LM.

    Without ``patterns``: every module owning a 2-D ``weight`` of shape (num_experts, hidden) whose
    parent also holds the experts. With ``patterns`` (regexes searched in module names): every
    matching module, validated by the same weight shape; matches of the wrong shape are rejected
    and logged. Raises :class:`ConfigError` when nothing is found.
    """
    num_experts, hidden, top_k = moe_dims(model.config)
    compiled = [re.compile(p) for p in patterns] if patterns else None
    parents = {name: mod for name, mod in model.named_modules()}
    found: list[RouterInfo] = []
    rejected: list[str] = []
    for name, module in model.named_modules():
        if compiled is not None and not any(p.search(name) for p in compiled):
            continue
        weight = module._parameters.get("weight")
        shape_ok = weight is not None and weight.ndim == 2 and tuple(weight.shape) == (num_experts, hidden)
        if compiled is None:
            parent = parents.get(name.rpartition(".")[0])
            if not (shape_ok and parent is not None and _holds_experts(parent, num_experts, module)):
                continue
        elif not shape_ok:
            shapes = [tuple(p.shape) for p in module.parameters(recurse=False)]
            if shapes:
                rejected.append(f"{name} (params {shapes}, need weight ({num_experts}, {hidden}))")
            continue
        pnames = [f"{name}.{pn}" for pn, p in module._parameters.items() if p is not None]
        found.append(RouterInfo(name, module, num_experts, int(getattr(module, "top_k", top_k)), pnames))
    for r in rejected:
        logger.info("router pattern match rejected by shape: %s", r)
    if not found:
        how = f"--router_patterns {patterns}" if patterns else "structural search"
        raise ConfigError(
            f"no MoE routers found in {type(model).__name__} by {how} "
            f"(looked for a weight of shape ({num_experts}, {hidden}) beside the experts); "
            "pass --router_patterns with regexes naming the router modules"
        )
    return found


def router_table(routers: list[RouterInfo]) -> str:
    """A human-readable table of the discovered routers."""
    rows = [("module", "class", "experts", "top_k", "params")]
    for r in routers:
        n = sum(p.numel() for p in r.module.parameters(recurse=False))
        rows.append((r.name, r.kind, str(r.num_experts), str(r.top_k), str(n)))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    total = sum(p.numel() for r in routers for p in r.module.parameters(recurse=False))
    lines.append(f"{len(routers)} routers, {total:,} trainable parameters")
    return "\n".join(lines)


def router_params(model: nn.Module, routers: list[RouterInfo]) -> dict[str, nn.Parameter]:
    """The router parameters keyed by their state-dict names."""
    params = dict(model.named_parameters())
    return {n: params[n] for r in routers for n in r.param_names}


def freeze_all_but_routers(model: nn.Module, routers: list[RouterInfo]) -> dict[str, nn.Parameter]:
    """Make only router parameters trainable, held in fp32 (master weights); return them by name."""
    model.requires_grad_(False)
    trainable = router_params(model, routers)
    for p in trainable.values():
        if p.dtype != torch.float32:
            p.data = p.data.float()
        p.requires_grad_(True)
    return trainable


def routing_gives_no_gradient(config) -> bool:
    """True when the native forward provably gives the router zero gradient (top-1, renormalised)."""
    _, _, top_k = moe_dims(config)
    renorm = bool(getattr(config, "norm_topk_prob", False)) or _ALWAYS_RENORMALISED.get(config.model_type, False)
    return top_k == 1 and renorm


@dataclass
class RouterRecord:
    """Router outputs of one forward pass, with gradient (flattened tokens)."""

    logits: torch.Tensor  # (tokens, num_experts)
    indices: torch.Tensor  # (tokens, top_k) chosen experts


class RouterController:
    """Forward hooks on the routers: record their logits and apply the chosen gradient mode.

    ``active`` switches the gradient mode on (training) or off (evaluation: native forward).
    ``recording`` collects :class:`RouterRecord` of the current forward; it is off during the
    recomputation of checkpointed layers in the backward pass so nothing is collected twice.
    """

    def __init__(self, routers: list[RouterInfo], mode: str = "straight_through") -> None:
        self.routers = routers
        self.mode = mode
        self.active = False
        self.recording = False
        self.records: list[RouterRecord] = []
        self._handles = [r.module.register_forward_hook(self._hook) for r in routers]
        if mode != "native":
            self._check_layout()

    def _check_layout(self) -> None:
        r = self.routers[0]
        weight = r.module.weight
        x = torch.zeros(2, weight.shape[1], dtype=weight.dtype, device=weight.device)
        was_recording, self.recording = self.recording, False
        try:
            with torch.no_grad():
                out = r.module(x)
        finally:
            self.recording = was_recording
        if not (isinstance(out, tuple) and len(out) >= 3):
            raise ConfigError(
                f"router {r.name} ({r.kind}) returns {type(out).__name__}, not (logits, weights, indices); "
                f"--router_grad {self.mode} needs the transformers 5.x router layout: use --router_grad native"
            )

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, module: nn.Module, args, output):
        if isinstance(output, torch.Tensor):
            logits, indices = output, None
        else:
            logits, scores, indices = output[0], output[1], output[2]
        if self.recording:
            if indices is None:
                indices = logits.detach().topk(getattr(module, "top_k", 1), dim=-1).indices
            self.records.append(
                RouterRecord(logits.reshape(-1, logits.shape[-1]), indices.reshape(-1, indices.shape[-1]))
            )
        if not self.active or self.mode == "native" or indices is None:
            return None
        if self.mode == "straight_through_topk":
            logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, indices)
            factor = torch.exp(logp - logp.detach())  # == 1.0 exactly in the forward pass
            return (logits, (scores * factor).to(scores.dtype), indices, *output[3:])
        probs = torch.softmax(logits.float(), dim=-1)
        all_idx = torch.arange(probs.shape[-1], device=probs.device).expand_as(probs)
        if self.mode == "dense":  # all experts, weighted by the full routing distribution
            return (logits, probs.to(scores.dtype), all_idx, *output[3:])
        # straight_through: every expert runs, but the forward weights are the native ones (exactly
        # zero for unchosen experts, since p - stop_grad(p) == 0); the backward sees
        # d out / d p_i = expert_i(x) for every expert i.
        native = torch.zeros_like(probs).scatter(-1, indices, scores.float())
        weights = native + (probs - probs.detach())
        return (logits, weights.to(scores.dtype), all_idx, *output[3:])

    def pop_records(self) -> list[RouterRecord]:
        records, self.records = self.records, []
        return records


def apply_router_update(model: nn.Module, update: dict[str, torch.Tensor], patterns: list[str] | None = None) -> int:
    """Copy a ``router_update.pt`` dict into ``model``; every key must be one of its router parameters.

    Returns the number of tensors written. Raises :class:`ConfigError` on unknown keys or shape mismatch.
    """
    routers = find_routers(model, patterns)
    allowed = router_params(model, routers)
    unknown = sorted(set(update) - set(allowed))
    if unknown:
        raise ConfigError(
            f"router update holds {len(unknown)} tensor(s) that are not router parameters of this teacher "
            f"(e.g. {unknown[0]}): wrong teacher or a corrupted file"
        )
    missing = sorted(set(allowed) - set(update))
    if missing:
        raise ConfigError(f"router update lacks {len(missing)} router parameter(s) of this teacher (e.g. {missing[0]})")
    for n, t in update.items():
        if tuple(t.shape) != tuple(allowed[n].shape):
            raise ConfigError(f"router update {n}: shape {tuple(t.shape)} != teacher's {tuple(allowed[n].shape)}")
    with torch.no_grad():
        for n, t in update.items():
            allowed[n].copy_(t.to(allowed[n].dtype))
    return len(update)
