"""CUDA checks (run on a GPU machine): fp16 with GradScaler, bf16, and memory peaks.

1. A few steps of a tiny same-tokenizer run in float16: fp32 master weights for student and
   routers, fp16 frozen teacher weights, GradScaler active, finite losses, router gradient > 0.
2. A forced overflow (loss x 1e30 on one micro-batch): the scaler skips that update and
   ``skipped_steps`` counts it; no weight becomes non-finite.
3. Peak GPU memory of one optimizer step of the real architectures (random weights) at
   block 256 and 1024, fp16 and bf16, next to ``sar-kd estimate``'s prediction.
4. With two or more GPUs: the same on 2 GPUs under ``--fsdp`` (bf16, block 1024), per-GPU peak
   next to ``sar-kd estimate --fsdp --num_gpus 2`` (torchrun; this script is its worker).

Prints one JSON line per check. Usage: python bench/cuda_check.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))


def tiny_pair(root: Path) -> dict:
    from sar_kd.toy import save_random_model, shakespeare_text, tiny_llama_config, tiny_moe_config, train_bpe_tokenizer

    lines = shakespeare_text().splitlines()[:6000]
    tok = train_bpe_tokenizer(lines[:3000], 384, root / "tok")
    save_random_model(tiny_moe_config(len(tok)), root / "teacher", seed=1, tokenizer=tok)
    save_random_model(tiny_llama_config(len(tok)), root / "student", seed=2, tokenizer=tok)
    (root / "train.txt").write_text("\n".join(lines[:2500]) + "\n")
    (root / "val.txt").write_text("\n".join(lines[5000:5600]) + "\n")
    return {"teacher": str(root / "teacher"), "student": str(root / "student"),
            "train": str(root / "train.txt"), "val": str(root / "val.txt")}  # fmt: skip


def check_fp16(pair: dict, root: Path) -> dict:
    from conftest import base_args
    from sar_kd.config import config_from_args
    from sar_kd.trainer import Trainer

    cfg = config_from_args(
        base_args(pair, root / "fp16", model_dtype="float16", train_steps=6, eval_steps=6, save_steps=0)
    )
    t = Trainer(cfg)
    t.setup()
    dtypes = {str(p.dtype) for n, p in t.model.teacher.named_parameters() if n not in t.model.router_params}
    masters = {str(p.dtype) for p in t.model.router_params.values()} | {
        str(p.dtype) for p in t.model.student.parameters()
    }
    torch.cuda.reset_peak_memory_stats()
    summary = t.train()
    rows = [h for h in t.history if "loss" in h]
    t.controller.remove()
    return {
        "check": "fp16_gradscaler",
        "teacher_frozen_dtypes": sorted(dtypes),
        "trained_dtypes": sorted(masters),
        "scaler": t.accelerator.scaler is not None,
        "losses_finite": all(torch.isfinite(torch.tensor(r["loss"])).item() for r in rows),
        "min_router_grad_norm": min(r["router_grad_norm"] for r in rows),
        "skipped_steps": summary["skipped_steps"],
        "final_student_ppl": summary.get("final_student_ppl"),
        "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20,
    }


def check_overflow(pair: dict, root: Path) -> dict:
    from conftest import base_args
    from sar_kd.config import config_from_args
    from sar_kd.objective import SARKDModel
    from sar_kd.trainer import Trainer

    real = SARKDModel.forward
    calls = [0]

    def overflow(self, batch, norms):
        out = real(self, batch, norms)
        calls[0] += 1
        if calls[0] == 7:
            out["loss"] = out["loss"] * 1e30
        return out

    SARKDModel.forward = overflow
    try:
        cfg = config_from_args(
            base_args(pair, root / "ovf", model_dtype="float16", train_steps=6, eval_steps=0, save_steps=0)
        )
        t = Trainer(cfg)
        t.setup()
        t.train()
        t.controller.remove()
    finally:
        SARKDModel.forward = real
    finite = all(torch.isfinite(p).all().item() for p in t.model.student.parameters())
    return {"check": "fp16_overflow_skip", "skipped_steps": t.skipped_steps, "weights_finite": finite}


def check_real_memory(block: int, dtype: str, mode: str) -> dict:
    from real_pair import build_trainer

    from sar_kd.estimate import estimate_memory

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    trainer = build_trainer(torch.device("cuda"), mode=mode, block_size=block, model_dtype=dtype)
    trainer.train_step()
    trainer.train_step()
    peak = torch.cuda.max_memory_allocated()
    est = estimate_memory(
        trainer.model.teacher.config, trainer.model.student.config, model_dtype=dtype, block_size=block,
        batch_size=1, mode=mode, gradient_checkpointing=True,
    )  # fmt: skip
    trainer.controller.remove()
    del trainer
    return {"check": "real_pair_memory", "mode": mode, "dtype": dtype, "block_size": block,
            "peak_gb": peak / 2**30, "estimate_gb": est["total_bytes"] / 2**30,
            "ratio": est["total_bytes"] / peak}  # fmt: skip


def fsdp_worker(block: int, mode: str) -> None:
    """Under torchrun: one FSDP run of the real pair, per-GPU peak against the estimate."""
    from real_pair import build_trainer

    from sar_kd.estimate import estimate_memory

    dtype = "bfloat16"
    trainer = build_trainer(torch.device("cuda"), mode=mode, block_size=block, model_dtype=dtype, fsdp=True)
    torch.cuda.reset_peak_memory_stats()
    trainer.train_step()
    trainer.train_step()
    peak = torch.cuda.max_memory_allocated()
    world = trainer.accelerator.num_processes
    est = estimate_memory(
        trainer.model.teacher.config, trainer.model.student.config, model_dtype=dtype, block_size=block,
        mode=mode, num_gpus=world, fsdp=True, cuda=False,
    )  # fmt: skip
    print(json.dumps({"check": "fsdp_memory", "rank": trainer.accelerator.process_index, "gpus": world,
                      "mode": mode, "block_size": block, "peak_gb": peak / 2**30,
                      "estimate_gb": est["total_bytes"] / 2**30, "ratio": est["total_bytes"] / peak}), flush=True)  # fmt: skip


def check_fsdp(mode: str) -> None:
    import os
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           "--fsdp_worker", "--mode", mode]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "4"})
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    for ln in rows:
        print(ln, flush=True)
    if r.returncode != 0 or not rows:
        print(json.dumps({"check": "fsdp_memory", "mode": mode, "error": r.stderr[-2000:]}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="only the tiny fp16 checks")
    ap.add_argument("--fsdp_worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="logit", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.fsdp_worker:
        fsdp_worker(1024, a.mode)
        return
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        sys.exit(1)
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__}), flush=True)
    root = Path(tempfile.mkdtemp())
    pair = tiny_pair(root)
    print(json.dumps(check_fp16(pair, root)), flush=True)
    print(json.dumps(check_overflow(pair, root)), flush=True)
    if not a.quick:
        for mode in ("hidden", "logit"):
            for dtype in ("float16", "bfloat16"):
                for block in (256, 1024):
                    print(json.dumps(check_real_memory(block, dtype, mode)), flush=True)
    if torch.cuda.device_count() >= 2:
        for mode in ("xtok", "logit"):
            check_fsdp(mode)
    else:
        print(json.dumps({"check": "fsdp_memory", "skipped": "fewer than 2 GPUs"}), flush=True)


if __name__ == "__main__":
    main()
