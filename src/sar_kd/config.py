"""The one configuration object of a SAR-KD run.

Every option lives in :class:`TrainConfig`; its field metadata is the ``--help`` text. The CLI
(``sar-kd train`` / ``train_sar_kd.py``), a JSON config file (``--config``) and the Python API
all fill the same object, and :func:`validate_config` checks it once, reporting every problem
together.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_TEACHER = "huihui-ai/Huihui-MoE-1B-A0.6B"
DEFAULT_STUDENT = "HuggingFaceTB/SmolLM-135M"

ROUTER_GRAD_MODES = ("straight_through", "straight_through_topk", "dense", "native")
DUAL_LOSSES = ("hidden", "logit", "both")
MODEL_DTYPES = ("float32", "float16", "bfloat16")
SCHEDULER_TYPES = ("linear", "cosine")
REPORT_TO = ("none", "tensorboard", "wandb")


class ConfigError(ValueError):
    """A configuration problem the user must fix; the CLI prints it on one line and exits 2."""


GGUF_INSTALL = 'pip install "sar-kd[gguf]"'


def looks_local(name: str) -> bool:
    """A path rather than a hub id (``org/name``): absolute, relative, home-based or deeper than one slash."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def _is_gguf_name(name: str) -> bool:
    return Path(name).suffix.lower() == ".gguf"


