"""The output directory and its checkpoints: written atomically, pruned, resumed, never stale.

A fresh run (not a resume) replaces the previous run's files in ``--output_dir``; a resume checks
that the checkpoint was written by a run that sees the same data in the same order and trains the
same parameters, so the restored data position and weights mean what they meant.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .config import ConfigError, TrainConfig, with_mode_alphas

logger = logging.getLogger("sar_kd")

RUN_CONFIG = "sar_kd_config.json"
TRAINER_STATE = "trainer_state.json"
METRICS = "metrics.jsonl"
# What a run writes at the top of OUTPUT (besides checkpoint-N/): removed when a fresh run replaces it.
RUN_OUTPUTS = (
    RUN_CONFIG,
    METRICS,
    "summary.json",
    "router_update.safetensors",
    "router_update.pt",
    "projection.pt",
    "student",
)

# Options that decide which blocks a step sees (and in which order) or what the trained parameters
# are. A checkpoint written with other values cannot be continued: its data position, optimizer state
# and weights would silently mean something else. Everything else (train_steps, eval_steps,
# save_steps, learning rates, ...) may change between a run and its resume.
RESUME_KEYS = (
    "teacher_model",
    "student_model",
    "teacher_gguf_file",
    "student_gguf_file",
    "dataset_name",
    "dataset_config_name",
    "train_file",
    "validation_file",
    "text_column",
    "block_size",
    "per_device_batch_size",
    "grad_accum_steps",
    "seed",
    "max_train_samples",
    "validation_split_percentage",
    "hidden_layer_pairs",
    "router_patterns",
)
_PATH_KEYS = ("teacher_model", "student_model", "train_file", "validation_file")


def versions() -> dict[str, str]:
    """Versions of the packages that wrote a run's files."""
    import accelerate
    import transformers

    return {
        "sar_kd": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "python": sys.version.split()[0],
    }


def write_run_config(where: Path, cfg: TrainConfig, mode: str) -> None:
    """``where/sar_kd_config.json``: the resolved config, the distillation mode, the versions, and the
    absolute form of each local path (so a resume from another working directory is recognised)."""
    paths = {k: str(Path(v).expanduser().resolve()) for k in _PATH_KEYS if (v := getattr(cfg, k)) and Path(v).exists()}
    record = {"config": cfg.to_dict(), "mode": mode, "resolved_paths": paths, "versions": versions()}
    (where / RUN_CONFIG).write_text(json.dumps(record, indent=2))


def check_output_dir(cfg: TrainConfig) -> None:
    """Refuse an output directory holding another run unless overwriting or resuming (nothing is written)."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output_dir {out} exists and is not a directory")
    resuming_here = cfg.resume_from_checkpoint and (
        cfg.resume_from_checkpoint == "latest" or _inside(Path(cfg.resume_from_checkpoint), out)
    )
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite_output_dir and not resuming_here:
        prev = out / RUN_CONFIG
        if prev.is_file():
            try:
                old = json.loads(prev.read_text())["config"]
            except (OSError, ValueError, KeyError):
                old = None
            same = old is not None and all(
                old.get(k) == v for k, v in cfg.to_dict().items() if k not in ("overwrite_output_dir",)
            )
            if same and not list_checkpoints(out) and not cfg.resume_from_checkpoint:
                return  # the same run again, nothing to continue from: it starts afresh
            if same and not cfg.resume_from_checkpoint:
                raise ConfigError(
                    f"--output_dir {out} holds checkpoints of this run: pass --resume_from_checkpoint latest "
                    "to continue it or --overwrite_output_dir to start over"
                )
        raise ConfigError(
            f"--output_dir {out} already holds a different run: pass --overwrite_output_dir, "
            "--resume_from_checkpoint latest, or another --output_dir"
        )
    if cfg.overwrite_output_dir and out.is_dir():
        for k in _PATH_KEYS:  # never clear a directory that holds the run's own models or data
            v = getattr(cfg, k)
            if v and Path(v).exists() and _inside(Path(v), out):
                raise ConfigError(f"--output_dir {out} contains --{k} {v}: choose another --output_dir")


def _inside(path: Path, folder: Path) -> bool:
    """True when ``path`` is ``folder`` or inside it (resolved)."""
    try:
        path.expanduser().resolve().relative_to(folder.expanduser().resolve())
        return True
    except ValueError:
        return False


def clear_previous_run(out: Path) -> list[Path]:
    """Remove a previous run's files from ``out`` (checkpoints, ``*.tmp``, outputs, metrics, summary).

    Called on the main process when a fresh run starts writing, so no checkpoint of the old run can be
    resumed with ``latest`` and none outlives the new run's under ``--save_total_limit``. Files a run
    does not write are left alone. Returns what was removed."""
    if not out.is_dir() or not (out / RUN_CONFIG).is_file():  # not a SAR-KD run's folder: leave it alone
        return []
    doomed = [p for p in out.glob("checkpoint-*") if _checkpoint_step(p) is not None]
    doomed += [out / name for name in RUN_OUTPUTS if (out / name).exists()]
    for p in doomed:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return doomed


def _checkpoint_step(p: Path) -> int | None:
    """N of ``checkpoint-N`` or ``checkpoint-N.tmp``; None for other names."""
    suffix = p.name.split("-", 1)[1] if "-" in p.name else ""
    suffix = suffix.removesuffix(".tmp")
    return int(suffix) if p.name.startswith("checkpoint-") and suffix.isdigit() else None


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints in ``out``, oldest first."""
    found = []
    for p in out.glob("checkpoint-*"):
        suffix = p.name.split("-", 1)[1]
        if p.is_dir() and suffix.isdigit() and (p / TRAINER_STATE).is_file():
            found.append((int(suffix), p))
    return [p for _, p in sorted(found)]


