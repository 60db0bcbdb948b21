"""Loading teacher, student and tokenizers through the real ``from_pretrained`` path."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, gguf_source, model_name
from .config import looks_local as _looks_local

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _check_source(name: str, role: str, need_config: bool = True) -> None:
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ConfigError(f"--{role}_model {name}: not a directory")
        has_config = (p / "config.json").is_file()
        if not has_config and not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            ggufs = sorted(f.name for f in p.glob("*.gguf"))
            if ggufs:  # a folder of GGUF files only
                more = f" (and {len(ggufs) - 1} more .gguf files)" if len(ggufs) > 1 else ""
                raise ConfigError(
                    f"--{role}_model {name}: no config.json in that directory, but it holds {ggufs[0]}{more}: "
                    f"pass --{role}_gguf_file {ggufs[0]} to load it"
                )
        if not need_config:
            return
        if not has_config:
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


def _from_pretrained(load, name: str, role: str, what: str, shown: str | None = None, **kw):
    """``load(name, **kw)`` with one hub lookup at most before giving up, and a one-line error naming
    ``--{role}_model {shown}`` (default: ``name``)."""
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
        raise ConfigError(f"--{role}_model {shown or name}: {msg}") from e


def _load(load, name: str, role: str, what: str, gguf_file: str | None, need_config: bool = True, **kw):
    """``load`` from a hub id or model directory, or from a GGUF file through transformers' GGUF loader
    (``load(folder, gguf_file=file name)``); the GGUF forms are checked by :func:`~sar_kd.config.gguf_source`."""
    gguf = gguf_source(name, gguf_file, role)
    if gguf is None:
        _check_source(name, role, need_config=need_config)
        return _from_pretrained(load, name, role, what, **kw)
    folder, file = gguf
    return _from_pretrained(load, folder, role, what, shown=str(Path(folder) / file), gguf_file=file, **kw)


def load_tokenizer(name: str, role: str, trust_remote_code: bool = False, gguf_file: str | None = None):
    """``AutoTokenizer.from_pretrained`` with a one-line error on failure.

    ``name`` is a hub id, a model directory or a ``.gguf`` file; or a folder, with ``gguf_file`` the name
    of the ``.gguf`` file in it. A GGUF tokenizer is rebuilt by transformers from the file's metadata.
    """
    from transformers import AutoTokenizer

    return _load(
        AutoTokenizer.from_pretrained,
        name,
        role,
        "tokenizer",
        gguf_file,
        need_config=False,
        trust_remote_code=trust_remote_code,
    )


def load_config(name: str, role: str, trust_remote_code: bool = False, gguf_file: str | None = None):
    """``AutoConfig.from_pretrained`` with a one-line error on failure (``name``, ``gguf_file``: as for
    :func:`load_tokenizer`; a GGUF file's config is read from its metadata, no tensor is read)."""
    from transformers import AutoConfig

    return _load(AutoConfig.from_pretrained, name, role, "config", gguf_file, trust_remote_code=trust_remote_code)


def load_model(
    name: str, role: str, dtype: torch.dtype, trust_remote_code: bool = False, gguf_file: str | None = None
) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` in ``dtype`` with a one-line error on failure.

    ``name``, ``gguf_file``: as for :func:`load_tokenizer`. A GGUF checkpoint is dequantised to ``dtype``
    and rebuilt as a plain model (:func:`plain_model`), so that it trains and ``save_pretrained`` writes
    it as safetensors like any other.
    """
    from transformers import AutoModelForCausalLM

    kw: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if gguf_source(name, gguf_file, role) is not None:
        try:  # unpack every weight even where a packed-GGUF matmul kernel is installed (transformers >= 5.x)
            from transformers import GgufConfig

            kw["quantization_config"] = GgufConfig(dequantize=True)
        except ImportError:  # older transformers always dequantise
            pass
    model = _load(AutoModelForCausalLM.from_pretrained, name, role, "model", gguf_file, **kw)
    if not _from_gguf(model):
        return model
    shown = model_name(name, gguf_file)
    logger.info("%s: %s read from GGUF, dequantised to %s", role, shown, model.dtype)
    try:
        return plain_model(model)
    except (RuntimeError, ValueError) as e:  # a state dict the class does not take (not seen with transformers 5)
        raise ConfigError(
            f"--{role}_model {shown}: cannot rebuild the GGUF model as a plain one ({_first_line(e)})"
        ) from e


def _from_gguf(model: nn.Module) -> bool:
    q = getattr(model.config, "quantization_config", None)
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    return str(getattr(method, "value", method)) == "gguf"


def plain_model(model: nn.Module) -> nn.Module:
    """A model loaded from GGUF, rebuilt without its ``quantization_config``.

    transformers marks a GGUF-loaded model as quantized with gguf, and ``save_pretrained`` then refuses it
    ("not serializable"), although its weights are already dequantised float tensors. The same class is
    built from the config without ``quantization_config`` on the meta device (nothing allocated or
    initialised) and takes the loaded tensors themselves (``load_state_dict(strict=True, assign=True)``:
    no copy); buffers outside the state dict (rotary frequencies) come from the loaded model too.
    """
    config = model.config  # from_pretrained's own deep copy: changing it touches nothing else
    del config.quantization_config
    state = model.state_dict()
    with torch.device("meta"):
        plain = type(model)(config)
    plain.load_state_dict(state, strict=True, assign=True)
    for name, buf in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        mod = plain.get_submodule(owner)
        if leaf in mod._buffers:
            mod._buffers[leaf] = buf
    plain.tie_weights()
    left = [n for n, t in (*plain.named_parameters(), *plain.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"{type(model).__name__}.{left[0]} was not loaded")
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = model.generation_config
    plain.train(model.training)
    return plain


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


def enable_checkpointing(model: nn.Module) -> bool:
    """Non-reentrant activation checkpointing of every decoder layer (router logits keep their graph).

    False (nothing changed) for a model whose class says it cannot checkpoint (e.g. JetMoE)."""
    if getattr(model, "supports_gradient_checkpointing", True) is False:
        return False
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:  # transformers < 5
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return True


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