def gguf_source(model: str, gguf_file: str | None, role: str) -> tuple[str, str] | None:
    """``(folder, file name)`` of a GGUF checkpoint, or ``None`` for a hub id or model directory.

    A GGUF model is named either as the path of a ``.gguf`` file (``--{role}_model path/x.gguf``) or as
    a local folder plus the file's name in it (``--{role}_model folder --{role}_gguf_file x.gguf``);
    these are the arguments of transformers' own GGUF loader (``from_pretrained(folder, gguf_file=...)``).
    A bad combination, a missing file or a missing ``gguf`` package is a one-line :class:`ConfigError`,
    raised before anything is loaded.
    """
    flag = f"--{role}_gguf_file"
    path = Path(model).expanduser()
    model_is_file = _is_gguf_name(model) and not path.is_dir()
    if gguf_file is None and not model_is_file:
        return None
    if gguf_file is not None:
        if model_is_file:
            raise ConfigError(
                f"--{role}_model {model} is already a .gguf file and {flag} {gguf_file} names another: give the "
                f"file's path as --{role}_model alone, or its folder as --{role}_model with {flag}"
            )
        if not _is_gguf_name(gguf_file):
            raise ConfigError(
                f"{flag} {gguf_file}: not a .gguf file name; give the name of the .gguf file inside the "
                f"--{role}_model folder (for a model directory with config.json, leave {flag} out)"
            )
        if not path.exists():
            if looks_local(model):
                raise ConfigError(f"--{role}_model {model}: no such directory (it should hold {gguf_file})")
            raise ConfigError(
                f"{flag} needs a local folder as --{role}_model, and {model} is not one (a hub id?): download "
                f"{gguf_file} and give its folder as --{role}_model, or its path"
            )
        if not path.is_dir():
            raise ConfigError(f"--{role}_model {model}: not a directory ({flag} names a file inside a folder)")
        path = path / gguf_file
        if not path.is_file():
            found = sorted(p.name for p in path.parent.glob("*.gguf"))
            held = f"it holds {', '.join(found[:4])}{', ...' if len(found) > 4 else ''}" if found else "none there"
            raise ConfigError(f"{flag} {gguf_file}: no such file in {model} ({held})")
    elif not path.is_file():
        raise ConfigError(f"--{role}_model {model}: no such .gguf file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"--{role}_model {path}: the .gguf file is not readable")
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(
            f"--{role}_model {path} is a GGUF checkpoint and reading it needs the gguf package: {GGUF_INSTALL}"
        )
    return str(path.parent), path.name


def model_name(model: str, gguf_file: str | None) -> str:
    """The one name the loaders take for ``--{role}_model`` and ``--{role}_gguf_file``: the model itself,
    or the path of the .gguf file in the folder ``model``."""
    return str(Path(model) / gguf_file) if gguf_file is not None else model


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """All options of a SAR-KD training run."""

    # Models
    teacher_model: str = _f(DEFAULT_TEACHER, "MoE teacher: hub id, local directory, or a local .gguf file.")
    student_model: str = _f(DEFAULT_STUDENT, "Dense student: hub id, local directory, or a local .gguf file.")
    teacher_gguf_file: str | None = _f(
        None,
        "Load the teacher from this .gguf file inside the --teacher_model folder (the same as giving the "
        "file's path as --teacher_model). GGUF weights are dequantised to plain float weights on loading; "
        'needs pip install "sar-kd[gguf]".',
    )
    student_gguf_file: str | None = _f(
        None,
        "Load the student from this .gguf file inside the --student_model folder (the same as giving the "
        "file's path as --student_model); dequantised on loading, and the trained student is written as "
        'safetensors as always. Needs pip install "sar-kd[gguf]".',
    )
    model_dtype: str = _f(
        "float32",
        "Compute precision. float16/bfloat16 keep fp32 master weights for everything trained "
        "(student, routers, projection), store the frozen teacher weights in that dtype and run the "
        "compute under autocast; float16 uses a GradScaler and needs a CUDA GPU.",
        choices=MODEL_DTYPES,
    )
    cpu: bool = _f(False, "Run on the CPU even if a GPU is available.")
    fsdp: bool = _f(
        False,
        "Shard the teacher and the student over the processes with FSDP2 (every decoder layer a unit; "
        "frozen teacher weights sharded, its routers trained inside their units) instead of replicating "
        "both models (DDP). Launch with torchrun or accelerate launch, 2+ processes; also on when "
        "accelerate launch runs with an FSDP config.",
    )
    trust_remote_code: bool = _f(False, "Allow model repositories with custom code.")

    # Data
    dataset_name: str | None = _f(None, "A `datasets` dataset name (e.g. wikitext).")
    dataset_config_name: str | None = _f(None, "The dataset's configuration (e.g. wikitext-103-raw-v1).")
    train_file: str | None = _f(None, "Local training text: .txt (one document per line) or .jsonl.")
    validation_file: str | None = _f(None, "Local validation text: .txt or .jsonl.")
    text_column: str = _f("text", "Column / JSON key holding the text.")
    validation_split_percentage: float = _f(
        5.0, "Without a validation split or file, hold out this percentage of the training blocks."
    )
    block_size: int = _f(1024, "Tokens per training block (text is packed, no padding).")
    max_train_samples: int | None = _f(None, "Cap on training documents (for quick runs).")
    streaming: bool = _f(
        False,
        "Read the data as a `datasets` IterableDataset and pack blocks on the fly (the same blocks), so memory "
        "does not grow with the corpus; hub datasets and local files alike. Validation: the first "
        "--eval_max_batches x --per_device_batch_size blocks of the validation split/file, or else of the "
        "training stream (held out from training). See docs/data.md.",
    )
    shuffle_buffer_size: int = _f(
        1000,
        "--streaming: blocks in the shuffle buffer each block is drawn from (1 keeps the stream's order); "
        "restored exactly on resume.",
    )
    preprocessing_num_workers: int | None = _f(
        None, "Without --streaming: processes tokenising the data (datasets.map; the result is cached)."
    )

    # Optimisation
    train_steps: int = _f(1000, "Number of optimizer updates (not micro-batches).")
    per_device_batch_size: int = _f(1, "Blocks per micro-batch per process.")
    grad_accum_steps: int = _f(8, "Micro-batches accumulated per optimizer update.")
    student_lr: float = _f(1e-4, "AdamW learning rate of the student (and the projection).")
    router_lr: float = _f(5e-4, "AdamW learning rate of the teacher's routers.")
    weight_decay: float = _f(0.0, "AdamW weight decay (student; routers use the L2 anchor instead).")
    max_grad_norm: float = _f(1.0, "Clip the global gradient norm to this (0 disables clipping).")
    use_scheduler: bool = _f(False, "Enable a learning-rate schedule sized in optimizer steps.")
    warmup_steps: int = _f(0, "Warm-up optimizer steps of the schedule.")
    scheduler_type: str = _f("linear", "Schedule after warm-up.", choices=SCHEDULER_TYPES)
    gradient_checkpointing: bool = _f(
        True,
        "Turn off activation checkpointing. It is on by default for the student's and the teacher's "
        "decoder layers (the frozen teacher too, since the router backward needs its activations); "
        "off is faster and keeps every activation in memory.",
    )
    seed: int = _f(42, "Random seed.")

    # Distillation objective
    temperature: float = _f(
        1.0,
        "KD softmax temperature T (loss is scaled by T^2). Default 1, measured on real pretrained weights "
        "(docs/results_real.md): T 1 beat CE only and T 2 on every seed; the spec's T 2 was no better than "
        "CE only.",
    )
    alpha_kd: float | None = _f(
        None,
        "Weight of the distillation term (logit KL; in dual mode the --dual_loss term). Default by mode, measured "
        "on real pretrained weights (docs/results_real.md): 0.9 with one tokenizer, 0.5 with two.",
    )
    alpha_ce: float | None = _f(
        None,
        "Weight of the student's cross-entropy on the labels. Default by mode: 0.1 with one tokenizer, 0.5 with two.",
    )
    kd_chunk_size: int = _f(
        256, "Tokens per chunk of the vocabulary-wide losses; full-sequence logits are never materialised."
    )
    hidden_layer_pairs: str = _f(
        "-1:-1",
        "Dual-tokenizer mode: comma-separated teacher_layer:student_layer hidden-state pairs "
        "(indices into hidden_states, -1 = last).",
    )

    dual_loss: str = _f(
        "logit",
        "Dual-tokenizer mode's distillation term: logit (cross-tokenizer KD: bucketed KL on one-to-one "
        "token chunks, likelihood match on the others; the default, it won the demo), hidden (the spec's "
        "MSE to a learned projection of the teacher's hidden states) or both.",
        choices=DUAL_LOSSES,
    )
    alpha_hidden: float | None = _f(None, "Weight of the hidden-state MSE when --dual_loss both (default: --alpha_kd).")

    # Routers
    router_grad: str = _f(
        "straight_through",
        "How the router gets gradient: straight_through (forward unchanged; every expert is evaluated so "
        "the backward sees the effect of moving routing mass to each expert), straight_through_topk "
        "(cheaper, chosen experts only; a biased gradient, see docs), dense (soft mixture of all experts "
        "while training), native (the model as is; top-1 renormalised routing then gives no gradient).",
        choices=ROUTER_GRAD_MODES,
    )
    router_grad_samples: int = _f(
        -1,
        "straight_through: unchosen experts sampled per token for the router gradient (an unbiased "
        "estimate of the all-experts gradient at (top_k + M)/E of its expert compute; see "
        "docs/router_gradient.md). 0 = every expert; -1 = auto: every expert for teachers of at most 8 "
        "experts, else 8.",
    )
    router_objective: str = _f(
        "joint",
        "What the routers minimise: joint (the spec's: the distillation loss itself, which partly pulls "
        "the teacher toward the student) or lookahead (make the student's distillation step lower its CE "
        "on a quiz batch, to first order; see docs/router_objective.md).",
        choices=("joint", "lookahead"),
    )
    lookahead_quiz: str = _f(
        "next",
        "lookahead: the quiz batch is the training stream's next batch (peeked) or a held-out slice of "
        "the training blocks (--lookahead_holdout_percentage); never the validation split.",
        choices=("next", "holdout"),
    )
    lookahead_holdout_percentage: float = _f(
        5.0, "lookahead with --lookahead_quiz holdout: the percentage of training blocks held out as quiz data."
    )
    lookahead_weight: float = _f(1.0, "lookahead: weight of the router objective L_look (per student token).")
    lookahead_jvp: str = _f(
        "forward",
        "lookahead: how the student's logit direction J·g_q is computed: forward (forward-mode AD, exact; "
        "eager attention for that pass) or finite_difference (two extra student forwards).",
        choices=("forward", "finite_difference"),
    )
    router_kl_weight: float = _f(
        0.0,
        "Trust region: KL(initial router's routing ‖ current routing) on the current hidden states (routers only).",
    )
    router_patterns: list[str] | None = _f(
        None, "Regexes on module names that narrow or override router discovery (validated by shape)."
    )
    router_anchor_weight: float = _f(1e-4, "L2 anchor of the routers to their initial weights.")
    router_entropy_weight: float = _f(1e-4, "Bonus for higher routing entropy.")
    router_load_balance_weight: float = _f(1e-3, "Switch-style load-balance penalty.")
    router_teacher_ce_weight: float = _f(
        0.0,
        "Teacher's own CE on the labels, gradient to the routers only: holds the teacher to the data "
        "while the KD term pulls it toward the student.",
    )

    # Evaluation, logging, saving
    eval_steps: int = _f(200, "Evaluate every N optimizer steps (and at step 0); 0 disables.")
    eval_max_batches: int | None = _f(None, "Batches per evaluation (default: the whole validation split).")
    logging_steps: int = _f(1, "Log metrics every N optimizer steps.")
    save_steps: int = _f(500, "Write OUTPUT/checkpoint-STEP every N optimizer steps; 0 disables.")
    save_total_limit: int | None = _f(None, "Keep only the newest N checkpoints.")
    output_dir: str = _f("outputs/sar_kd", "Where the student, router update and metrics go.")
    overwrite_output_dir: bool = _f(False, "Allow writing into an output directory holding another run.")
    resume_from_checkpoint: str | None = _f(None, "Checkpoint directory to resume from, or 'latest'.")
    report_to: str = _f("none", "Experiment tracker.", choices=REPORT_TO)

    @property
    def effective_batch_size(self) -> int:
        return self.per_device_batch_size * self.grad_accum_steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_list) of a field annotation such as ``int | None`` or ``list[str] | None``."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0]
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], True
    return tp, False


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only where it tells something: not for on/off flags, None, or a help
    text that already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if isinstance(action.default, bool) or action.default is None or "default" in text:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """An unknown or mistyped flag gets one line naming the closest flag, not the whole usage."""

    def error(self, message: str) -> typing.NoReturn:
        import difflib
        import re

        m = re.match(r"unrecognized arguments: (.*)", message)
        if m:
            flags = [s for a in self._actions for s in a.option_strings]
            hints = []
            for arg in m.group(1).split():
                if arg.startswith("-"):
                    name = arg.split("=")[0]
                    close = difflib.get_close_matches("--" + name.lstrip("-").replace("-", "_"), flags, n=1)
                    hints.append(f"{name} (did you mean {close[0]}?)" if close else name)
            if hints:
                message = f"unrecognized arguments: {', '.join(hints)}"
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser(prog: str = "sar-kd train") -> argparse.ArgumentParser:
    """An argparse parser generated from :class:`TrainConfig` (help text = field metadata)."""
    parser = _Parser(
        prog=prog,
        description="Student-aware router knowledge distillation: train a dense student and the MoE teacher's routers.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--config", default=None, help="JSON file of options; command-line flags override it.")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        tp, is_list = _base_type(hints[f.name])
        help_text = f.metadata["help"]
        if tp is bool:
            if f.default:
                parser.add_argument(f"--no_{f.name}", dest=f.name, action="store_false", help=help_text)
            else:
                parser.add_argument(f"--{f.name}", action="store_true", help=help_text)
            continue
        kwargs: dict[str, Any] = {"type": tp, "help": help_text, "default": f.default}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if is_list:
            kwargs["nargs"] = "+"
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser


