"""Bits per byte: the per-token byte table, and the numbers every evaluation reports."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import base_args
from sar_kd.bpb import bits_per_byte, label_bytes, token_byte_lengths

TEXTS = [
    "The quick brown fox jumps over the lazy dog.\n  Indented line\twith a tab.",
    "héllo wörld, naïve café — 日本語のテキスト and an emoji 🤖🦊 at the end",
    "def f(x):\n    return x ** 2  # comment\n\n\n",
]


@pytest.mark.parametrize("name", ["qwen3", "smollm"])
def test_token_bytes_sum_to_the_text_bytes_on_the_real_tokenizers(real_tokenizer_dirs, wikitext_lines, name):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(real_tokenizer_dirs[name])
    table = token_byte_lengths(tok)
    assert len(table) == len(tok)
    for text in [*TEXTS, "\n".join(wikitext_lines[:400])]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert int(table[ids].sum()) == len(text.encode("utf-8"))
    # special tokens cover no text; a larger model vocabulary (padded head rows) counts 0
    assert table[tok.eos_token_id] == 0
    assert int(token_byte_lengths(tok, size=len(tok) + 7)[-7:].sum()) == 0


def test_token_bytes_of_a_sentencepiece_style_vocabulary_with_byte_fallback(tmp_path):
    """▁ is a space and <0xNN> one byte (Llama-2 / Mistral style vocabularies)."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["▁", "a", "b", "c", "é", "▁a", "▁ab", "bc", "▁abc"]:
        vocab[piece] = len(vocab)
    merges = [("▁", "a"), ("▁a", "b"), ("b", "c"), ("▁ab", "c")]
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    bpe.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    bpe.pre_tokenizer = None
    bpe.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    table = token_byte_lengths(tok)
    text = "abc ab é ñ€ cab"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert any(3 <= i < 259 for i in ids)  # ñ and € went through byte fallback
    # the normaliser's prepended ▁ is one byte more than the text
    assert int(table[ids].sum()) == len(text.encode("utf-8")) + 1
    assert table[vocab["é"]] == 2 and table[vocab["<0xE2>"]] == 1 and table[vocab["▁abc"]] == 4
    assert table[tok.eos_token_id] == 0


def test_label_bytes_and_bits_per_byte():
    table = torch.tensor([0, 1, 2, 3])
    labels = torch.tensor([[1, 2, -100], [3, 0, -100]])
    assert int(label_bytes(labels, table)) == 6
    assert bits_per_byte(6 * math.log(2), 6) == pytest.approx(1.0)
    assert math.isnan(bits_per_byte(1.0, 0))


def test_every_evaluation_reports_bits_per_byte_against_a_plain_reference(tiny_pair, tmp_path):
    """The trainer's bits per byte equals a reference computed from the saved student with a plain
    forward pass and the byte length of the decoded evaluated text."""
    from sar_kd.config import config_from_args
    from sar_kd.trainer import Trainer

    out = tmp_path / "run"
    cfg = config_from_args(base_args(tiny_pair, out, train_steps=2, eval_steps=2, save_steps=0))
    trainer = Trainer(cfg)
    summary = trainer.run()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "student_ppl" in r]
    assert len(evals) == 2
    for r in evals:
        for side in ("student", "teacher"):
            # bpb and perplexity come from the same NLL sum
            expect = math.log(r[f"{side}_ppl"]) * r["eval_tokens"] / (math.log(2) * r["eval_bytes"])
            assert r[f"{side}_bpb"] == pytest.approx(expect, rel=1e-9)
    for k in ("student_bpb", "teacher_bpb"):
        assert summary[f"final_{k}"] == evals[-1][k] and summary[f"initial_{k}"] == evals[0][k]
    assert json.loads((out / "summary.json").read_text())["final_student_bpb"] == evals[-1]["student_bpb"]
    saved = json.loads((out / "sar_kd_config.json").read_text())  # unset weights: the one-tokenizer defaults
    assert saved["mode"] == "logit" and (saved["config"]["alpha_kd"], saved["config"]["alpha_ce"]) == (0.9, 0.1)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = AutoModelForCausalLM.from_pretrained(out / "student").eval()
    tok = AutoTokenizer.from_pretrained(out / "student")
    n = cfg.eval_max_batches * cfg.per_device_batch_size
    ids = trainer.val_blocks["input_ids"][:n]
    with torch.no_grad():
        logits = student(input_ids=ids).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
    )
    n_bytes = sum(
        len(tok.decode(row[1:], skip_special_tokens=True, clean_up_tokenization_spaces=False).encode("utf-8"))
        for row in ids.tolist()
    )
    assert evals[-1]["eval_bytes"] == n_bytes
    assert evals[-1]["student_bpb"] == pytest.approx(float(nll) / (math.log(2) * n_bytes), rel=1e-4)


class _StubTokenizer:
    """A remote-code tokenizer without ``backend_tokenizer``: only ids -> pieces."""

    def __init__(self, pieces, special=()):
        self.pieces, self.all_special_ids = pieces, list(special)

    def __len__(self):
        return len(self.pieces)

    def convert_ids_to_tokens(self, ids):
        return [self.pieces[i] for i in ids]


def test_token_bytes_of_tokenizers_without_a_tokenizer_json():
    # GPT-2 alphabet without a tokenizer.json: Ġ is a space (1 byte), Ã© two bytes of "é"
    byte_level = _StubTokenizer(["<|endoftext|>", "Ġthe", "Ċ", "Ã©", "the", "Ġa"], special=[0])
    assert token_byte_lengths(byte_level).tolist() == [0, 4, 1, 2, 3, 2]
    # tiktoken-style pieces are the bytes themselves
    tiktoken_like = _StubTokenizer([b"<s>", b" the", "é".encode(), b"\n"], special=[0])
    assert token_byte_lengths(tiktoken_like).tolist() == [0, 4, 2, 1]
