"""The SAR-KD training run: setup -> train -> save, read top to bottom."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from . import checkpointing, data, routers
from .bpb import token_byte_lengths
from .config import (
    ConfigError,
    TrainConfig,
    dual_alpha_note,
    model_name,
    parse_layer_pairs,
    resolve_alphas,
    temperature_note,
    validate_config,
)
from .evaluation import model_inputs
from .heads import OutputHead, check_head
from .loading import (
    DTYPES,
    check_student,
    enable_checkpointing,
    load_config,
    load_model,
    load_tokenizer,
    max_positions,
    set_frozen_teacher_mode,
)
from .objective import ObjectiveWeights, SARKDModel, make_projection
from .reporting import Progress, dual_metrics, format_eval, format_summary, mean

logger = logging.getLogger("sar_kd")

MAX_CONSECUTIVE_SKIPS = 25


class Trainer:
    """One SAR-KD run. ``Trainer(cfg).run()`` does everything; the pieces are usable on their own."""

    def __init__(self, cfg: TrainConfig, teacher=None, student=None) -> None:
        """``teacher``/``student``: already-built models to use instead of loading ``cfg.*_model``
        (the tokenizers are still loaded from those paths)."""
        self.cfg = cfg
        self._given_models = (teacher, student)
        self.metrics_path = Path(cfg.output_dir) / checkpointing.METRICS
        self.step = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.history: list[dict[str, Any]] = []
        # the evaluation before any training (step 0): the summary's initial_* numbers; carried in every
        # checkpoint, so a resume (into this output directory or another) reports the run's own
        self.initial_eval: dict[str, Any] | None = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        checkpointing.check_output_dir(cfg)
        self._setup_accelerator()
        # checked before any model is loaded: a checkpoint of another configuration is refused at once
        resume_from = (
            checkpointing.resume_point(cfg, self.accelerator.num_processes) if cfg.resume_from_checkpoint else None
        )
        self._setup_tokenizers_and_mode()
        self._setup_models()
        self._setup_data()
        self._setup_optimizer()
        if resume_from is not None:
            self._resume(resume_from)

    def _setup_accelerator(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        cfg = self.cfg
        use_cuda = torch.cuda.is_available() and not cfg.cpu
        if cfg.model_dtype == "float16" and not use_cuda:
            raise ConfigError(
                "--model_dtype float16 needs a CUDA GPU (fp16 autocast with a GradScaler does not run on the CPU); "
                "use --model_dtype bfloat16 or float32 on the CPU"
            )
        if cfg.model_dtype == "bfloat16" and use_cuda and not torch.cuda.is_bf16_supported():
            raise ConfigError("--model_dtype bfloat16 is not supported by this GPU; use --model_dtype float16")
        if not cfg.fsdp and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
            cfg.fsdp = True  # accelerate launch with an FSDP config: shard with FSDP2 (our own units)
            validate_config(cfg)  # what --fsdp cannot do is refused here too
        mp = {"float32": "no", "float16": "fp16", "bfloat16": "bf16"}[cfg.model_dtype]
        log_with = None
        if cfg.report_to != "none":
            import importlib.util

            if importlib.util.find_spec(cfg.report_to) is None:
                raise ConfigError(
                    f"--report_to {cfg.report_to}: the package is not installed (pip install {cfg.report_to})"
                )
            log_with = cfg.report_to
        from accelerate.state import AcceleratorState

        # Several runs in one process (the demo, the tests) may use different precisions: accelerate
        # keeps a process-wide singleton, so reset it (the distributed PartialState is kept).
        AcceleratorState._reset_state(reset_partial_state=False)
        self.accelerator = Accelerator(
            mixed_precision=mp, cpu=cfg.cpu or not use_cuda, log_with=log_with, project_dir=cfg.output_dir
        )
        self.is_main = self.accelerator.is_main_process
        if cfg.fsdp and self.accelerator.num_processes < 2:
            raise ConfigError(
                "--fsdp shards the models over processes but this run has one: launch with "
                "torchrun --nproc_per_node N or accelerate launch --num_processes N (N >= 2), or drop --fsdp"
            )
        set_seed(cfg.seed)

    def _setup_tokenizers_and_mode(self) -> None:
        cfg = self.cfg
        # a GGUF model given as a folder and --*_gguf_file is loaded by the path of its .gguf file
        self.teacher_name = model_name(cfg.teacher_model, cfg.teacher_gguf_file)
        self.student_name = model_name(cfg.student_model, cfg.student_gguf_file)
        self.teacher_tok = load_tokenizer(self.teacher_name, "teacher", cfg.trust_remote_code)
        self.student_tok = load_tokenizer(self.student_name, "student", cfg.trust_remote_code)
        self.byte_tables = {
            "student": token_byte_lengths(self.student_tok),
            "teacher": token_byte_lengths(self.teacher_tok),
        }
        from .tokenizers import compare_tokenizers

        same, why = compare_tokenizers(self.teacher_tok, self.student_tok)
        self.mode = "logit" if same else "dual"
        filled = resolve_alphas(cfg, self.mode)
        if filled:
            self._log(filled)
        self._log(
            f"tokenizers {'compatible' if same else 'differ'} ({why}): "
            + (
                "logit distillation (KL on logits)"
                if same
                else f"dual-tokenizer distillation (--dual_loss {cfg.dual_loss})"
            )
        )
        if self.mode == "dual":
            for role, tok in (("teacher", self.teacher_tok), ("student", self.student_tok)):
                if not getattr(tok, "is_fast", False):
                    raise ConfigError(
                        f"the tokenizers differ and the {role} tokenizer is a slow (Python) tokenizer without "
                        "offset mappings; dual-tokenizer mode needs fast tokenizers (tokenizer.json)"
                    )

    def _setup_models(self) -> None:
        cfg = self.cfg
        teacher, student = self._given_models
        t_conf = (
            teacher.config if teacher is not None else load_config(self.teacher_name, "teacher", cfg.trust_remote_code)
        )
        s_conf = (
            student.config if student is not None else load_config(self.student_name, "student", cfg.trust_remote_code)
        )
        routers.moe_dims(t_conf)  # fail fast on a dense teacher, before loading weights
        check_student(s_conf, self.student_name, self.teacher_name)  # dense, and not the teacher
        for role, conf in (("teacher", t_conf), ("student", s_conf)):
            limit = max_positions(conf)
            if limit is not None and cfg.block_size > limit:
                raise ConfigError(
                    f"--block_size {cfg.block_size} exceeds the {role}'s maximum positions ({limit}); lower --block_size"
                )
        compute_dtype = DTYPES[cfg.model_dtype]
        if teacher is None:
            teacher = load_model(self.teacher_name, "teacher", compute_dtype, cfg.trust_remote_code)
        if student is None:
            student = load_model(self.student_name, "student", torch.float32, cfg.trust_remote_code)
        # the models' own output functions (logit scaling, soft-capping), over the tokenizers' real ids,
        # checked against model(...).logits before any hook or fp32 master weight changes the teacher
        s_head = OutputHead(student, len(self.student_tok))
        t_head = OutputHead(teacher, len(self.teacher_tok))
        check_head(student, s_head, "student")
        check_head(teacher, t_head, "teacher")
        found = routers.find_routers(teacher, cfg.router_patterns)
        self._log("teacher routers:\n" + routers.router_table(found))
        r_params = routers.freeze_all_but_routers(teacher, found)
        # Routers train only with a learning rate and a teacher pass to learn from (a CE-only run has none).
        train_router = cfg.router_lr > 0 and (cfg.alpha_kd > 0 or cfg.router_teacher_ce_weight > 0)
        if not train_router:  # frozen: native, no-grad teacher forward, nothing for DDP to synchronise
            for p in r_params.values():
                p.requires_grad_(False)
        # (a frozen router, --router_lr 0, needs no gradient: no warning then)
        if cfg.router_grad == "native" and cfg.router_lr > 0 and routers.routing_gives_no_gradient(teacher.config):
            logger.warning(
                "!!! --router_grad native with top-1 renormalised routing: the routing weight is exactly 1.0, "
                "so the routers receive NO gradient from the distillation loss (only from the regularisers). "
                "Use --router_grad straight_through (default) or dense. !!!"
            )
        controller = routers.RouterController(
            found, cfg.router_grad if train_router else "native", samples=cfg.router_grad_samples
        )
        if cfg.gradient_checkpointing:
            for role, model in (("student", student), ("teacher", teacher)):
                if not enable_checkpointing(model):
                    self._log(
                        f"{type(model).__name__} ({role}) does not support activation checkpointing: the {role} "
                        "runs without it (every activation kept)"
                    )
        student.train()
        set_frozen_teacher_mode(teacher)
        weights = ObjectiveWeights(
            temperature=cfg.temperature,
            alpha_kd=cfg.alpha_kd,
            alpha_ce=cfg.alpha_ce,
            router_anchor_weight=cfg.router_anchor_weight,
            router_entropy_weight=cfg.router_entropy_weight,
            router_load_balance_weight=cfg.router_load_balance_weight,
            router_teacher_ce_weight=cfg.router_teacher_ce_weight,
            kd_chunk_size=cfg.kd_chunk_size,
            train_router=train_router,
            dual_loss=cfg.dual_loss,
            alpha_hidden=cfg.alpha_kd if cfg.alpha_hidden is None else cfg.alpha_hidden,
            router_objective=cfg.router_objective,
            lookahead_weight=cfg.lookahead_weight,
            router_kl_weight=cfg.router_kl_weight,
            lookahead_jvp=cfg.lookahead_jvp,
        )
        if weights.lookahead and getattr(student.get_output_embeddings(), "bias", None) is not None:
            raise ConfigError(
                "--router_objective lookahead does not support a student whose LM head has a bias "
                "(its direction would be missing the bias's part); use --router_objective joint"
            )
        if self.mode == "dual" and weights.router_objective == "lookahead" and cfg.dual_loss == "hidden":
            raise ConfigError(
                "--router_objective lookahead is built on the logit losses: with two tokenizers use "
                "--dual_loss logit or both"
            )
        if not weights.needs_teacher:
            self._log("--alpha_kd 0 and no teacher CE: a CE-only run, the teacher is not run while training")
        for note in (temperature_note(cfg), dual_alpha_note(cfg) if self.mode == "dual" else None):
            if note and self.is_main:
                logger.warning(note)
        projection, pairs, vocab_map = None, None, None
        if self.mode == "dual" and cfg.dual_loss in ("logit", "both"):
            from .vocab_map import load_or_build_vocab_map

            vocab_map = load_or_build_vocab_map(self.teacher_tok, self.student_tok)
            self._log(f"cross-tokenizer vocabulary map: {vocab_map.num_buckets:,} shared buckets")
        if self.mode == "dual" and cfg.dual_loss in ("hidden", "both"):
            pairs = parse_layer_pairs(cfg.hidden_layer_pairs)
            for t, st in pairs:
                for role, idx, model in (("teacher", t, teacher), ("student", st, student)):
                    n = model.config.num_hidden_layers
                    if not -1 <= idx <= n:
                        raise ConfigError(
                            f"--hidden_layer_pairs: {role} layer {idx} out of range (-1 or 0..{n} for this {role})"
                        )
            projection = make_projection(teacher.config.hidden_size, student.config.hidden_size, len(pairs))
            if not weights.needs_teacher:  # CE only: the projection gets no gradient (DDP would wait for it)
                projection.requires_grad_(False)
        self.routers = found
        self.controller = controller
        self.model = SARKDModel(
            student,
            teacher,
            controller,
            r_params,
            weights,
            s_head,
            t_head,
            projection=projection,
            layer_pairs=pairs,
            vocab_map=vocab_map,
            mode=self.mode,
        )
        if not cfg.fsdp:  # FSDP moves each unit's shard to the device as it shards it (never the whole model)
            self.model.to(self.accelerator.device)

    def _setup_data(self) -> None:
        cfg = self.cfg
        if cfg.streaming:
            return self._setup_streamed_data()
        # tokenised through the `datasets` cache (one process fills it, the others read it)
        with self.accelerator.main_process_first():
            train, val = data.load_blocks(cfg, self.mode, self.teacher_tok, self.student_tok)
        if not train or data.num_blocks(train) == 0:
            raise ConfigError(
                f"the training data holds fewer than --block_size {cfg.block_size} tokens: "
                "give more text or a smaller block size"
            )
        if val is not None:
            if not val or data.num_blocks(val) == 0:
                raise ConfigError(f"the validation data holds fewer than --block_size {cfg.block_size} tokens")
        elif cfg.validation_split_percentage > 0:
            train, val = data.split_validation(train, cfg.validation_split_percentage)
        elif cfg.eval_steps:  # (a --train_file without --validation_file is refused in the config already)
            raise ConfigError(
                f"--validation_split_percentage 0 holds out no validation blocks and dataset {cfg.dataset_name!r} "
                "has no validation split: give a percentage > 0 or --eval_steps 0"
            )
        if self.mode == "dual":
            self._log_dual_blocks(train, "")
        if self.model.weights.lookahead and cfg.lookahead_quiz == "holdout":
            train, self.quiz_blocks = data.split_validation(train, cfg.lookahead_holdout_percentage)
        self.train_blocks, self.val_blocks = train, val
        acc = self.accelerator
        self.stream = data.BatchStream(train, cfg.per_device_batch_size, cfg.seed, acc.process_index, acc.num_processes)
        self._log(
            f"data: {data.num_blocks(train)} train / {data.num_blocks(val) if val else 0} validation blocks of "
            f"{cfg.block_size} tokens; "
            f"effective batch {cfg.effective_batch_size * acc.num_processes} blocks per optimizer step"
        )

    def _log_dual_blocks(self, blocks: dict[str, torch.Tensor], which: str) -> None:
        cov = data.alignment_coverage(blocks)
        util = float(blocks["student_mask"].float().mean()), float(blocks["teacher_mask"].float().mean())
        self._log(
            f"dual-tokenizer blocks{which}: alignment coverage {cov:.4f}, "
            f"block fill {util[0]:.1%} (student) / {util[1]:.1%} (teacher)"
        )

    def _setup_streamed_data(self) -> None:
        """--streaming: blocks packed as the data is read (see sar_kd.streaming); nothing reads the whole corpus."""
        from . import streaming

        cfg, acc = self.cfg, self.accelerator
        self.stream, val, held, first = streaming.streaming_data(
            cfg, self.mode, self.teacher_tok, self.student_tok, acc.process_index, acc.num_processes
        )
        if self.mode == "dual":
            self._log_dual_blocks(first, f" (the first {data.num_blocks(first)} training blocks)")
        self.train_blocks, self.val_blocks = None, val
        n_val = data.num_blocks(val) if val else 0
        self._log(
            f"data: streamed blocks of {cfg.block_size} tokens, shuffle buffer {self.stream.buffer_size}; "
            f"{n_val} validation blocks"
            + (" (the first of the training stream, held out)" if held else "")
            + f"; effective batch {cfg.effective_batch_size * acc.num_processes} blocks per optimizer step"
        )

    def _setup_optimizer(self) -> None:
        from transformers import get_scheduler

        cfg = self.cfg
        m = self.model
        if cfg.fsdp:
            self._shard()
        student_params = [p for p in m.student.parameters() if p.requires_grad]
        groups = [
            {"params": student_params, "lr": cfg.student_lr, "weight_decay": cfg.weight_decay, "name": "student"},
            {"params": list(m.router_params.values()), "lr": cfg.router_lr, "weight_decay": 0.0, "name": "router"},
        ]
        if m.projection is not None:
            groups.append(
                {
                    "params": list(m.projection.parameters()),
                    "lr": cfg.student_lr,
                    "weight_decay": cfg.weight_decay,
                    "name": "projection",
                }
            )
        optimizer = torch.optim.AdamW(groups)
        name = cfg.scheduler_type if cfg.use_scheduler else "constant"
        scheduler = get_scheduler(
            name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.train_steps
        )
        acc = self.accelerator
        if cfg.fsdp:  # already sharded: accelerate only launches, reduces and autocasts (no prepare)
            self.ddp_model, self.optimizer, self.scheduler = self.model, optimizer, scheduler
            return
        # step_scheduler_with_optimizer=False semantics: we step once per optimizer update ourselves.
        acc.step_scheduler_with_optimizer = False
        self.ddp_model, self.optimizer, self.scheduler = acc.prepare(self.model, optimizer, scheduler)
        checkpointing.keep_trainable_only(acc, self.model)

    def _shard(self) -> None:
        """FSDP2 over both models (:mod:`sar_kd.sharding`); the router parameters are looked up again
        (sharding replaces every parameter object)."""
        from . import sharding

        m, cfg = self.model, self.cfg
        names = list(m.router_params)
        param_dtype = None if cfg.model_dtype == "float32" else DTYPES[cfg.model_dtype]
        sharding.shard(m, [m.teacher, m.student], self.accelerator.device.type, param_dtype)
        teacher_params = dict(m.teacher.named_parameters())
        m._router_map = {n: teacher_params[n] for n in names}
        m.anchor_in_loss = False  # applied after the backward pass to the fp32 shards (see train_step)
        self._anchor_shards = sharding.local_shards(m.router_params, m._anchors())
        self._log(
            f"FSDP2: {len(sharding.decoder_layers(m.teacher))} teacher and {len(sharding.decoder_layers(m.student))} "
            f"student layers sharded over {self.accelerator.num_processes} processes"
        )

    # ------------------------------------------------------------------ train
    def run(self) -> dict[str, Any]:
        """Set up, train, save; return the final summary."""
        self.setup()
        try:
            return self.train()
        finally:
            self.controller.remove()

    def _window(self) -> list[dict[str, torch.Tensor]]:
        dev = self.accelerator.device
        return [{k: v.to(dev) for k, v in next(self.stream).items()} for _ in range(self.cfg.grad_accum_steps)]

    def _global_counts(self, window: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Token counts of each loss over the whole window and all processes."""
        local = torch.stack([sum(b[k].sum() for b in window) for k in ("n_kd", "n_ce", "n_tce")]).float()
        total = self.accelerator.reduce(local, reduction="sum")
        return dict(zip(("kd", "ce", "tce"), (max(float(v), 1.0) for v in total)))

    def _quiz_batch(self) -> dict[str, torch.Tensor]:
        """The lookahead quiz batch: the stream's next batch, peeked (the student has not trained on it
        yet; the stream is not advanced), or a held-out training slice chosen by the step number."""
        if self.cfg.lookahead_quiz == "next":
            batch = self.stream.peek()
        else:
            n, bs = data.num_blocks(self.quiz_blocks), self.cfg.per_device_batch_size
            rank, world = self.accelerator.process_index, self.accelerator.num_processes
            start = ((self.step * world + rank) * bs) % n
            idx = torch.arange(start, start + bs) % n
            batch = {k: v[idx] for k, v in self.quiz_blocks.items()}
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    def _quiz_direction(self) -> dict[str, torch.Tensor]:
        """g_q = ∇θ of the student's mean CE on the quiz batch, by student parameter name (no ``.grad``).

        With several processes the quiz batch is the global one (each holds its share): the CE is
        normalised by the global label count and the gradients summed over the processes, so the
        direction is the one a single process would compute on the whole quiz batch."""
        from .lookahead import quiz_gradient

        acc = self.accelerator
        m, batch = self.model, self._quiz_batch()
        named = {n: p for n, p in m.student.named_parameters() if p.requires_grad}
        with acc.autocast():
            ce = m._ce_only_sums(batch)["ce_sum"]  # the student's CE sum, as a CE-only step computes it
        labels = batch["n_ce"].sum().float()  # n_ce: the batch's student labels
        if acc.num_processes > 1:
            labels = acc.reduce(labels, reduction="sum")
        grads = quiz_gradient(ce / labels.clamp(min=1), list(named.values()))
        if acc.num_processes > 1:  # one all-reduce of the flattened gradient
            flat = acc.reduce(torch.cat([g.reshape(-1).float() for g in grads]), reduction="sum")
            grads = [f.view_as(g).to(g.dtype) for f, g in zip(flat.split([g.numel() for g in grads]), grads)]
        return dict(zip(named, grads))

    def train_step(self) -> dict[str, float]:
        """One optimizer update over ``grad_accum_steps`` micro-batches; returns its metrics."""
        cfg, acc = self.cfg, self.accelerator
        t0 = time.perf_counter()
        window = self._window()
        counts = self._global_counts(window)
        world = acc.num_processes
        # DDP averages gradients over processes, so each one divides by (global count / world).
        norms = {k: v / world for k, v in counts.items()}
        norms["router_scale"] = 1.0 / len(window)
        keys = ("kd_sum", "ce_sum", "teacher_ce_sum", "aligned_tokens", "student_tokens", "hidden_mse_sum")
        keys += tuple(f"xtok_{k}" for k in ("kl_sum", "chunk_sum", "n_pairs", "n_chunks", "mass_sum"))
        keys += ("xtok_student_tokens", "xtok_student_tokens_in_pairs", "look_sum")
        sums = dict.fromkeys(keys, 0.0)
        reg = dict.fromkeys(("router_anchor", "router_entropy", "router_load_balance", "router_kl"), 0.0)
        if self.model.weights.lookahead:
            self.model.direction = self._quiz_direction()
        for i, batch in enumerate(window):  # (the teacher forward switches the router gradient mode on)
            sync = i == len(window) - 1
            if cfg.fsdp:  # reduce-scatter after every micro-batch (memory stays sharded); DDP's autocast
                ctx = acc.autocast()
            else:
                ctx = acc.no_sync(self.ddp_model) if not sync else contextlib.nullcontext()
            with ctx:
                out = self.ddp_model(model_inputs(batch), norms)
                acc.backward(out["loss"])
            for k in keys:
                if k in out:
                    sums[k] += float(out[k])
            for k in reg:
                reg[k] += float(out[k]) / len(window)
        if cfg.fsdp and self.model.weights.train_router:  # the anchor, on the sharded fp32 masters
            from .sharding import add_anchor_gradient

            reg["router_anchor"] = add_anchor_gradient(
                self.model.router_params, self._anchor_shards, self.model.weights.router_anchor_weight
            )
        self.controller.active = False
        t_update = time.perf_counter()
        acc.unscale_gradients()
        # one fused norm per parameter group (student / router / projection), then one clipping pass
        norms = {g["name"]: _grad_norm(g["params"]) for g in self.optimizer.param_groups}
        r_norm, s_norm, p_norm = norms["router"], norms["student"], norms.get("projection", 0.0)
        total_norm = math.sqrt(sum(v * v for v in norms.values()))
        finite = math.isfinite(total_norm)
        if cfg.max_grad_norm > 0 and finite:
            torch.nn.utils.clip_grads_with_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]],
                cfg.max_grad_norm,
                torch.tensor(total_norm, device=acc.device),
            )
        lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}  # the rates this update used
        if acc.scaler is None and not finite:
            skipped = True  # fp32/bf16: no scaler to back off, so this update is dropped, visibly
        else:
            self.optimizer.step()
            skipped = acc.optimizer_step_was_skipped  # fp16: the GradScaler found inf/NaN
        if skipped:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            logger.warning(
                "step %d: non-finite gradients, update skipped (%d so far)", self.step + 1, self.skipped_steps
            )
        else:
            self.consecutive_skips = 0
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        now = time.perf_counter()
        dt, update_dt = now - t0, now - t_update
        # Per-token means over the window (all processes), as the loss itself is normalised.
        local = torch.tensor([sums["kd_sum"], sums["ce_sum"], sums["teacher_ce_sum"]], device=acc.device)
        kd, ce, tce = (float(v) for v in acc.reduce(local, "sum") / torch.tensor(
            [counts[self.model.kd_count_key], counts["ce"], counts["tce"]], device=acc.device))  # fmt: skip
        w = self.model.weights
        total = w.alpha_kd * kd + w.alpha_ce * ce + w.router_teacher_ce_weight * tce
        total += (
            w.router_anchor_weight * reg["router_anchor"]
            - w.router_entropy_weight * reg["router_entropy"]
            + w.router_load_balance_weight * reg["router_load_balance"]
            + w.router_kl_weight * reg["router_kl"]
        )
        look = None
        if w.lookahead:  # L_look per student token (this process): its fall is what the router learns
            look = sums["look_sum"] / counts[self.model.kd_count_key] * acc.num_processes
            total += w.lookahead_weight * look
        if self.mode == "dual" and w.dual_loss == "both":  # the MSE term and its own weight
            total += w.alpha_hidden * sums["hidden_mse_sum"] / max(sums["aligned_tokens"], 1.0)
        metrics = {
            "step": self.step,
            "loss": total,
            "kd_loss": kd,
            "ce_loss": ce,
            "teacher_ce": tce if w.needs_teacher and (self.mode == "logit" or w.router_teacher_ce_weight > 0) else None,
            **reg,
            "router_grad_norm": r_norm,
            "student_grad_norm": s_norm,
            "projection_grad_norm": p_norm if self.model.projection is not None else None,
            "lr_student": lrs["student"],
            "lr_router": lrs["router"],
            "tokens_per_s": counts["ce"] / dt,  # predicted student tokens, all processes
            "step_time_s": dt,
            "update_time_s": update_dt,  # norms, clipping, optimizer and scheduler
            "skipped_steps": self.skipped_steps,
        }
        if look is not None:
            metrics["lookahead"] = look
        if self.mode == "dual":  # this process's micro-batches (logging only)
            metrics.update(dual_metrics(sums, w.dual_loss))
        return metrics

    def evaluate(self) -> dict[str, float]:
        """Student and teacher validation perplexity and bits per byte (native routing, no dropout):
        :func:`sar_kd.evaluation.evaluate`, logged in one line."""
        from .evaluation import evaluate

        row = evaluate(self.model, self.routers, self.val_blocks, self.cfg, self.accelerator, self.byte_tables)
        self._log(format_eval(self.step, row))
        return {"step": self.step, **row}

    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        out = Path(cfg.output_dir)
        if self.is_main:
            if not cfg.resume_from_checkpoint:
                # a fresh run replaces the previous one (--overwrite_output_dir, or the same config
                # again): none of its checkpoints may be resumed or outlive this run's
                removed = checkpointing.clear_previous_run(out)
                if removed:
                    self._log(f"removed the previous run's {', '.join(sorted(p.name for p in removed))} from {out}")
            out.mkdir(parents=True, exist_ok=True)
            self._write_run_config(out)
        if cfg.report_to != "none":
            flat = {k: (v if isinstance(v, int | float | str | bool) else str(v)) for k, v in cfg.to_dict().items()}
            self.accelerator.init_trackers("sar_kd", config=flat)
        start = time.perf_counter()
        logged_evals = [h for h in self.history if "student_ppl" in h]  # from before a resume
        last_eval = logged_evals[-1] if logged_evals else None
        if self.initial_eval is None and logged_evals and logged_evals[0]["step"] == 0:
            self.initial_eval = logged_evals[0]  # (a checkpoint written before it carried its own)
        if cfg.eval_steps and self.step == 0:
            self.initial_eval = last_eval = self._record(self.evaluate())
        bar = Progress(cfg.train_steps, self.step, self.is_main)
        while self.step < cfg.train_steps:
            metrics = self.train_step()
            if self.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                raise RuntimeError(
                    f"{self.consecutive_skips} consecutive optimizer steps had non-finite gradients (last: step "
                    f"{self.step}); the run is diverging: lower --student_lr/--router_lr or use --model_dtype bfloat16"
                )
            if self.step % cfg.logging_steps == 0 or self.step == cfg.train_steps:
                self._record(metrics)
                bar.update_to(self.step, metrics, time.perf_counter() - start)
            if cfg.eval_steps and (self.step % cfg.eval_steps == 0 or self.step == cfg.train_steps):
                last_eval = self._record(self.evaluate())
            if cfg.save_steps and self.step % cfg.save_steps == 0:
                self.save_checkpoint()
        bar.close()
        if cfg.report_to != "none":
            self.accelerator.end_training()
        self.save_outputs(out)
        wall = time.perf_counter() - start
        summary = {
            "steps": self.step,
            "wall_time_s": wall,
            "skipped_steps": self.skipped_steps,
            "mean_tokens_per_s": mean(h.get("tokens_per_s") for h in self.history),
            "output_dir": str(out),
        }
        # initial_*: measured before any training, or left out (a later evaluation is never relabelled)
        for k in ("student_ppl", "teacher_ppl", "student_bpb", "teacher_bpb", "expert_load", "eval_router_entropy"):
            if self.initial_eval is not None and k in self.initial_eval:
                summary[f"initial_{k}"] = self.initial_eval[k]
            if last_eval is not None and k in last_eval:
                summary[f"final_{k}"] = last_eval[k]
        self.summary = summary
        if self.is_main:
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
            self._log(format_summary(summary))
        self.accelerator.wait_for_everyone()
        return summary

    # ------------------------------------------------------------------ saving
    def _record(self, metrics: dict[str, Any]) -> dict[str, Any]:
        self.history.append(metrics)
        if self.cfg.report_to != "none":
            scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float) and k != "step"}
            self.accelerator.log(scalars, step=metrics["step"])
        if self.is_main:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
        return metrics

    def _write_run_config(self, out: Path) -> None:
        checkpointing.write_run_config(out, self.cfg, self.mode)

    def router_update(self) -> dict[str, torch.Tensor]:
        """The trained router parameters keyed by the teacher's state-dict names (fp32, CPU).
        Collective under --fsdp (the shards are gathered)."""
        from .sharding import full_tensor

        return {n: full_tensor(p.detach()).float().cpu().clone() for n, p in self.model.router_params.items()}

    def save_outputs(self, out: Path) -> None:
        """student/, router_update.safetensors (and .pt), and projection.pt in dual mode, into ``out``, written by the main
        process. Every process calls it (under --fsdp the shards are gathered first)."""
        from .sharding import full_model_state

        m = self.model
        sharded = self.cfg.fsdp
        student_state = full_model_state(m.student) if sharded else None
        update = self.router_update()
        projection = None
        if m.projection is not None:
            projection = full_model_state(m.projection) if sharded else m.projection.state_dict()
        if not self.is_main:
            return
        out.mkdir(parents=True, exist_ok=True)
        student = self.accelerator.unwrap_model(self.ddp_model).student
        student.save_pretrained(out / "student", state_dict=student_state)
        self.student_tok.save_pretrained(out / "student")
        routers.save_router_update(
            out / routers.ROUTER_UPDATE, update, self.teacher_name, self.routers, self.cfg.router_patterns
        )
        torch.save(update, out / routers.LEGACY_ROUTER_UPDATE)  # (the pickle of older versions, still read)
        if projection is not None:
            torch.save({"layer_pairs": m.layer_pairs, "state_dict": projection}, out / "projection.pt")

    def save_checkpoint(self) -> Path:
        """OUTPUT/checkpoint-STEP with the outputs and the full training state, written atomically."""

        def write_files(where: Path) -> None:  # every process (a sharded run gathers its outputs)
            self.save_outputs(where)
            if self.is_main:
                self._write_run_config(where)
                # --streaming: the reader position, shuffle buffer and RNG (the same on every process)
                self.stream.save_files(where)

        state = {
            "skipped_steps": self.skipped_steps,
            "stream": self.stream.checkpoint_state(),
            "initial_eval": self.initial_eval,
        }
        save_state = None
        if self.cfg.fsdp:
            from . import sharding

            acc = self.accelerator

            def save_state(where: Path) -> None:
                sharding.save_state(where, self.model, self.optimizer, self.scheduler, acc.process_index, self.is_main)

        return checkpointing.save_checkpoint(
            self.accelerator, self.cfg.output_dir, self.step, state, write_files, self.cfg.save_total_limit, save_state
        )

    def _resume(self, path: Path) -> None:
        load_state = None
        if self.cfg.fsdp:
            from . import sharding

            def load_state(where: Path) -> None:
                sharding.load_state(where, self.model, self.optimizer, self.scheduler, self.accelerator.process_index)

        state = checkpointing.load_checkpoint(self.accelerator, path, load_state)
        self._apply_configured_rates()
        self.step = state["step"]
        self.skipped_steps = state["skipped_steps"]
        self.initial_eval = state.get("initial_eval")  # absent in older checkpoints: from the metrics, if there
        self.stream.restore(state["stream"], path)
        if self.is_main:
            self.history = checkpointing.drop_later(Path(self.cfg.output_dir), self.step)
        self._log(f"resumed from {path} at step {self.step}")

    def _apply_configured_rates(self) -> None:
        """After restoring a checkpoint's optimizer and scheduler: train at this run's --student_lr,
        --router_lr and --weight_decay, not the saved ones.

        The schedule's base rates become the new ones and the current rate is the schedule's value at the
        restored step from them (a user who lowers a rate after a spike gets the lower rate from the
        next update on); a change is said in one line. DDP and FSDP alike (both restore into these objects)."""
        cfg = self.cfg
        sched = getattr(self.scheduler, "scheduler", self.scheduler)  # accelerate wraps the schedule
        wanted = {
            "student": ("student_lr", "weight_decay"),
            "router": ("router_lr", None),
            "projection": ("student_lr", "weight_decay"),
        }
        changes: dict[str, str] = {}
        for i, g in enumerate(self.optimizer.param_groups):
            lr_flag, wd_flag = wanted[g["name"]]
            new_lr = getattr(cfg, lr_flag)
            if sched.base_lrs[i] != new_lr:
                changes.setdefault(lr_flag, f"{lr_flag} {sched.base_lrs[i]:g} → {new_lr:g}")
                sched.base_lrs[i] = g["initial_lr"] = new_lr
            new_wd = getattr(cfg, wd_flag) if wd_flag else 0.0
            if g["weight_decay"] != new_wd:
                changes.setdefault(wd_flag, f"{wd_flag} {g['weight_decay']:g} → {new_wd:g}")
                g["weight_decay"] = new_wd
        if not changes:
            return
        for i, g in enumerate(self.optimizer.param_groups):  # the schedule's value at the restored step
            g["lr"] = sched.base_lrs[i] * sched.lr_lambdas[i](sched.last_epoch)  # (every schedule here is a LambdaLR)
        sched._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        order = ("student_lr", "router_lr", "weight_decay")
        self._log(", ".join(changes[k] for k in order if k in changes) + " from the command line")

    def _log(self, msg: str) -> None:
        if self.is_main:
            logger.info(msg)


def _grad_norm(params) -> float:
    """The 2-norm of the gradients of ``params`` (whole tensors: a sharded gradient's norm is reduced
    over the processes, so every process calls it under --fsdp)."""
    from .sharding import full_tensor

    grads = [p.grad for p in params if p.grad is not None]
    return float(full_tensor(torch.nn.utils.get_total_norm(grads))) if grads else 0.0