def _field_kinds() -> dict[str, tuple[Any, bool, bool]]:
    """Field name -> (inner type, is_list, optional) of every :class:`TrainConfig` option."""
    hints = typing.get_type_hints(TrainConfig)
    kinds = {}
    for f in dataclasses.fields(TrainConfig):
        inner, is_list = _base_type(hints[f.name])
        kinds[f.name] = (inner, is_list, type(None) in typing.get_args(hints[f.name]))
    return kinds


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
_PLURAL_WORDS = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}


def _check_file_value(name: str, value: Any) -> tuple[Any, str | None]:
    """(value to use, problem or None) of one ``--config`` entry, checked against the field's type."""
    inner, is_list, optional = _field_kinds()[name]
    if value is None:
        return value, None if optional else f"{name} must not be null"

    def one(v: Any) -> tuple[Any, bool]:
        if inner is bool:
            return v, isinstance(v, bool)
        if inner is int:
            return v, isinstance(v, int) and not isinstance(v, bool)
        if inner is float:  # JSON has one number type: 5 means 5.0
            ok = isinstance(v, int | float) and not isinstance(v, bool)
            return (float(v) if ok else v), ok
        return v, isinstance(v, inner)

    got = json.dumps(value)
    if is_list:
        checked = [one(v) for v in value] if isinstance(value, list) else [(value, False)]
        if not all(ok for _, ok in checked):
            return value, f"{name} must be a list of {_PLURAL_WORDS[inner]} (got {got})"
        value = [v for v, _ in checked]
    else:
        value, ok = one(value)
        if not ok:
            return value, f"{name} must be {_TYPE_WORDS[inner]}{' or null' if optional else ''} (got {got})"
    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(TrainConfig)}[name]
    if choices is not None and value not in choices:
        return value, f"{name} must be one of {', '.join(choices)} (got {got})"
    return value, None


