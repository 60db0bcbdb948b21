"""FSDP2 for SAR-KD: the teacher and the student sharded over the processes (``--fsdp``).

Every decoder layer of both models is its own ``fully_shard`` unit and the :class:`SARKDModel`
around them is the root unit (embeddings, final norms, LM heads, the projection). The teacher's
frozen weights are sharded like any other; its router parameters, the only trainable tensors in
a teacher layer, get their gradient through FSDP's reduce-scatter like the student's. With
``--model_dtype bfloat16`` parameters are gathered in bf16 and gradients reduced in fp32 (the
sharded masters stay fp32 for everything trained).

What is not plain DDP, and handled here:

* a parameter of a sharded module is a ``DTensor`` shard between forwards: the trained tensors are
  gathered (:func:`full_tensor`) to write ``student/`` and ``router_update.pt`` on rank 0;
* methods other than ``forward`` that read root parameters (evaluation) are registered with
  :func:`register_fsdp_forward_method` so FSDP gathers for them too;
* the router L2 anchor is applied to the sharded fp32 masters after the backward pass
  (:func:`add_anchor_gradient`), not through the loss, whose forward sees gathered (maybe bf16) copies;
* gradients are reduce-scattered after every micro-batch (no whole gradients kept between the
  micro-batches of an accumulation window);
* checkpoints hold whole trainable tensors and optimizer state in ordinary files written by rank 0
  (:func:`save_state` / :func:`load_state`), plus one RNG file per process; the frozen teacher is
  never copied into them. (Resuming needs the same number of processes, as without FSDP.)
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import ConfigError

TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers causal LM: modules of its ``_no_split_modules`` classes."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        found = getattr(model.base_model, "layers", None)
        layers = list(found) if isinstance(found, nn.ModuleList) else []
    return layers


def shard(model: nn.Module, submodels: list[nn.Module], device_type: str, param_dtype: torch.dtype | None) -> None:
    """``fully_shard`` every decoder layer of ``submodels``, then ``model`` itself as the root unit.

    ``param_dtype``: the dtype parameters are gathered in (None: as stored); gradients are reduced
    in fp32. Needs an initialised process group (torchrun / accelerate launch).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    except ImportError as e:  # FSDP2's public API: torch 2.6 and later
        raise ConfigError(f"--fsdp needs torch >= 2.6 (FSDP2's fully_shard); this is torch {torch.__version__}") from e

    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for sub in submodels:
        for layer in decoder_layers(sub):
            fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if hasattr(model, "eval_nll"):
        register_fsdp_forward_method(model, "eval_nll")


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a DTensor shard (collective: every process calls it); others as they are."""
    return t.full_tensor() if is_sharded(t) else t


def local_shards(params: dict[str, torch.Tensor], whole: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This process's part of each tensor in ``whole``, cut like the parameter of the same name
    (collective). params: name -> sharded parameter; whole: name -> a tensor of that parameter's shape."""
    from torch.distributed.tensor import distribute_tensor

    out = {}
    for n, p in params.items():
        t = whole[n].to(device=p.device, dtype=torch.float32)
        out[n] = distribute_tensor(t, p.device_mesh, p.placements).to_local() if is_sharded(p) else t
    return out


def add_anchor_gradient(params: dict[str, torch.Tensor], anchors: dict[str, torch.Tensor], weight: float) -> float:
    """The L2 anchor ``weight · Σ‖θ − θ₀‖²`` applied to sharded fp32 masters: adds its gradient
    ``2·weight·(θ − θ₀)`` to each shard's ``.grad`` and returns ``Σ‖θ − θ₀‖²`` over the whole
    tensors (collective: one all-reduce). ``anchors``: θ₀ cut like ``params`` (:func:`local_shards`).

    Under FSDP the anchor cannot be part of the loss: the forward sees the gathered parameters, which
    are bf16 copies with ``--model_dtype bfloat16`` (a drift below one bf16 step would vanish)."""
    import torch.distributed as dist

    total = torch.zeros((), dtype=torch.float32, device=next(iter(anchors.values())).device)
    with torch.no_grad():
        for n, p in params.items():
            local = p.to_local() if is_sharded(p) else p
            diff = local.float() - anchors[n]
            total += (diff * diff).sum()
            if weight > 0 and p.requires_grad:
                g = (2.0 * weight * diff).to(local.dtype)
                if p.grad is None:
                    p.grad = _like(p, g)
                else:
                    (p.grad.to_local() if is_sharded(p.grad) else p.grad).add_(g)
    if dist.is_initialized():
        dist.all_reduce(total)
    return float(total)