def resolve_checkpoint(output_dir: str, where: str) -> Path:
    """The checkpoint directory ``--resume_from_checkpoint`` names ('latest' or a path)."""
    if where == "latest":
        cps = list_checkpoints(Path(output_dir))
        if not cps:
            raise ConfigError(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}")
        return cps[-1]
    p = Path(where)
    if not (p / TRAINER_STATE).is_file():
        raise ConfigError(f"--resume_from_checkpoint {where}: not a SAR-KD checkpoint directory")
    return p


def _same(key: str, old: Any, new: Any, old_resolved: str | None = None) -> bool:
    if old == new:
        return True
    # the same local file or directory, named differently (relative vs absolute, another cwd)
    if key in _PATH_KEYS and isinstance(old, str) and isinstance(new, str):
        try:
            old_path = old_resolved or old
            return Path(old_path).exists() and Path(new).exists() and os.path.samefile(old_path, new)
        except OSError:
            return False
    return False


def resume_mismatches(path: Path, cfg: TrainConfig, num_processes: int) -> list[str]:
    """``key old -> new`` for each data- or model-affecting option that differs from the checkpoint's."""
    try:
        record = json.loads((path / RUN_CONFIG).read_text())
        old, resolved = record["config"], record.get("resolved_paths", {})
        state = json.loads((path / TRAINER_STATE).read_text())
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"--resume_from_checkpoint {path}: cannot read its saved config ({e})") from e
    new = with_mode_alphas(cfg.to_dict(), record.get("mode"))  # unset weights: the saved run's mode's defaults
    diffs = [
        f"{k} {json.dumps(old.get(k))} -> {json.dumps(new[k])}"
        for k in RESUME_KEYS
        if not _same(k, old.get(k), new[k], resolved.get(k))
    ]
    # which parameters train (and so are in the checkpoint) must not change either
    for k, trains in (
        ("router_lr", lambda c: c.get("router_lr", 0) > 0),
        ("alpha_kd", lambda c: c.get("alpha_kd", 0) > 0),
    ):
        if trains(old) != trains(new):
            diffs.append(f"{k} {json.dumps(old.get(k))} -> {json.dumps(new[k])} (changes what is trained)")
    for k in ("dual_loss", "router_objective"):  # what the checkpoint holds (projection) and the data split
        if k in old and old[k] != new[k]:
            diffs.append(f"{k} {json.dumps(old[k])} -> {json.dumps(new[k])}")

    def holdout(c: dict) -> float | None:
        lookahead = c.get("router_objective") == "lookahead" and c.get("lookahead_quiz") == "holdout"
        return c.get("lookahead_holdout_percentage") if lookahead else None

    # --streaming (absent in older checkpoints: off) and its shuffle buffer decide the block order; the
    # streamed validation hold-out is checked against the saved stream state when it is restored
    if bool(old.get("streaming")) != bool(new["streaming"]):
        diffs.append(f"streaming {json.dumps(bool(old.get('streaming')))} -> {json.dumps(new['streaming'])}")
    elif new["streaming"] and old.get("shuffle_buffer_size") != new["shuffle_buffer_size"]:
        diffs.append(
            f"shuffle_buffer_size {json.dumps(old.get('shuffle_buffer_size'))} -> {new['shuffle_buffer_size']}"
        )
    if bool(old.get("fsdp")) != bool(new["fsdp"]):  # the training state is stored differently
        diffs.append(f"fsdp {json.dumps(bool(old.get('fsdp')))} -> {json.dumps(new['fsdp'])}")
    if holdout(old) != holdout(new):  # the quiz split changes which blocks the data position counts
        diffs.append(f"lookahead holdout split {holdout(old)} -> {holdout(new)}")
    saved_world = state.get("num_processes")  # absent in checkpoints of older versions
    if saved_world is not None and saved_world != num_processes:
        diffs.append(f"processes {saved_world} -> {num_processes}")
    return diffs


