"""Dual-tokenizer packing loses no text: decoded blocks, concatenated, give back the input stream."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoTokenizer

import sar_kd.data as data_mod
from sar_kd.data import as_stream, pack_dual_blocks

CJK_EMOJI = [
    "中文字符和日本語のテキスト、これは長い文です。" * 6,
    "emoji 🤖🚀👍🏽 flags 🇫🇷 and a family 👨‍👩‍👧 " * 8,
    "한국어 텍스트입니다. Ελληνικά κείμενα, naïve café straße — " * 5,
    "x = f(3.14159) ** 2  # code\n\tindented\t\ttabs    spaces",
]


@pytest.fixture(scope="module")
def toks(real_tokenizer_dirs):
    return (
        AutoTokenizer.from_pretrained(real_tokenizer_dirs["smollm"]),
        AutoTokenizer.from_pretrained(real_tokenizer_dirs["qwen3"]),
    )


def _texts(blocks, side: str, tok) -> list[str]:
    ids, lens = blocks[f"{side}_ids"], blocks[f"{side}_mask"].sum(1)
    return [tok.decode(ids[i, : int(lens[i])], clean_up_tokenization_spaces=False) for i in range(len(ids))]


def _check_tiling(blocks, toks, texts: list[str], block_size: int) -> list[str]:
    """Every character of the stream in exactly one block, in order, the same span on both sides."""
    s_tok, t_tok = toks
    stream = "".join(as_stream(texts))
    student, teacher = _texts(blocks, "student", s_tok), _texts(blocks, "teacher", t_tok)
    assert "".join(student) == stream  # nothing dropped, nothing repeated
    assert teacher == student  # block by block, both sides hold the same characters
    for side in ("student", "teacher"):
        mask, off = blocks[f"{side}_mask"].bool(), blocks[f"{side}_offsets"]
        assert int(mask.sum(1).max()) <= block_size
        # offsets count from the block's first character and reach its last one
        first = off[:, 0, 0]
        last = off[..., 1].masked_fill(~mask, 0).max(1).values
        assert first.eq(0).all() and last.tolist() == [len(t) for t in student]
    return student


@pytest.mark.parametrize("block_size", [64, 256])
def test_every_character_reaches_training_once(toks, wikitext_lines, block_size):
    texts = wikitext_lines[:1500] + CJK_EMOJI * 3
    blocks = pack_dual_blocks(texts, *toks, block_size)
    _check_tiling(blocks, toks, texts, block_size)
    # blocks are full on the side that binds (all but the last), so little compute goes to padding
    fuller = torch.maximum(blocks["student_mask"].sum(1), blocks["teacher_mask"].sum(1))[:-1].float()
    assert float(fuller.mean()) >= 0.97 * block_size
    assert float(blocks["n_kd"].sum()) / float(blocks["student_mask"].sum()) >= 0.99


def test_no_common_cut_falls_back_to_pieces_that_tile(toks, monkeypatch):
    """With tiny blocks the two tokenisations of random letters and emoji often share no cut within
    the block: those stretches are cut and tokenised piece by piece, tails carried on."""
    rng = random.Random(0)
    texts = ["".join(rng.choice("qwxzjkvbpmfhgtyrdslaeiou") for _ in range(rng.randint(20, 200))) for _ in range(40)]
    texts += ["🤖🚀👍🏽🇫🇷" * 10, "中文字符和日本語のテキスト" * 5]
    calls = []
    real = data_mod._pieces_that_fit

    def spy(*args):
        calls.append(args[0])
        return real(*args)

    monkeypatch.setattr(data_mod, "_pieces_that_fit", spy)
    blocks = pack_dual_blocks(texts, *toks, 4)
    assert calls  # the fallback ran
    _check_tiling(blocks, toks, texts, 4)


def test_chars_per_token_needs_no_sample(toks, wikitext_lines):
    """CJK text after a long English prefix gets full blocks too (no ratio measured on the start)."""
    texts = wikitext_lines[:400] + ["中文字符和日本語のテキスト、これは長い文です。" * 40] * 20
    blocks = pack_dual_blocks(texts, *toks, 128)
    student = _check_tiling(blocks, toks, texts, 128)
    cjk_rows = [i for i, t in enumerate(student) if "中文" in t][:-1]
    assert cjk_rows and all(
        max(int(blocks["student_mask"][i].sum()), int(blocks["teacher_mask"][i].sum())) >= 120 for i in cjk_rows
    )