def _like(p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """A gradient for parameter ``p`` from this process's part ``local``."""
    if not is_sharded(p):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter of ``model``, whole, on the CPU (collective)."""
    return {n: full_tensor(p.detach()).cpu() for n, p in model.named_parameters() if p.requires_grad}


def full_model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s whole state dict on the CPU (collective); used to write ``student/`` from rank 0.

    Tied weights (one parameter under two names) stay one tensor, so ``save_pretrained`` writes them once."""
    gathered: dict[int, torch.Tensor] = {}
    out = {}
    for n, t in module.state_dict(keep_vars=True).items():
        if id(t) not in gathered:
            gathered[id(t)] = full_tensor(t.detach()).cpu()
        out[n] = gathered[id(t)]
    return out


def load_trainable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors into the (sharded) trainable parameters of ``model``; every process calls it
    with the same ``state``."""
    from torch.distributed.tensor import distribute_tensor

    with torch.no_grad():
        for n, p in model.named_parameters():
            if not p.requires_grad:
                continue
            full = state[n].to(device=p.device, dtype=p.dtype)
            if is_sharded(p):
                p.to_local().copy_(distribute_tensor(full, p.device_mesh, p.placements).to_local())
            else:
                p.copy_(full)


def save_state(where: Path, model: nn.Module, optimizer, scheduler, rank: int, is_main: bool) -> None:
    """Write the training state of a sharded run into ``where`` (collective).

    ``trainable.safetensors`` (whole trainable tensors), ``optimizer.pt`` (the optimizer's state dict
    with whole tensors, by parameter position), ``scheduler.pt`` by rank 0; ``rng_<rank>.pt`` by every
    process.
    """
    from safetensors.torch import save_file

    weights = trainable_state(model)
    optim = optimizer.state_dict()  # per-parameter state by position in the groups; gathered whole
    optim["state"] = {i: {k: full_tensor(v).cpu() for k, v in st.items()} for i, st in optim["state"].items()}
    where.mkdir(parents=True, exist_ok=True)
    if is_main:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(where / TRAINABLE))
        torch.save(optim, where / OPTIMIZER)
        torch.save(scheduler.state_dict(), where / SCHEDULER)
    torch.save(_rng_state(), where / f"rng_{rank}.pt")


def load_state(where: Path, model: nn.Module, optimizer, scheduler, rank: int) -> None:
    """Restore what :func:`save_state` wrote (collective). Raises ValueError when the checkpoint's
    trainable tensors are not exactly this run's (a :class:`ConfigError`)."""
    from safetensors.torch import load_file
    from torch.distributed.tensor import distribute_tensor

    weights = load_file(str(where / TRAINABLE))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != names:
        raise ConfigError(
            f"checkpoint {where} does not match this run's trainable parameters "
            f"({len(names - set(weights))} missing, {len(set(weights) - names)} unexpected): "
            "same models and flags are needed to resume"
        )
    load_trainable(model, weights)
    optim = torch.load(where / OPTIMIZER, weights_only=False)
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def shard_like(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # a whole state tensor -> p's shard
        if is_sharded(p) and v.shape == p.shape:
            return distribute_tensor(v.to(device=p.device), p.device_mesh, p.placements)
        return v

    optim["state"] = {i: {k: shard_like(params[i], v) for k, v in st.items()} for i, st in optim["state"].items()}
    optimizer.load_state_dict(optim)
    scheduler.load_state_dict(torch.load(where / SCHEDULER, weights_only=False))
    _set_rng_state(torch.load(where / f"rng_{rank}.pt", weights_only=False))


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