def read_config_file(path: str) -> dict[str, Any]:
    """The options of a ``--config`` JSON file, type-checked; every problem in one :class:`ConfigError`."""
    try:
        file_values = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--config {path}: cannot read JSON ({e}).") from e
    if not isinstance(file_values, dict):
        raise ConfigError(f"--config {path}: expected a JSON object of option: value pairs")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(file_values) - names)
    if unknown:
        raise ConfigError(f"--config {path}: unknown option(s) {', '.join(unknown)}.")
    values, problems = {}, []
    for k, v in file_values.items():
        values[k], problem = _check_file_value(k, v)
        if problem:
            problems.append(problem)
    if problems:
        raise ConfigError(f"--config {path}: " + "; ".join(problems))
    return values


def config_from_args(argv: list[str] | None = None, prog: str = "sar-kd train") -> TrainConfig:
    """Parse the command line (and an optional ``--config`` JSON file) into a validated config.

    Precedence: a flag given on the command line (even one equal to its default) > the file > the default.
    """
    parser = build_parser(prog)
    args = parser.parse_args(argv)  # --help, usage errors and type conversion
    values = {k: v for k, v in vars(args).items() if k != "config"}
    if args.config:
        # A second parse whose defaults are all SUPPRESS holds only the flags actually given, so a flag
        # equal to its default still wins over the file.
        only_given = build_parser(prog)
        for action in only_given._actions:
            action.default = argparse.SUPPRESS
        given = vars(only_given.parse_args(argv))
        values.update(read_config_file(args.config))
        values.update({k: v for k, v in given.items() if k != "config"})
    cfg = TrainConfig(**values)
    validate_config(cfg)
    return cfg


