"""The memory estimator's arithmetic on tiny configs (meta device, nothing allocated)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM

from sar_kd.cli import main
from sar_kd.config import ConfigError
from sar_kd.estimate import (
    GB,
    LayerMLP,
    _layer_elements,
    builtin_config,
    count_model,
    estimate_memory,
    layer_mlps,
    memory_table,
    parse_size,
)
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


def _deepseek(shared: int = 2):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(vocab_size=500, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                            num_experts_per_tok=2, n_shared_experts=shared, first_k_dense_replace=1, q_lora_rank=None,
                            kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1,
                            topk_group=1)  # fmt: skip


def _qwen2_moe():
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(vocab_size=500, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                          shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, mlp_only_layers=[2])  # fmt: skip


def _qwen3_sparse_step():
    return tiny_moe_config(500, hidden=64, layers=4, experts=4, decoder_sparse_step=2, intermediate_size=96)


def _real_mlps(model) -> list[LayerMLP]:
    """What each decoder layer of the built model actually holds."""
    found = []
    for layer in model.model.layers:
        mlp = layer.mlp
        if not hasattr(mlp, "experts"):
            found.append(LayerMLP(dense=mlp.gate_proj.out_features))
            continue
        shared = getattr(mlp, "shared_expert", None) or getattr(mlp, "shared_experts", None)
        width = mlp.experts.down_proj.shape[-1]  # (experts, hidden, width)
        found.append(LayerMLP(dense=0, expert=width, shared=shared.gate_proj.out_features if shared else 0))
    return found


@pytest.mark.parametrize("make", [_deepseek, _qwen2_moe, _qwen3_sparse_step], ids=["deepseek_v3", "qwen2_moe", "qwen3"])
def test_dense_layers_and_shared_experts_match_the_real_model(make):
    conf = make()
    model = AutoModelForCausalLM.from_config(conf)
    counts = count_model(conf)
    assert counts.params == sum(p.numel() for p in model.parameters())
    assert layer_mlps(conf) == _real_mlps(model)
    moe_layers = sum(1 for m in layer_mlps(conf) if m.expert)
    assert 0 < moe_layers < conf.num_hidden_layers  # the configs above mix both kinds
    assert counts.router_params == moe_layers * 4 * 64


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # n_shared_experts=0
def test_shared_experts_and_dense_layers_enter_the_activations():
    kw = {"block_size": 128, "gradient_checkpointing": False, "cuda": False, "mode": "logit"}
    with_shared, without = estimate_memory(_deepseek(2), S, **kw), estimate_memory(_deepseek(0), S, **kw)
    # two MoE layers, each with one shared MLP of 2 x 32: 5 kept tensors of that width per token, fp32
    assert with_shared["activations"] - without["activations"] == 128 * 2 * 5 * 64 * 4
    conf = _qwen2_moe()
    per_layer = [_layer_elements(conf, m, 4) for m in layer_mlps(conf)]
    assert count_model(conf, all_experts=True).all_layer_elements == sum(per_layer)
    assert per_layer[2] < per_layer[0]  # the dense layer keeps less than an all-expert MoE layer


def test_dual_mode_teacher_ce_counts_the_teacher_logit_chunk():
    wide_t = tiny_moe_config(2000, hidden=64, layers=2, experts=4)
    kw = {"block_size": 128, "mode": "hidden", "kd_chunk_size": 64, "cuda": False}
    off = estimate_memory(wide_t, S, **kw)
    on = estimate_memory(wide_t, S, router_teacher_ce_weight=0.1, **kw)
    # the student's and the teacher's chunks run one after the other: the wider one sets the peak
    assert off["logits"] == 64 * 500 * 16 and on["logits"] == 64 * 2000 * 16
    assert on["total_bytes"] - off["total_bytes"] == 64 * (2000 - 500) * 16
    assert on["settings"]["router_teacher_ce_weight"] == 0.1
    assert estimate_memory(T, S, router_teacher_ce_weight=0.1, **kw)["logits"] == off["logits"]  # same widths


def test_cli_teacher_ce_flag(tmp_path, capsys):
    tdir, sdir = tmp_path / "t", tmp_path / "s"
    tiny_moe_config(2000, hidden=64, layers=2, experts=4).save_pretrained(tdir)
    S.save_pretrained(sdir)
    args = ["estimate", "--teacher_model", str(tdir), "--student_model", str(sdir), "--block_size", "64", "--json",
            "--mode", "hidden"]  # fmt: skip
    totals = []
    for w in ("0", "0.1"):
        assert main([*args, "--router_teacher_ce_weight", w]) == 0
        totals.append(json.loads(capsys.readouterr().out)["total_bytes"])
    assert totals[1] > totals[0]


def test_cross_tokenizer_logit_loss_counts_both_full_vocabulary_slices():
    from sar_kd.estimate import builtin_config, estimate_memory

    t, s = builtin_config("teacher"), builtin_config("student")
    kw = {"block_size": 512, "kd_chunk_size": 256, "cuda": False}
    xtok = estimate_memory(t, s, mode="xtok", **kw)
    hidden = estimate_memory(t, s, mode="hidden", **kw)
    assert xtok["logits"] == 256 * (151936 + 49152) * 16 + 256 * 49152 * 16
    assert xtok["logits"] > hidden["logits"] and xtok["params"]["projection"] == 0


def test_fsdp_estimate_shards_the_states_and_adds_the_gathered_units():
    """--fsdp over N GPUs: weights, gradients and optimizer states / N; the root unit (embeddings, norms,
    heads) and two of the largest decoder layers held whole, counted from the models' own modules."""
    import torch
    from transformers import AutoModelForCausalLM

    from sar_kd.estimate import resolve_config
    from sar_kd.sharding import decoder_layers

    t, s = resolve_config("Qwen/Qwen3-30B-A3B", "teacher"), builtin_config("student")
    one = estimate_memory(t, s, model_dtype="bfloat16", mode="xtok")
    four = estimate_memory(t, s, model_dtype="bfloat16", mode="xtok", num_gpus=4, fsdp=True)
    for k in ("teacher_weights", "student_weights", "gradients", "optimizer_states"):
        assert abs(four[k] - one[k] / 4) <= 1, k
    assert four["activations"] == one["activations"] and four["autocast_weight_copies"] == 0
    sizes = {}
    for role, conf in (("t", t), ("s", s)):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(conf)
        layers = decoder_layers(model)
        assert len(layers) == conf.num_hidden_layers
        layer = max(sum(p.numel() for p in m.parameters()) for m in layers)
        sizes[role] = (
            layer,
            sum(p.numel() for p in model.parameters()) - sum(p.numel() for m in layers for p in m.parameters()),
        )
    (t_layer, t_root), (s_layer, s_root) = sizes["t"], sizes["s"]
    expected = (t_root + s_root) * 2 + s_root * 4 + 2 * max(t_layer, s_layer) * 2 + s_layer * 4
    assert four["gathered_units"] == expected
    assert 20 * GB < four["total_bytes"] < 24 * GB  # the README's "4 GPUs of 24 GB" row
    # DDP (no --fsdp) on 4 GPUs holds everything on each
    assert estimate_memory(t, s, model_dtype="bfloat16", mode="xtok", num_gpus=4)["total_bytes"] == one["total_bytes"]


def test_vendored_big_teachers_have_their_published_sizes(capsys):
    from sar_kd.estimate import BIG_TEACHERS, estimate_main, resolve_config

    published = {
        "allenai/OLMoE-1B-7B-0924": 6.92e9,
        "Qwen/Qwen3-30B-A3B": 30.53e9,
        "mistralai/Mixtral-8x7B-v0.1": 46.70e9,
    }
    for name in BIG_TEACHERS:
        assert abs(count_model(resolve_config(name, "teacher")).params / published[name] - 1) < 0.005, name
    assert estimate_main(["--fsdp_table", "--model_dtype", "bfloat16"]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| ") and " B) |" in r]
    assert len(rows) == 4 and "Qwen/Qwen3-30B-A3B" in rows[2]
    with pytest.raises(ConfigError, match="--num_gpus 2 or more"):
        estimate_main(["--fsdp"])