def resume_point(cfg: TrainConfig, num_processes: int) -> Path:
    """The checkpoint to resume from, after checking it was written by a compatible run."""
    path = resolve_checkpoint(cfg.output_dir, cfg.resume_from_checkpoint)
    diffs = resume_mismatches(path, cfg, num_processes)
    if diffs:
        raise ConfigError(
            f"--resume_from_checkpoint {path}: written by a run with other data or model settings "
            f"({', '.join(diffs)}); resume with the same values or start a new run"
        )
    return path


def save_checkpoint(
    accelerator,
    output_dir: str,
    step: int,
    state: dict[str, Any],
    write_files: Callable[[Path], None],
    save_total_limit: int | None,
    save_state: Callable[[Path], None] | None = None,
) -> Path:
    """OUTPUT/checkpoint-STEP, written to ``checkpoint-STEP.tmp`` and renamed (so a run killed mid-save
    leaves the previous checkpoint intact).

    Holds accelerate's training state (``state/``: trainable weights, optimizer, scheduler, scaler,
    RNG; or what ``save_state(dir)`` writes there, for a sharded run), whatever ``write_files(dir)``
    writes (the outputs and run config; called on every process) and ``trainer_state.json`` (``state``
    plus ``step`` and the number of processes). Collective: every process calls it."""
    is_main = accelerator.is_main_process
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = final.with_name(final.name + ".tmp")
    if is_main and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    if save_state is None:
        accelerator.save_state(str(tmp / "state"))
    else:
        save_state(tmp / "state")
    write_files(tmp)
    if is_main:
        full = {"step": step, **state, "num_processes": accelerator.num_processes}
        (tmp / TRAINER_STATE).write_text(json.dumps(full))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune_checkpoints(Path(output_dir), save_total_limit)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(out: Path, limit: int | None) -> None:
    """Keep only the newest ``limit`` checkpoints (all of them when None)."""
    if limit is None:
        return
    for old in list_checkpoints(out)[:-limit]:
        shutil.rmtree(old)


def load_checkpoint(accelerator, path: Path, load_state: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Restore accelerate's training state from ``path`` (or ``load_state(path / "state")`` for a
    sharded run); return its ``trainer_state.json``."""
    if load_state is None:
        accelerator.load_state(str(path / "state"))
    else:
        load_state(path / "state")
    return json.loads((path / TRAINER_STATE).read_text())


def drop_later(out: Path, step: int) -> list[dict[str, Any]]:
    """After resuming at ``step``: drop what the abandoned part of the run left after it.

    Metrics logged after the checkpoint are removed (so the resumed log reads as one run) and so are
    checkpoints of later steps (so ``latest`` and ``--save_total_limit`` see only this run's). Returns
    the kept metric rows. Main process only."""
    for p in out.glob("checkpoint-*"):
        n = _checkpoint_step(p)
        if n is not None and n > step:
            shutil.rmtree(p)
    metrics = out / METRICS
    if not metrics.exists():
        return []
    kept = [ln for ln in metrics.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    metrics.write_text("".join(ln + "\n" for ln in kept))
    return [json.loads(ln) for ln in kept]


def keep_trainable_only(accelerator, model: torch.nn.Module) -> None:
    """Make accelerate's checkpoints hold only ``model``'s trainable parameters.

    The frozen teacher is the user's own download: saving it in every checkpoint would cost its full
    size each time. Loading checks that the checkpoint holds exactly this run's trainable set."""

    def trainable() -> set[str]:
        return {n for n, p in model.named_parameters() if p.requires_grad}

    def save_hook(models, weights, output_dir) -> None:
        keep = trainable()
        for w in weights:
            for k in [k for k in w if k not in keep]:
                del w[k]

    def load_hook(models, input_dir) -> None:
        from safetensors.torch import load_file

        state = load_file(str(Path(input_dir) / "model.safetensors"))
        names = trainable()
        unexpected, missing = set(state) - names, names - set(state)
        if unexpected or missing:
            raise ConfigError(
                f"checkpoint {input_dir} does not match this run's trainable parameters "
                f"({len(missing)} missing, {len(unexpected)} unexpected): same models and flags are needed to resume"
            )
        model.load_state_dict(state, strict=False)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