# (alpha_kd, alpha_ce) when not given, by distillation mode: logit KD with one tokenizer, cross-tokenizer
# KD with two. Measured on the real-weights study (docs/results_real.md): with two tokenizers 0.9 / 0.1 was
# no better than CE only and 0.5 / 0.5 beat it on every seed; with one, 0.9 / 0.1 beat 0.5 / 0.5.
MODE_ALPHAS = {"logit": (0.9, 0.1), "dual": (0.5, 0.5)}


def with_mode_alphas(config: dict, mode: str | None) -> dict:
    """``config`` (a :meth:`TrainConfig.to_dict`) with ``alpha_kd`` / ``alpha_ce`` left unset filled with the
    defaults of ``mode`` (``logit`` or ``dual``; the one-tokenizer defaults for an unknown mode)."""
    kd, ce = MODE_ALPHAS.get(mode or "logit", MODE_ALPHAS["logit"])
    out = dict(config)
    out["alpha_kd"] = kd if out.get("alpha_kd") is None else out["alpha_kd"]
    out["alpha_ce"] = ce if out.get("alpha_ce") is None else out["alpha_ce"]
    return out


def resolve_alphas(cfg: TrainConfig, mode: str) -> str | None:
    """Fill ``cfg.alpha_kd`` / ``cfg.alpha_ce`` left unset with the defaults of ``mode``; a log line saying so."""
    missing = [k for k in ("alpha_kd", "alpha_ce") if getattr(cfg, k) is None]
    if not missing:
        return None
    filled = with_mode_alphas({"alpha_kd": cfg.alpha_kd, "alpha_ce": cfg.alpha_ce}, mode)
    for k in missing:
        setattr(cfg, k, filled[k])
    which = "two tokenizers" if mode == "dual" else "one tokenizer"
    return ", ".join(f"{k} {filled[k]:g}" for k in missing) + f" (the default with {which}; docs/results_real.md)"


