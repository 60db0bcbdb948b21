"""Tiny MoE configs shared by the family tests: the common sizes and DeepSeek-V3's attention and MoE."""

TINY_COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    max_position_embeddings=128,
)
TINY_DEEPSEEK = dict(
    moe_intermediate_size=16,
    first_k_dense_replace=1,
    q_lora_rank=None,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    n_shared_experts=1,
    num_key_value_heads=4,
)
