"""Finding the teacher's routers, freezing everything else, and giving the routers a gradient.

A *router* is the module inside a sparse-MoE block that maps a hidden state to one logit per
expert. Discovery is structural (shape ``(num_experts, hidden)`` beside a module that holds the
experts), never by name alone: the name ``gate`` also matches every expert's ``gate_proj`` and the
fused ``experts.gate_up_proj`` of transformers 5.x.

With top-1 routing and renormalised weights (``norm_topk_prob=True``, the default teacher) the kept
routing weight is exactly 1.0, so the model's own forward gives the router no gradient at all.
:class:`RouterController` fixes that during training with a forward hook on each router, in one of
the modes of :mod:`sar_kd.router_grad` (which also gives the formulas for softmax and sigmoid
routers, renormalised or not, with a scaling factor):

* ``straight_through`` (default): every expert is evaluated, the forward weights are the native
  ones (bit-identical output) and the backward pass sees the dense relaxation's gradient for
  *every* expert: the first-order effect of moving routing mass toward each expert. Costs all
  experts' compute while training. With ``samples`` M > 0 (``--router_grad_samples``; auto for
  teachers of more than 8 experts) only the chosen experts and M sampled others run, and the backward
  is an unbiased estimate of the all-experts one.
* ``straight_through_topk``: only the chosen experts run; the backward sees ``∂w_i = w_i · ∂log p_i``.
  Cheap, but it only tells whether the chosen expert's output should be scaled up or down, not
  whether another expert would do better: measured on the demo teacher, training the routers on
  the teacher's *own* CE with it raised the teacher's perplexity from 33.5 to 61.4, where
  ``straight_through`` lowered it to 33.4 (docs/router_gradient.md).
* ``dense``: every expert runs, weighted by the native routing function with every expert chosen
  (a different forward while training).
* ``native``: the model as it is.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import ConfigError
from .router_grad import (
    RoutingSpec,
    dense_weights,
    infer_routing_spec,
    resolve_samples,
    routing_distribution,
    sample_other_experts,
    sampled_straight_through_weights,
    straight_through_weights,
    topk_straight_through_weights,
)

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


def _cfg(config, key: str):
    """``config.key`` or None (also for per-layer attributes that refuse a global read)."""
    try:
        return getattr(config, key, None)
    except Exception:
        return None


def num_experts_of(config) -> int | None:
    """The number of routed experts a config declares (None for a dense model)."""
    return next((_cfg(config, k) for k in _NUM_EXPERT_KEYS if _cfg(config, k)), None)


def moe_dims(config) -> tuple[int, int, int]:
    """(num_experts, hidden_size, experts per token) read from a model config; ConfigError if not MoE."""
    num_experts = num_experts_of(config)
    if not isinstance(num_experts, int) or num_experts < 2:
        raise ConfigError(
            f"teacher {getattr(config, 'model_type', '?')!r} has no mixture-of-experts layers "
            f"(none of {', '.join(_NUM_EXPERT_KEYS)} in its config): SAR-KD needs an MoE teacher"
        )
    top_k = _cfg(config, "num_experts_per_tok") or _cfg(config, "moe_topk") or 1
    top_k = int(top_k) if isinstance(top_k, int) else 1  # per-layer lists: each router's own top_k is used
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


def _router_only(module: nn.Module, weight: nn.Parameter) -> bool:
    """True when ``module`` owns nothing but the router weight and small tensors (at most one value per
    expert: a bias, a scale, a selection statistic)."""
    return all(p is weight or p.numel() <= weight.shape[0] for p in module.parameters())


# How far above the module owning the router weight the experts may live (router wrappers, gating sub-blocks).
_MAX_ROUTER_DEPTH = 3


def _structural_router(model: nn.Module, name: str, weight: nn.Parameter, num_experts: int) -> str | None:
    """The router module for a (num_experts, hidden) weight owned by module ``name``, or None.

    Walk up from the owner: every module on the way must own nothing but this weight and small
    tensors (so an expert's or a shared expert's ``gate_proj`` never qualifies: its MLP also holds
    ``up_proj``/``down_proj``), until an ancestor holds the experts in another branch. The router is
    the highest router-only module below that ancestor (the one whose output the MoE block reads).
    """
    parts = name.split(".") if name else []
    router = name
    for depth in range(1, _MAX_ROUTER_DEPTH + 1):
        if len(parts) < depth:
            return None
        below = model.get_submodule(".".join(parts[: len(parts) - depth + 1]))
        above = model.get_submodule(".".join(parts[: len(parts) - depth]))
        if not _router_only(below, weight):
            return None
        router = ".".join(parts[: len(parts) - depth + 1])
        if _holds_experts(above, num_experts, below):
            return router
    return None


def find_routers(model: nn.Module, patterns: list[str] | None = None) -> list[RouterInfo]:
    """Discover the router modules of an MoE causal LM.

    Without ``patterns``: for every 2-D ``weight`` of shape (num_experts, hidden), the module that
    owns it (or the router-only wrapper around it, up to three levels) when an ancestor holds the
    experts beside it (see :func:`_structural_router`). With ``patterns`` (regexes searched in
    module names): every matching module that owns such a weight, directly or through a router-only
    child; matches of the wrong shape are rejected and logged. Raises :class:`ConfigError` when
    nothing is found.
    """
    num_experts, hidden, top_k = moe_dims(model.config)
    compiled = [re.compile(p) for p in patterns] if patterns else None
    modules = dict(model.named_modules())
    found: dict[str, RouterInfo] = {}
    rejected: list[str] = []

    def add(rname: str, owner: str) -> None:
        """Router ``rname`` whose weight lives in module ``owner`` (itself or a descendant)."""
        if rname in found:
            return
        module = modules[rname]
        # trained: the owner's weight and bias, and direct tensors of the modules on the way (a scale);
        # not a selection statistic in a side module (e.g. Ernie's moe_statics), which gets no gradient
        path = [owner] + [n for n in modules if owner.startswith(n + ".") and (n == rname or n.startswith(rname + "."))]
        pnames = [f"{n}.{pn}" for n in path for pn, p in modules[n]._parameters.items() if p is not None]
        k = getattr(module, "top_k", None) or top_k
        found[rname] = RouterInfo(rname, module, num_experts, int(k), sorted(set(pnames), key=pnames.index))

    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        shape_ok = weight is not None and weight.ndim == 2 and tuple(weight.shape) == (num_experts, hidden)
        if compiled is None:
            if shape_ok:
                rname = _structural_router(model, name, weight, num_experts)
                if rname is not None:
                    add(rname, name)
            continue
        if not any(p.search(name) for p in compiled):
            continue
        if shape_ok:
            add(name, name)
            continue
        inner = [
            f"{name}.{cn}" if name else cn
            for cn, child in module.named_children()
            if getattr(child, "weight", None) is not None
            and tuple(child.weight.shape) == (num_experts, hidden)
            and _router_only(module, child.weight)
        ]
        if inner:
            add(name, inner[0])
        elif any(True for _ in module.parameters(recurse=False)):
            shapes = [tuple(p.shape) for p in module.parameters(recurse=False)]
            rejected.append(f"{name} (params {shapes}, need weight ({num_experts}, {hidden}))")
    for r in rejected:
        logger.info("router pattern match rejected by shape: %s", r)
    # a wrapper added after its inner module (module order): keep the outermost
    routers = [r for r in found.values() if not any(r.name.startswith(o + ".") for o in found if o != r.name)]
    if not routers:
        how = f"--router_patterns {patterns}" if patterns else "structural search"
        raise ConfigError(
            f"no MoE routers found in {type(model).__name__} by {how} "
            f"(looked for a weight of shape ({num_experts}, {hidden}) beside the experts); "
            "pass --router_patterns with regexes naming the router modules"
        )
    return routers


def router_table(routers: list[RouterInfo]) -> str:
    """A human-readable table of the discovered routers."""
    rows = [("module", "class", "experts", "top_k", "params")]
    counts = []
    for r in routers:  # the parameters that train: the router's own and a router-only child's (JetMoE's .layer)
        own = {f"{r.name}.{n}": p for n, p in r.module.named_parameters()}
        counts.append(sum(own[n].numel() for n in r.param_names if n in own))
        rows.append((r.name, r.kind, str(r.num_experts), str(r.top_k), str(counts[-1])))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    total = sum(counts)
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
    spec: RoutingSpec = RoutingSpec()
    inputs: torch.Tensor | None = None  # (tokens, hidden) the router's input, detached (record_inputs only)

    def distribution(self) -> torch.Tensor:
        """(tokens, num_experts) routing distribution (sums to 1 per token), fp32, with gradient."""
        return routing_distribution(self.logits, self.spec)


class RouterController:
    """Forward hooks on the routers: record their logits and apply the chosen gradient mode.

    ``active`` switches the gradient mode on (training) or off (evaluation: native forward).
    ``recording`` collects :class:`RouterRecord` of the current forward; it is off during the
    recomputation of checkpointed layers in the backward pass so nothing is collected twice.

    Every mode except ``native`` needs the transformers 5.x router layout ``(logits (T, E),
    weights (T, k), indices (T, k))`` and a routing function it can reproduce (softmax or sigmoid,
    renormalised or not, times a constant: :func:`infer_routing_spec`); each router is probed once
    here and refused with a :class:`ConfigError` otherwise. In ``native`` mode a router whose
    layout is not understood is still recorded when it returns plain logits.

    ``samples`` (``straight_through`` only): unchosen experts sampled per token for the all-experts
    gradient (:func:`~sar_kd.router_grad.sampled_straight_through_weights`); 0 = every expert, -1 =
    auto (:func:`~sar_kd.router_grad.resolve_samples`). ``self.samples`` holds each router's resolved M.
    """

    def __init__(self, routers: list[RouterInfo], mode: str = "straight_through", samples: int = 0) -> None:
        self.routers = routers
        self.mode = mode
        self.samples: dict[int, int] = {
            id(r.module): resolve_samples(samples, r.num_experts, r.top_k) if mode == "straight_through" else 0
            for r in routers
        }
        self.baseline = "shrunk"  # of the sampled estimator (router_grad.BASELINES; benchmarks vary it)
        self.active = False
        self.recording = False
        self.record_inputs = False  # keep each router's input (the routing-KL trust region needs it)
        self.records: list[RouterRecord] = []
        self.specs: dict[int, RoutingSpec | None] = {}
        for r in routers:
            weight = next(p for p in r.module.parameters())
            spec, why = infer_routing_spec(r.module, r.num_experts, weight.shape[-1])
            if spec is None and mode != "native":
                raise ConfigError(
                    f"router {r.name} ({r.kind}): {why}; --router_grad {mode} cannot give it a gradient "
                    "(use --router_grad native)"
                )
            if spec is None:  # native mode: the model routes as it is; nothing recorded from this router
                logger.warning(
                    "router %s (%s): %s; it is left native and its statistics and regularisers are skipped",
                    r.name, r.kind, why,
                )  # fmt: skip
            self.specs[id(r.module)] = spec
        kinds = sorted({s.describe() for s in self.specs.values() if s is not None})
        if kinds:
            logger.info("routing function: %s", "; ".join(kinds))
        if mode == "straight_through":
            per = sorted({(r.num_experts, r.top_k, self.samples[id(r.module)]) for r in routers})
            logger.info(
                "router gradient: %s",
                "; ".join(
                    f"{e} experts top-{k}: " + (f"chosen + {m} sampled experts per token" if m else "every expert")
                    for e, k, m in per
                ),
            )
        self._handles = [r.module.register_forward_hook(self._hook) for r in routers]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, module: nn.Module, args, output):
        spec = self.specs.get(id(module))
        if isinstance(output, torch.Tensor):
            logits, scores, indices = output, None, None
        elif spec is not None:
            logits, scores, indices = output[0], output[1], output[2]
        else:  # a layout we do not understand: nothing to record or change
            return None
        if self.recording:
            if indices is None:
                indices = logits.detach().topk(getattr(module, "top_k", 1), dim=-1).indices
            x = args[0].detach().reshape(-1, args[0].shape[-1]) if self.record_inputs and args else None
            self.records.append(
                RouterRecord(
                    logits.reshape(-1, logits.shape[-1]),
                    indices.reshape(-1, indices.shape[-1]),
                    spec or RoutingSpec(),
                    x,
                )
            )
        if not self.active or self.mode == "native" or scores is None:
            return None
        if self.mode == "straight_through_topk":
            weights = topk_straight_through_weights(logits, scores, indices, spec)
            return (logits, weights.to(scores.dtype), indices, *output[3:])
        all_idx = torch.arange(logits.shape[-1], device=logits.device).expand(logits.shape[0], -1)
        if self.mode == "dense":  # every expert, weighted by the native function with k = E
            weights = dense_weights(logits, spec)
        elif (m := self.samples.get(id(module), 0)) and m < logits.shape[-1] - indices.shape[-1]:
            # straight_through, sampled: chosen + m other experts, an unbiased estimate of the backward below
            sampled, inv_prob = sample_other_experts(logits.detach(), indices, m, spec)
            weights = sampled_straight_through_weights(logits, scores, indices, sampled, inv_prob, spec, self.baseline)
            return (logits, weights.to(scores.dtype), torch.cat([indices, sampled], -1), *output[3:])
        else:  # straight_through: native forward, the dense relaxation's backward for every expert
            weights = straight_through_weights(logits, scores, indices, spec)
        return (logits, weights.to(scores.dtype), all_idx, *output[3:])

    def pop_records(self) -> list[RouterRecord]:
        records, self.records = self.records, []
        return records


ROUTER_UPDATE = "router_update.safetensors"
LEGACY_ROUTER_UPDATE = "router_update.pt"


def save_router_update(
    path, update: dict[str, torch.Tensor], teacher_model: str, routers: list[RouterInfo], patterns: list[str] | None
) -> None:
    """``router_update.safetensors``: the trained router tensors with what applying them needs in its
    metadata (the teacher, the router names and patterns, the SAR-KD version)."""
    import json

    from safetensors.torch import save_file

    from . import __version__

    meta = {
        "format": "pt",
        "sar_kd_version": __version__,
        "teacher_model": teacher_model,
        "router_names": json.dumps([r.name for r in routers]),
        "router_patterns": json.dumps(patterns),
    }
    save_file({k: v.contiguous() for k, v in update.items()}, str(path), metadata=meta)


def load_router_update(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a router update: ``.safetensors`` (metadata as written by
    :func:`save_router_update`) or a legacy ``router_update.pt``, read with ``weights_only=True`` (a
    pickle of anything but tensors is refused, never run; no metadata). A bad file is a :class:`ConfigError`."""
    from pathlib import Path

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
        update = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"--router_update {path}: not a readable router update ({type(e).__name__})") from e
    if not isinstance(update, dict) or not all(isinstance(v, torch.Tensor) for v in update.values()):
        raise ConfigError(f"--router_update {path}: expected a dict of tensors")
    return update, {}


def apply_router_update(model: nn.Module, update: dict[str, torch.Tensor], patterns: list[str] | None = None) -> int:
    """Copy a router update (:func:`load_router_update`) into ``model``; every key must be one of its router parameters.

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