def temperature_note(cfg: TrainConfig) -> str | None:
    """One line for a run that distils at T >= 2 (the spec's example passes --temperature 2.0): what the
    real-weights study measured there, and where."""
    if (cfg.alpha_kd is not None and cfg.alpha_kd <= 0) or cfg.temperature < 2:
        return None
    return (
        f"--temperature {cfg.temperature:g}: on real pretrained weights KD at T 2 was no better than CE only "
        "(paired over 3 seeds) while T 1, the default, beat both on every seed; see docs/results_real.md"
    )


def dual_alpha_note(cfg: TrainConfig) -> str | None:
    """One line for a cross-tokenizer run with the KD-heavy mix: on the real-weights study it was no
    better than CE only with two tokenizers, and an even mix beat CE only on every seed."""
    if cfg.alpha_kd is None or cfg.alpha_ce is None:  # the two-tokenizer defaults: the measured mix
        return None
    if cfg.alpha_kd <= 0 or cfg.dual_loss == "hidden" or cfg.alpha_kd <= cfg.alpha_ce:
        return None
    return (
        f"two tokenizers with --alpha_kd {cfg.alpha_kd:g} --alpha_ce {cfg.alpha_ce:g}: on real pretrained weights "
        "cross-tokenizer KD at 0.9 / 0.1 was no better than CE only, while 0.5 / 0.5 (at T 1, the two-tokenizer "
        "default) beat CE only on every seed; see docs/results_real.md"
    )


