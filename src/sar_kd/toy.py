"""Small models and tokenizers built from configs, for the offline demo and the tests.

Everything here goes through ``save_pretrained`` so that it is loaded back by the same
``from_pretrained`` path a real run uses.
"""

from __future__ import annotations

import gzip
from importlib import resources
from pathlib import Path

import torch


def shakespeare_text() -> str:
    """The bundled public-domain corpus (Tiny Shakespeare, 1.1 MB)."""
    with resources.files("sar_kd.assets").joinpath("tinyshakespeare.txt.gz").open("rb") as f:
        return gzip.decompress(f.read()).decode("utf-8")


def wikitext_text() -> str:
    """The bundled WikiText-2 raw validation split (Merity et al. 2016, CC BY-SA 3.0, 1.1 MB)."""
    with resources.files("sar_kd.assets").joinpath("wikitext2_valid.raw.gz").open("rb") as f:
        return gzip.decompress(f.read()).decode("utf-8")


def train_bpe_tokenizer(texts: list[str], vocab_size: int, path: str | Path, seed_alphabet: bool = True):
    """Train a byte-level BPE tokenizer (fast, with offsets) on ``texts`` and save it to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if seed_alphabet else [],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(str(path))
    return fast


def tiny_moe_config(vocab_size: int, hidden: int = 64, layers: int = 2, experts: int = 4, top_k: int = 1, **kw):
    """A Qwen3-MoE config shaped like the default teacher (top-1, ``norm_topk_prob=True``)."""
    from transformers import Qwen3MoeConfig

    args = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        moe_intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        num_experts=experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=True,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=0,
    )
    args.update(kw)
    return Qwen3MoeConfig(**args)


def tiny_llama_config(vocab_size: int, hidden: int = 48, layers: int = 2, **kw):
    """A Llama config shaped like the default student (SmolLM-135M: tied embeddings)."""
    from transformers import LlamaConfig

    args = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    args.update(kw)
    return LlamaConfig(**args)


def save_random_model(config, path: str | Path, seed: int = 0, tokenizer=None, router_std: float | None = 0.5):
    """Build a random causal LM from ``config``, save it (and ``tokenizer``) to ``path``; return the model.

    Routers of freshly initialised Qwen3-MoE models are all-zero (every token ties); ``router_std``
    gives them random weights so that routing is non-trivial, as in a trained teacher.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if router_std is not None:
        from .routers import find_routers

        try:
            for r in find_routers(model):
                torch.nn.init.normal_(r.module.weight, std=router_std)
        except ValueError:
            pass  # not an MoE model
    model.save_pretrained(str(path))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return model
