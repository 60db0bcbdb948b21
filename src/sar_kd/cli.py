"""The ``sar-kd`` command: ``train`` and ``apply-router``."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from .config import ConfigError, config_from_args, gguf_source, model_name

logger = logging.getLogger("sar_kd")


def _setup_logging() -> None:
    import os

    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("transformers", "datasets", "accelerate", "httpx", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    hub_logging.get_logger(), hf_logging.get_logger()  # make each library add its own stderr handler now
    # huggingface_hub's handler also propagates to the root handler above, so each of its warnings
    # printed twice; drop the libraries' handlers and let everything go through the root one.
    for lib in ("transformers", "huggingface_hub"):
        logging.getLogger(lib).handlers.clear()
        logging.getLogger(lib).propagate = True
    hf_logging.disable_progress_bar()  # per-file loading/saving bars drown the training log


def train_main(argv: list[str] | None = None, prog: str = "sar-kd train") -> int:
    """Parse flags and run one training job; returns the exit code."""
    from .trainer import Trainer

    cfg = config_from_args(argv, prog=prog)
    Trainer(cfg).run()
    return 0


def apply_router_main(argv: list[str] | None = None) -> int:
    """Write the adapted teacher: the original with the routers from ``router_update.safetensors``
    (or a ``router_update.pt`` of an older version, read with ``weights_only=True``)."""
    import json

    from .loading import load_model, load_tokenizer
    from .routers import apply_router_update, load_router_update

    p = argparse.ArgumentParser(prog="sar-kd apply-router", description=apply_router_main.__doc__)
    p.add_argument(
        "--teacher_model", required=True, help="The original teacher (hub id, local directory or .gguf file)."
    )
    p.add_argument(
        "--teacher_gguf_file",
        default=None,
        help="The teacher's .gguf file inside the --teacher_model folder (as for training). A GGUF teacher is "
        "dequantised and written as safetensors.",
    )
    p.add_argument(
        "--router_update",
        required=True,
        help="router_update.safetensors written by sar-kd train (or router_update.pt of an older version).",
    )
    p.add_argument("--output_dir", required=True, help="Where the adapted teacher is written.")
    p.add_argument(
        "--router_patterns",
        nargs="+",
        default=None,
        help="Same as used for training, if any (default: those in the update's metadata).",
    )
    p.add_argument("--overwrite_output_dir", action="store_true", help="Replace an existing output directory.")
    p.add_argument("--trust_remote_code", action="store_true", help="Allow custom model code.")
    a = p.parse_args(argv)
    gguf_source(a.teacher_model, a.teacher_gguf_file, "teacher")  # a bad GGUF name fails before anything loads
    out = Path(a.output_dir)
    if out.exists() and any(out.iterdir()) and not a.overwrite_output_dir:
        raise ConfigError(f"--output_dir {out} is not empty: pass --overwrite_output_dir or choose another")
    upd_path = Path(a.router_update)
    if not upd_path.is_file():
        raise ConfigError(f"--router_update {upd_path}: no such file")
    update, meta = load_router_update(upd_path)
    if a.router_patterns is None and meta.get("router_patterns"):
        a.router_patterns = json.loads(meta["router_patterns"])  # the patterns the routers were found with
    trained_on = meta.get("teacher_model")
    if trained_on is not None and trained_on != model_name(a.teacher_model, a.teacher_gguf_file):
        logger.warning(
            "the router update was trained on teacher %s (sar-kd %s); applying it to %s",
            trained_on,
            meta.get("sar_kd_version", "?"),
            a.teacher_model,
        )
    teacher = load_model(a.teacher_model, "teacher", "auto", a.trust_remote_code, gguf_file=a.teacher_gguf_file)
    n = apply_router_update(teacher, update, a.router_patterns)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    teacher.save_pretrained(tmp)
    try:
        tok = load_tokenizer(a.teacher_model, "teacher", a.trust_remote_code, gguf_file=a.teacher_gguf_file)
        tok.save_pretrained(tmp)
    except ConfigError:
        logger.warning("teacher has no loadable tokenizer; writing the model only")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    logger.info("wrote adapted teacher (%d router tensors replaced) to %s", n, out)
    return 0


def _lazy(module: str, func: str):
    """A subcommand implemented in ``sar_kd.<module>``, imported only when it runs."""

    def run(argv: list[str] | None = None) -> int:
        import importlib

        return getattr(importlib.import_module(f"sar_kd.{module}"), func)(argv)

    return run


COMMANDS = {
    "demo": ("Offline demo: CE only vs KD vs SAR-KD on small models and a bundled corpus.", _lazy("demo", "demo_main")),
    "train": ("Train a student and the teacher's routers (same flags as train_sar_kd.py).", train_main),
    "apply-router": ("Write the teacher with trained routers applied.", apply_router_main),
    "plot": ("Render a run's training curves and router statistics to a PNG.", _lazy("plot", "plot_main")),
    "compare": (
        "Run arms x seeds through the trainer; paired verdicts against a baseline arm.",
        _lazy("compare", "compare_main"),
    ),
    "estimate": (
        "Estimate a run's memory from the model configs, with a verdict for a GPU size.",
        _lazy("estimate", "estimate_main"),
    ),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = ["usage: sar-kd COMMAND [options]", "", "commands:"]
        lines += [f"  {name:14s}{desc}" for name, (desc, _) in COMMANDS.items()]
        lines += ["", "Each command has its own options: sar-kd COMMAND --help (e.g. sar-kd train --help)."]
        print("\n".join(lines), file=sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"sar-kd: error: unknown command {argv[0]!r}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    _setup_logging()
    name, rest = argv[0], argv[1:]
    try:
        return COMMANDS[name][1](rest)
    except ConfigError as e:
        print(f"sar-kd {name}: error: {e}", file=sys.stderr)
        return 2


def train_script() -> int:
    """Entry of ``train_sar_kd.py`` (the spec's command)."""
    _setup_logging()
    try:
        return train_main(sys.argv[1:], prog="train_sar_kd.py")
    except ConfigError as e:
        print(f"train_sar_kd.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