def validate_config(cfg: TrainConfig) -> None:
    """Check every option at once; raise :class:`ConfigError` listing all problems."""
    problems: list[str] = []

    def need(cond: bool, msg: str) -> None:
        if not cond:
            problems.append(msg)

    # inf/NaN pass (or slip past) every comparison below: a number option must be finite first
    for name, (inner, _, _) in _field_kinds().items():
        v = getattr(cfg, name)
        if inner is float and isinstance(v, float) and not math.isfinite(v):
            problems.append(f"--{name} must be a finite number{' > 0' if name == 'temperature' else ''} (got {v})")
    if problems:
        raise ConfigError("; ".join(problems))
    need(
        cfg.block_size >= 2, f"--block_size must be >= 2 (a block needs a token and the next one; got {cfg.block_size})"
    )
    for name in ("train_steps", "per_device_batch_size", "grad_accum_steps", "kd_chunk_size"):
        need(getattr(cfg, name) > 0, f"--{name} must be > 0 (got {getattr(cfg, name)})")
    need(0 <= cfg.seed <= 2**32 - 1, f"--seed must be in [0, {2**32 - 1}] (got {cfg.seed})")
    need(
        cfg.max_train_samples is None or cfg.max_train_samples >= 1,
        f"--max_train_samples must be >= 1 (got {cfg.max_train_samples}); leave it out to use every document",
    )
    out = Path(cfg.output_dir).expanduser()
    for folder in (out, *out.parents):  # the nearest existing one must be a folder, or nothing can be written
        if folder.exists():
            need(
                folder.is_dir(),
                f"--output_dir {cfg.output_dir}: {folder} is a file, not a directory; choose another --output_dir",
            )
            break
    for name in ("student_lr", "router_lr", "weight_decay", "max_grad_norm", "warmup_steps", "eval_steps"):
        need(getattr(cfg, name) >= 0, f"--{name} must be >= 0 (got {getattr(cfg, name)})")
    for name in ("alpha_kd", "alpha_ce"):
        v = getattr(cfg, name)
        need(v is None or v >= 0, f"--{name} must be >= 0 (got {v})")
    for name in (
        "router_anchor_weight",
        "router_entropy_weight",
        "router_load_balance_weight",
        "router_teacher_ce_weight",
    ):
        need(getattr(cfg, name) >= 0, f"--{name} must be >= 0 (got {getattr(cfg, name)})")
    need(cfg.save_steps >= 0, f"--save_steps must be >= 0 (got {cfg.save_steps})")
    need(
        not (cfg.fsdp and cfg.router_objective == "lookahead"),
        "--fsdp does not support --router_objective lookahead (its quiz gradient and forward-mode pass "
        "need whole student weights); use DDP (no --fsdp) or --router_objective joint",
    )
    need(
        not (cfg.fsdp and cfg.model_dtype == "float16"),
        "--fsdp with --model_dtype float16 would need a sharded gradient scaler; use --model_dtype bfloat16",
    )
    need(cfg.logging_steps > 0, f"--logging_steps must be > 0 (got {cfg.logging_steps})")
    need(cfg.temperature > 0, f"--temperature must be a finite number > 0 (got {cfg.temperature})")
    need(
        any(v is None or v > 0 for v in (cfg.alpha_kd, cfg.alpha_ce)),
        "--alpha_kd and --alpha_ce are both 0: the student has nothing to learn",
    )
    need(
        cfg.eval_max_batches is None or cfg.eval_max_batches > 0,
        f"--eval_max_batches must be > 0 (got {cfg.eval_max_batches})",
    )
    need(
        cfg.save_total_limit is None or cfg.save_total_limit > 0,
        f"--save_total_limit must be > 0 (got {cfg.save_total_limit})",
    )
    need(
        0 <= cfg.validation_split_percentage < 100,
        f"--validation_split_percentage must be in [0, 100) (got {cfg.validation_split_percentage})",
    )
    need(cfg.router_grad in ROUTER_GRAD_MODES, f"--router_grad must be one of {ROUTER_GRAD_MODES}")
    need(cfg.router_grad_samples >= -1, f"--router_grad_samples must be >= -1 (got {cfg.router_grad_samples})")
    need(
        cfg.router_grad_samples <= 0 or cfg.router_grad == "straight_through",
        f"--router_grad_samples {cfg.router_grad_samples} needs --router_grad straight_through",
    )
    need(cfg.dual_loss in DUAL_LOSSES, f"--dual_loss must be one of {DUAL_LOSSES}")
    need(cfg.shuffle_buffer_size >= 1, f"--shuffle_buffer_size must be >= 1 (got {cfg.shuffle_buffer_size})")
    need(
        cfg.preprocessing_num_workers is None or cfg.preprocessing_num_workers >= 1,
        f"--preprocessing_num_workers must be >= 1 (got {cfg.preprocessing_num_workers})",
    )
    if cfg.streaming:
        need(
            cfg.preprocessing_num_workers is None,
            "--preprocessing_num_workers applies without --streaming (streamed text is tokenised as it is read)",
        )
        need(
            not cfg.eval_steps or cfg.eval_max_batches is not None,
            "--streaming needs --eval_max_batches when evaluating (validation reads that many batches, never the "
            "whole split)",
        )
        need(
            cfg.validation_split_percentage == TrainConfig.__dataclass_fields__["validation_split_percentage"].default,
            "--validation_split_percentage needs the corpus size, which --streaming does not read: without a "
            "validation split the first --eval_max_batches x --per_device_batch_size blocks are held out",
        )
        need(
            not (cfg.router_objective == "lookahead" and cfg.lookahead_quiz == "holdout"),
            "--lookahead_quiz holdout is not supported with --streaming (it holds out a percentage of the "
            "corpus); use --lookahead_quiz next",
        )
    for name in ("lookahead_weight", "router_kl_weight"):
        need(getattr(cfg, name) >= 0, f"--{name} must be >= 0 (got {getattr(cfg, name)})")
    need(
        0 < cfg.lookahead_holdout_percentage < 100,
        f"--lookahead_holdout_percentage must be in (0, 100) (got {cfg.lookahead_holdout_percentage})",
    )
    need(
        not (cfg.router_objective == "lookahead" and cfg.alpha_kd == 0),
        "--router_objective lookahead needs --alpha_kd > 0 (it shapes the distillation step)",
    )

    need(cfg.alpha_hidden is None or cfg.alpha_hidden >= 0, f"--alpha_hidden must be >= 0 (got {cfg.alpha_hidden})")
    need(cfg.model_dtype in MODEL_DTYPES, f"--model_dtype must be one of {MODEL_DTYPES}")
    need(cfg.scheduler_type in SCHEDULER_TYPES, f"--scheduler_type must be one of {SCHEDULER_TYPES}")
    need(cfg.report_to in REPORT_TO, f"--report_to must be one of {REPORT_TO}")
    need(
        not (cfg.warmup_steps and not cfg.use_scheduler),
        "--warmup_steps needs --use_scheduler (without it the learning rate is constant)",
    )
    need(
        cfg.use_scheduler is False or cfg.warmup_steps <= cfg.train_steps,
        f"--warmup_steps ({cfg.warmup_steps}) exceeds --train_steps ({cfg.train_steps})",
    )

    # a flag that cannot act is refused, naming the flag it needs (it would otherwise be silently ignored)
    def given(name: str) -> bool:
        return getattr(cfg, name) != TrainConfig.__dataclass_fields__[name].default

    need(
        cfg.use_scheduler or not given("scheduler_type"),
        f"--scheduler_type {cfg.scheduler_type} needs --use_scheduler (without it the learning rate is constant)",
    )
    need(
        cfg.streaming or not given("shuffle_buffer_size"),
        f"--shuffle_buffer_size {cfg.shuffle_buffer_size} needs --streaming (without it every epoch is a full "
        "shuffle of the blocks)",
    )
    for name in ("lookahead_quiz", "lookahead_holdout_percentage", "lookahead_weight", "lookahead_jvp"):
        need(
            cfg.router_objective == "lookahead" or not given(name),
            f"--{name} {getattr(cfg, name)} needs --router_objective lookahead",
        )
    need(
        cfg.router_objective != "lookahead"
        or cfg.lookahead_quiz == "holdout"
        or not given("lookahead_holdout_percentage"),
        f"--lookahead_holdout_percentage {cfg.lookahead_holdout_percentage} needs --lookahead_quiz holdout",
    )
    need(
        cfg.save_total_limit is None or cfg.save_steps > 0,
        f"--save_total_limit {cfg.save_total_limit} needs --save_steps > 0 (no checkpoint is written)",
    )
    if not cfg.streaming:  # (--streaming refuses the percentage itself)
        need(
            cfg.validation_file is None or not given("validation_split_percentage"),
            f"--validation_split_percentage {cfg.validation_split_percentage} applies without --validation_file "
            "(the validation file is the validation data)",
        )
        need(
            not (
                cfg.validation_split_percentage == 0 and cfg.eval_steps and cfg.train_file and not cfg.validation_file
            ),
            "--validation_split_percentage 0 holds out no validation blocks and there is no --validation_file: "
            "give --validation_file, a percentage > 0, or --eval_steps 0",
        )
    has_hub = cfg.dataset_name is not None
    has_files = cfg.train_file is not None
    need(has_hub or has_files, "no training data: give --dataset_name or --train_file")
    need(not (has_hub and has_files), "give either --dataset_name or --train_file, not both")
    need(
        cfg.dataset_config_name is None or has_hub,
        "--dataset_config_name needs --dataset_name",
    )
    need(
        cfg.validation_file is None or not has_hub,
        "--validation_file goes with --train_file; with --dataset_name the dataset's own validation split "
        "is used (or --validation_split_percentage of the training blocks)",
    )
    for name in ("train_file", "validation_file"):
        path = getattr(cfg, name)
        if path is not None:
            p = Path(path)
            need(p.is_file(), f"--{name} {path}: no such file")
            need(p.suffix in (".txt", ".jsonl", ".json"), f"--{name} {path}: must be .txt or .jsonl")
    for role in ("teacher", "student"):
        try:
            gguf_source(getattr(cfg, f"{role}_model"), getattr(cfg, f"{role}_gguf_file"), role)
        except ConfigError as e:
            problems.append(str(e))
    try:
        parse_layer_pairs(cfg.hidden_layer_pairs)
    except ConfigError as e:
        problems.append(str(e))
    if cfg.router_patterns is not None:
        import re

        for pat in cfg.router_patterns:
            try:
                re.compile(pat)
            except re.error as e:
                problems.append(f"--router_patterns {pat!r} is not a valid regex ({e})")
    if problems:
        raise ConfigError("; ".join(problems))


def parse_layer_pairs(spec: str) -> list[tuple[int, int]]:
    """Parse ``"-1:-1,6:4"`` into ``[(-1, -1), (6, 4)]`` (teacher layer, student layer)."""
    pairs = []
    for part in spec.split(","):
        try:
            t, s = part.split(":")
            pairs.append((int(t), int(s)))
        except ValueError:
            raise ConfigError(
                f"--hidden_layer_pairs {spec!r}: expected teacher:student integer pairs like '-1:-1,6:4'"
            ) from None
    return pairs
