"""Loading teacher, student and tokenizers through the real ``from_pretrained`` path."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _looks_local(name: str) -> bool:
    """A path rather than a hub id (``org/name``): absolute, relative, home-based or deeper than one slash."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def _check_source(name: str, role: str, need_config: bool = True) -> None:
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ConfigError(f"--{role}_model {name}: not a directory")
        if not need_config:
            return
        if not (p / "config.json").is_file():
            raise ConfigError(f"--{role}_model {name}: no config.json in that directory")
        if not os.access(p / "config.json", os.R_OK):
            raise ConfigError(f"--{role}_model {name}: config.json is not readable")
    elif _looks_local(name):
        raise ConfigError(f"--{role}_model {name}: no such directory (and not a hub id)")


def load_tokenizer(name: str, role: str, trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained`` with a one-line error on failure."""
    from transformers import AutoTokenizer

    _check_source(name, role, need_config=False)
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ConfigError(f"--{role}_model {name}: cannot load tokenizer ({type(e).__name__}: {_first_line(e)})") from e


def load_config(name: str, role: str, trust_remote_code: bool = False):
    """``AutoConfig.from_pretrained`` with a one-line error on failure."""
    from transformers import AutoConfig

    _check_source(name, role)
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ConfigError(f"--{role}_model {name}: cannot load config ({type(e).__name__}: {_first_line(e)})") from e


def load_model(name: str, role: str, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` in ``dtype`` with a one-line error on failure."""
    from transformers import AutoModelForCausalLM

    _check_source(name, role)
    try:
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ConfigError(f"--{role}_model {name}: cannot load model ({type(e).__name__}: {_first_line(e)})") from e


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else ""


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (router logits keep their graph)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:  # transformers < 5
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def set_frozen_teacher_mode(teacher: nn.Module) -> None:
    """Eval behaviour everywhere (no dropout, no router jitter) but checkpointed layers still checkpoint.

    HF layers checkpoint only when ``self.training`` is true, so a plain ``teacher.eval()`` would keep
    every teacher activation for the router's backward pass. Only the decoder-layer wrappers get
    ``training=True``; their children (attention, MoE block) stay in eval mode.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    teacher.eval()
    for m in teacher.modules():
        if isinstance(m, GradientCheckpointingLayer):
            m.training = True


def max_positions(config) -> int | None:
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
