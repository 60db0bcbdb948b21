"""The memory estimator's arithmetic on tiny configs (meta device, nothing allocated)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM

from sar_kd.cli import main
from sar_kd.config import ConfigError
from sar_kd.estimate import GB, builtin_config, count_model, estimate_memory, memory_table, parse_size
from sar_kd.toy import tiny_llama_config, tiny_moe_config

T = tiny_moe_config(500, hidden=64, layers=2, experts=4)
S = tiny_llama_config(500, hidden=48, layers=2)


def test_parameter_counts_match_real_models():
    t, s = count_model(T), count_model(S)
    assert t.params == sum(p.numel() for p in AutoModelForCausalLM.from_config(T).parameters())
    assert s.params == sum(p.numel() for p in AutoModelForCausalLM.from_config(S).parameters())
    assert t.router_params == 2 * 4 * 64  # two layers, (experts, hidden) each


def test_components_follow_the_training_setup():
    e32 = estimate_memory(T, S, "float32", 128, 1, "logit", cuda=False)
    e16 = estimate_memory(T, S, "bfloat16", 128, 1, "logit", cuda=False)
    p = e32["params"]
    trainable = p["student"] + p["teacher_routers"]
    assert e32["gradients"] == 4 * trainable
    assert e32["optimizer_states"] == 8 * trainable
    assert e32["student_weights"] == 4 * p["student"]
    # the frozen teacher is stored in the compute dtype, routers keep fp32 masters
    frozen = p["teacher"] - p["teacher_routers"]
    assert e32["teacher_weights"] == 4 * frozen + 4 * p["teacher_routers"]
    assert e16["teacher_weights"] == 2 * frozen + 4 * p["teacher_routers"]
    assert e16["autocast_weight_copies"] == 2 * p["student"] and e32["autocast_weight_copies"] == 0
    assert e32["total_bytes"] == sum(v for k, v in e32.items() if isinstance(v, int) and k != "total_bytes")
    assert e32["cuda_overhead"] == 0 and estimate_memory(T, S)["cuda_overhead"] > 0


def test_scaling_with_tokens_and_checkpointing():
    a = estimate_memory(T, S, block_size=256, cuda=False)
    b = estimate_memory(T, S, block_size=512, cuda=False)
    c = estimate_memory(T, S, block_size=256, batch_size=2, cuda=False)
    assert b["activations"] == pytest.approx(2 * a["activations"], rel=1e-6)
    assert c["activations"] == pytest.approx(2 * a["activations"], rel=1e-6)
    deep_t, deep_s = tiny_moe_config(500, hidden=64, layers=12), tiny_llama_config(500, hidden=48, layers=12)
    ckpt = estimate_memory(deep_t, deep_s, block_size=256, cuda=False)
    no_ckpt = estimate_memory(deep_t, deep_s, block_size=256, gradient_checkpointing=False, cuda=False)
    assert no_ckpt["activations"] > 3 * ckpt["activations"]
    hidden = estimate_memory(T, S, mode="hidden", cuda=False)
    assert hidden["params"]["projection"] == 64 * 48 + 48 and "alignment" in hidden


def test_dense_teacher_is_rejected():
    with pytest.raises(ConfigError, match="no MoE routers"):
        estimate_memory(S, S)


def test_parse_size():
    assert parse_size("16GB") == 16 * GB and parse_size("16 GiB") == 16 * GB and parse_size("512MB") == GB // 2
    with pytest.raises(ConfigError):
        parse_size("lots")


def test_real_pair_counts_match_the_published_numbers():
    t = count_model(builtin_config("teacher"))
    s = count_model(builtin_config("student"))
    assert t.params == 1_280_200_704 and s.params == 134_515_008
    assert t.router_params == 28 * 3 * 1024


def test_cli_json_and_verdict(tmp_path, capsys):
    tdir, sdir = tmp_path / "t", tmp_path / "s"
    T.save_pretrained(tdir)
    S.save_pretrained(sdir)
    args = ["estimate", "--teacher_model", str(tdir), "--student_model", str(sdir), "--block_size", "64"]
    assert main([*args, "--json", "--gpu_memory", "1GB"]) == 0
    est = json.loads(capsys.readouterr().out)
    assert est["total_bytes"] > 0 and est["fits"] is True and est["settings"]["mode"] == "logit"
    assert main([*args, "--gpu_memory", "1MB"]) == 0
    assert "does NOT fit in" in capsys.readouterr().out


def test_table_rows():
    table = memory_table(builtin_config("teacher"), builtin_config("student"))
    assert len(table.splitlines()) == 2 + 7
    assert "block ≤ 2048" in table.splitlines()[-1]  # limited by SmolLM's 2048 positions


def test_all_expert_training_costs_more_activation_memory():
    st = estimate_memory(T, S, block_size=256, cuda=False)
    topk = estimate_memory(T, S, block_size=256, cuda=False, router_grad="straight_through_topk")
    assert st["activations"] > topk["activations"]
    assert st["settings"]["router_grad"] == "straight_through"
