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


HUB_HINT = "pass a local directory, or set HF_HUB_OFFLINE=1 to load from a populated Hugging Face cache"
_hub_down: dict[str, str | None] = {}  # endpoint -> why it is unreachable (None: it answered)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_unreachable(name: str) -> str | None:
    """Why the hub cannot be reached (``None`` when it answers), from one request without retries.

    ``from_pretrained`` of an uncached hub id retries a network error 5 times with backoff (~45 s and a
    warning per try); one failed HEAD is enough to know. Checked once per process.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    endpoint = constants.ENDPOINT
    if endpoint not in _hub_down:
        hub_log = logging.getLogger("huggingface_hub")
        level = hub_log.level
        hub_log.setLevel(logging.ERROR)  # its own "thrown while requesting" warning; we say it once below
        try:
            get_hf_file_metadata(hf_hub_url(name, "config.json"), timeout=10)
            _hub_down[endpoint] = None
        except HfHubHTTPError as e:  # it answered: 404, 401, ... are for from_pretrained to report
            status = getattr(e.response, "status_code", None)
            _hub_down[endpoint] = f"HTTP {status}" if status in (408, 429, 500, 502, 503, 504) else None
        except Exception as e:
            _hub_down[endpoint] = f"{type(e).__name__}: {_first_line(e)}"
        finally:
            hub_log.setLevel(level)
    return _hub_down[endpoint]


def _from_pretrained(load, name: str, role: str, what: str, **kw):
    """``load(name, **kw)`` with one hub lookup at most before giving up, and a one-line error."""
    down = None
    if not Path(name).expanduser().exists() and not _hub_offline():
        down = hub_unreachable(name)
        if down:
            kw["local_files_only"] = True  # a cached copy still loads, without the retries
    try:
        return load(name, **kw)
    except Exception as e:
        if down:
            msg = f"cannot reach the Hugging Face hub ({down}) and {name} is not in the local cache: {HUB_HINT}"
        elif _hub_offline() and not Path(name).expanduser().exists():
            msg = f"HF_HUB_OFFLINE is set and {name} is not in the Hugging Face cache: pass a local directory"
        else:
            msg = f"cannot load {what} ({type(e).__name__}: {_first_line(e)})"
        raise ConfigError(f"--{role}_model {name}: {msg}") from e


def load_tokenizer(name: str, role: str, trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained`` with a one-line error on failure."""
    from transformers import AutoTokenizer

    _check_source(name, role, need_config=False)
    return _from_pretrained(AutoTokenizer.from_pretrained, name, role, "tokenizer", trust_remote_code=trust_remote_code)


def load_config(name: str, role: str, trust_remote_code: bool = False):
    """``AutoConfig.from_pretrained`` with a one-line error on failure."""
    from transformers import AutoConfig

    _check_source(name, role)
    return _from_pretrained(AutoConfig.from_pretrained, name, role, "config", trust_remote_code=trust_remote_code)


def load_model(name: str, role: str, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` in ``dtype`` with a one-line error on failure."""
    from transformers import AutoModelForCausalLM

    _check_source(name, role)
    return _from_pretrained(
        AutoModelForCausalLM.from_pretrained, name, role, "model", dtype=dtype, trust_remote_code=trust_remote_code
    )


def check_student(student_config, student: str, teacher: str) -> None:
    """Refuse a mixture-of-experts student (and the teacher given as the student): the student is dense.

    SAR-KD trains every student weight and only the teacher's routers; an MoE student would need its own
    router handling (load balance, router gradient) that this trainer does not give it.
    """
    from .routers import num_experts_of

    s_path, t_path = Path(student).expanduser(), Path(teacher).expanduser()
    same = student == teacher or (s_path.exists() and s_path.resolve() == t_path.resolve())
    n = num_experts_of(student_config)
    if same:
        raise ConfigError(
            f"--student_model {student} is the teacher itself (same as --teacher_model): "
            "give a smaller dense model as the student"
        )
    if isinstance(n, int) and n > 1:
        raise ConfigError(
            f"--student_model {student} is a mixture-of-experts model ({n} experts): the student must be dense "
            "(SAR-KD trains the whole student and only the teacher's routers)"
        )


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
