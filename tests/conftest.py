"""Shared fixtures: tiny random models saved to disk and loaded back through from_pretrained."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    from sar_kd.toy import shakespeare_text

    return shakespeare_text().splitlines()[:6000]


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory, corpus):
    """A tiny top-1 Qwen3-MoE teacher and a tiny Llama student sharing one BPE tokenizer."""
    from sar_kd.toy import save_random_model, tiny_llama_config, tiny_moe_config, train_bpe_tokenizer

    root = tmp_path_factory.mktemp("pair")
    tok = train_bpe_tokenizer(corpus[:3000], 384, root / "tok")
    teacher = root / "teacher"
    student = root / "student"
    save_random_model(tiny_moe_config(len(tok)), teacher, seed=1, tokenizer=tok)
    save_random_model(tiny_llama_config(len(tok)), student, seed=2, tokenizer=tok)
    train = root / "train.txt"
    val = root / "val.txt"
    train.write_text("\n".join(corpus[:2500]) + "\n")
    val.write_text("\n".join(corpus[5000:5600]) + "\n")
    return {"teacher": str(teacher), "student": str(student), "train": str(train), "val": str(val), "root": root}


def base_args(pair, out, **over) -> list[str]:
    """Command-line flags for a short CPU run on the tiny pair."""
    args = {
        "teacher_model": pair["teacher"],
        "student_model": pair["student"],
        "train_file": pair["train"],
        "validation_file": pair["val"],
        "block_size": 64,
        "train_steps": 4,
        "per_device_batch_size": 2,
        "grad_accum_steps": 2,
        "student_lr": 1e-3,
        "router_lr": 1e-2,
        "eval_steps": 2,
        "eval_max_batches": 2,
        "save_steps": 2,
        "kd_chunk_size": 32,
        "output_dir": str(out),
    }
    args.update(over)
    flags = []
    for k, v in args.items():
        if v is True:
            flags.append(f"--{k}")
        elif v is not None and v is not False:
            flags += [f"--{k}={v}"] if str(v).startswith("-") else [f"--{k}", str(v)]
    return flags


@pytest.fixture(scope="session")
def real_tokenizer_dirs(tmp_path_factory) -> dict[str, str]:
    """The real Qwen3 (teacher) and SmolLM-135M (student) tokenizers, from the vendored fixtures."""
    from fixture_files import unpack_real_tokenizers

    return {k: str(v) for k, v in unpack_real_tokenizers(tmp_path_factory.mktemp("realtok")).items()}


@pytest.fixture(scope="session")
def wikitext_lines() -> list[str]:
    """WikiText-2 raw validation split (vendored, CC BY-SA 3.0)."""
    from fixture_files import wikitext_text

    return wikitext_text().splitlines()


@pytest.fixture(scope="session")
def dual_pair(tmp_path_factory, real_tokenizer_dirs, wikitext_lines):
    """A tiny Qwen3-MoE teacher on the real Qwen tokenizer and a tiny Llama student on the real SmolLM one."""
    from transformers import AutoTokenizer

    from sar_kd.toy import save_random_model, tiny_llama_config, tiny_moe_config

    root = tmp_path_factory.mktemp("dual")
    t_tok = AutoTokenizer.from_pretrained(real_tokenizer_dirs["qwen3"])
    s_tok = AutoTokenizer.from_pretrained(real_tokenizer_dirs["smollm"])
    teacher, student = root / "teacher", root / "student"
    save_random_model(
        tiny_moe_config(151936, hidden=32, experts=3, eos_token_id=151645, pad_token_id=151643),
        teacher,
        seed=3,
        tokenizer=t_tok,
    )
    save_random_model(tiny_llama_config(49152, hidden=32), student, seed=4, tokenizer=s_tok)
    train, val = root / "train.txt", root / "val.txt"
    train.write_text("\n".join(wikitext_lines[:300]) + "\n")
    val.write_text("\n".join(wikitext_lines[3000:3150]) + "\n")
    return {"teacher": str(teacher), "student": str(student), "train": str(train), "val": str(val), "root": root}
