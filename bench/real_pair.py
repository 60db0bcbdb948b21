"""The real teacher/student architectures with random weights, for benchmarks (no download).

Built on the meta-free path from the vendored configs (``sar_kd/assets/configs``): Huihui-MoE-1B-A0.6B
(Qwen3-MoE, 28 layers, hidden 1024, 3 experts, top-1) and SmolLM-135M (Llama, 30 layers, hidden 576).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from sar_kd.config import TrainConfig, validate_config
from sar_kd.estimate import builtin_config
from sar_kd.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _student_tokenizer_dir(dirs: dict, root: Path) -> Path:
    """Same-tokenizer mode: a copy of the Qwen tokenizer in its own directory (the trainer refuses the
    teacher's own directory as the student)."""
    import shutil

    dest = root / "student_qwen3_tokenizer"
    if not dest.exists():
        shutil.copytree(dirs["qwen3"], dest)
    return dest


def build_trainer(
    dev: torch.device, mode: str = "hidden", block_size: int = 1024, model_dtype: str = "float32", **over
):
    """A set-up :class:`Trainer` on the real architectures (random weights) and real tokenizers."""
    from transformers import AutoModelForCausalLM

    from fixture_files import unpack_real_tokenizers, wikitext_text

    sys_tmp = Path(tempfile.mkdtemp())
    dirs = unpack_real_tokenizers(sys_tmp)
    train = sys_tmp / "train.txt"
    train.write_text(wikitext_text())
    t_conf = builtin_config("teacher")
    s_conf = builtin_config("student")
    if mode == "logit":  # same tokenizer: the student gets the teacher's vocabulary
        s_conf.vocab_size = t_conf.vocab_size
    torch.manual_seed(0)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[model_dtype]
    teacher = AutoModelForCausalLM.from_config(t_conf, dtype=dtype)
    student = AutoModelForCausalLM.from_config(s_conf, dtype=torch.float32)
    for name, p in teacher.named_parameters():
        if name.endswith("mlp.gate.weight"):
            torch.nn.init.normal_(p, std=0.02)
    cfg = TrainConfig(
        teacher_model=str(dirs["qwen3"]),
        student_model=str(_student_tokenizer_dir(dirs, sys_tmp) if mode == "logit" else dirs["smollm"]),
        train_file=str(train),
        block_size=block_size,
        per_device_batch_size=1,
        grad_accum_steps=1,
        train_steps=10,
        eval_steps=0,
        save_steps=0,
        model_dtype=model_dtype,
        cpu=dev.type == "cpu",
        output_dir=str(sys_tmp / "out"),
        **over,
    )
    validate_config(cfg)
    trainer = Trainer(cfg, teacher=teacher, student=student)
    trainer.setup()
    trainer.controller.active = True
    return trainer


def full_step_ms(dev: torch.device) -> float:
    """One optimizer step of the real architectures (random weights) on one 1024-token dual sample."""
    import time

    trainer = build_trainer(dev, mode="hidden", block_size=1024)
    trainer.train_step()  # warm-up
    t0 = time.perf_counter()
    trainer.train_step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1000
