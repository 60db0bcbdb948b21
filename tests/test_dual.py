"""Dual-tokenizer (hidden-state) distillation: compatibility, alignment, gradient, end to end."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import base_args
from sar_kd import alignment
from sar_kd.cli import main
from sar_kd.config import config_from_args
from sar_kd.data import alignment_coverage, pack_dual_blocks
from sar_kd.tokenizers import compare_tokenizers
from sar_kd.trainer import Trainer


@pytest.fixture(scope="module")
def toks(real_tokenizer_dirs):
    return (
        AutoTokenizer.from_pretrained(real_tokenizer_dirs["smollm"]),
        AutoTokenizer.from_pretrained(real_tokenizer_dirs["qwen3"]),
    )


def test_compatibility_detection(toks, real_tokenizer_dirs, tiny_pair):
    s, t = toks
    same, why = compare_tokenizers(t, AutoTokenizer.from_pretrained(real_tokenizer_dirs["qwen3"]))
    assert same, why
    same, why = compare_tokenizers(t, s)
    assert not same and "differ" in why
    a = AutoTokenizer.from_pretrained(tiny_pair["teacher"])
    b = AutoTokenizer.from_pretrained(tiny_pair["student"])
    assert compare_tokenizers(a, b)[0]


def _align(s_off, t_off):
    s = torch.tensor([s_off])
    t = torch.tensor([t_off])
    return alignment.overlap_alignment(s, torch.ones(1, len(s_off)), t, torch.ones(1, len(t_off)))


def test_alignment_hand_checked():
    # text "abcdefghi": student [abc][defghi], teacher [a][bcde][fghi]
    w, aligned = _align([(0, 3), (3, 9)], [(0, 1), (1, 5), (5, 9)])
    expected = torch.tensor([[1 / 3, 2 / 3, 0.0], [0.0, 2 / 6, 4 / 6]])
    assert torch.allclose(w[0], expected)
    assert aligned.tolist() == [[True, True]]


def test_zero_width_and_padding_tokens_are_unaligned():
    s = torch.tensor([[(0, 0), (0, 4), (4, 8), (0, 0)]])  # special token, two words, padding
    t = torch.tensor([[(0, 8), (0, 0)]])
    w, aligned = alignment.overlap_alignment(s, torch.tensor([[1, 1, 1, 0]]), t, torch.tensor([[1, 0]]))
    assert aligned.tolist() == [[False, True, True, False]]
    assert w[0, 0].sum() == 0 and w[0, 3].sum() == 0
    assert torch.allclose(w[0, 1:3, 0], torch.ones(2))


def _loop_reference(s_off, t_off):
    """Per-token Python loop: the obvious (slow) definition, to check the tensor version."""
    rows = []
    for ss, se in s_off:
        ov = [max(0, min(se, te) - max(ss, ts)) for ts, te in t_off]
        tot = sum(ov)
        rows.append([o / tot if tot else 0.0 for o in ov])
    return torch.tensor(rows)


TEXTS = [
    "naïve café, straße — Ελληνικά",
    "中文字符和日本語のテキスト",
    "emoji 🤖🚀👍🏽 flags 🇫🇷!",
    "spaces   between\t\ttabs\n\n\nand newlines    ",
    "x = f(3.14159) ** 2  # code",
]


@pytest.mark.parametrize("text", TEXTS)
def test_alignment_of_real_tokenizers_matches_loop(toks, text):
    s, t = toks
    es = s(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    et = t(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    w, aligned = _align(es, et)
    assert torch.allclose(w[0], _loop_reference(es, et), atol=1e-6)
    assert aligned.all()  # every student token shares a character with some teacher token
    assert torch.allclose(w[0].sum(-1), torch.ones(len(es)))


def test_coverage_on_wikitext_with_real_pair(toks, wikitext_lines):
    s, t = toks
    blocks = pack_dual_blocks(wikitext_lines[:1200], s, t, 256)
    assert alignment_coverage(blocks) >= 0.99
    for side in ("student", "teacher"):
        assert int(blocks[f"{side}_mask"].sum(1).max()) <= 256
    # both sides tokenise the same characters: the last real offsets end at the same place
    s_end = blocks["student_offsets"][..., 1].max(1).values
    t_end = blocks["teacher_offsets"][..., 1].max(1).values
    assert torch.equal(s_end, t_end)
    # the texts decode to the same string on both sides
    i = 3
    n_s, n_t = int(blocks["student_mask"][i].sum()), int(blocks["teacher_mask"][i].sum())
    assert s.decode(blocks["student_ids"][i, :n_s]) == t.decode(blocks["teacher_ids"][i, :n_t])


def test_router_gradient_flows_through_hidden_state_loss(dual_pair, tmp_path):
    cfg = config_from_args(base_args(dual_pair, tmp_path / "o", block_size=64, alpha_ce=0.0, alpha_kd=1.0, dual_loss="hidden",
                                     router_anchor_weight=0, router_entropy_weight=0, router_load_balance_weight=0))  # fmt: skip
    t = Trainer(cfg)
    t.setup()
    assert t.mode == "dual"
    head_calls = []
    t.model.teacher.get_output_embeddings().register_forward_hook(lambda *a: head_calls.append(1))
    m = t.train_step()
    t.controller.remove()
    assert m["router_grad_norm"] > 1e-6  # only the hidden-state MSE reaches the routers here
    assert m["hidden_mse"] > 0 and m["align_coverage"] > 0.99
    assert head_calls == []  # the teacher's 151,936-wide LM head never ran


def test_dual_cli_end_to_end(dual_pair, tmp_path):
    out = tmp_path / "dual"
    args = base_args(dual_pair, out, block_size=64, hidden_layer_pairs="-1:-1,1:1", router_teacher_ce_weight=0.1,
                     dual_loss="hidden")  # fmt: skip
    assert main(["train", *args]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "student_ppl" in r]
    assert len(steps) == 4 and all(r["hidden_mse"] > 0 and r["align_coverage"] >= 0.99 for r in steps)
    assert all(r["teacher_ce"] > 0 for r in steps)  # computed (in chunks) because its weight is > 0
    assert [r["step"] for r in evals] == [0, 2, 4] and all(r["teacher_ppl"] > 1 for r in evals)
    saved = json.loads((out / "sar_kd_config.json").read_text())  # unset weights: the two-tokenizer defaults
    assert saved["mode"] == "dual" and (saved["config"]["alpha_kd"], saved["config"]["alpha_ce"]) == (0.5, 0.5)
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    assert student.config.vocab_size == 49152
    assert len(AutoTokenizer.from_pretrained(out / "student")) == 49152
    proj = torch.load(out / "projection.pt", weights_only=True)
    assert proj["layer_pairs"] == [(-1, -1), (1, 1)] or proj["layer_pairs"] == [[-1, -1], [1, 1]]
    assert proj["state_dict"]["0.weight"].shape == (32, 32)
    assert (out / "checkpoint-2" / "projection.pt").is_file()

    # resume from checkpoint-2 restores the projection and reproduces the final one
    res = tmp_path / "resumed"
    import shutil

    shutil.copytree(out, res)
    shutil.rmtree(res / "checkpoint-4")
    (res / "projection.pt").unlink()
    assert main(["train", *base_args(dual_pair, res, block_size=64, hidden_layer_pairs="-1:-1,1:1", dual_loss="hidden",
                                     router_teacher_ce_weight=0.1, resume_from_checkpoint="latest")]) == 0  # fmt: skip
    p2 = torch.load(res / "projection.pt", weights_only=True)
    for k, v in proj["state_dict"].items():
        assert torch.allclose(v, p2["state_dict"][k], atol=1e-6)


def test_bad_layer_pair_is_an_error(dual_pair, tmp_path, capsys):
    rc = main(
        ["train", *base_args(dual_pair, tmp_path / "o", block_size=64, hidden_layer_pairs="-1:7", dual_loss="hidden")]
    )
    assert rc == 2 and "out of range" in capsys.readouterr().err


def test_dual_log_line_without_teacher_logits(dual_pair, tmp_path, caplog):
    with caplog.at_level("INFO", logger="sar_kd"):
        rc = main(["train", *base_args(dual_pair, tmp_path / "o", block_size=64, train_steps=1, eval_steps=1,
                                       save_steps=0, dual_loss="hidden")])  # fmt: skip
    assert rc == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step 1/1")]
    assert lines and "teacher_ce" not in lines[0]
    rows = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in rows if "loss" in r][0]["teacher_ce"] is None  # not computed: no teacher LM head


def test_router_gradient_flows_through_cross_tokenizer_logit_loss(dual_pair, tmp_path):
    """--dual_loss logit alone (no CE, no regularisers) gives the routers a gradient."""
    cfg = config_from_args(base_args(dual_pair, tmp_path / "o", block_size=64, alpha_ce=0.0, alpha_kd=1.0,
                                     dual_loss="logit", router_anchor_weight=0, router_entropy_weight=0,
                                     router_load_balance_weight=0))  # fmt: skip
    t = Trainer(cfg)
    t.setup()
    try:
        assert t.model.projection is None and t.model.vocab_map is not None
        m = t.train_step()
    finally:
        t.controller.remove()
    assert m["router_grad_norm"] > 1e-6 and m["student_grad_norm"] > 0
    assert m["kd_loss"] > 0 and m["xtok_kl"] > 0
    assert 0.85 < m["xtok_one_to_one"] <= 1.0 and 0 < m["xtok_mass"] <= 1.0
    assert "hidden_mse" not in m


@pytest.mark.parametrize("dual_loss", ["logit", pytest.param("both", marks=pytest.mark.slow)])
def test_dual_logit_cli_end_to_end(dual_pair, tmp_path, dual_loss):
    out = tmp_path / dual_loss
    args = base_args(dual_pair, out, block_size=64, dual_loss=dual_loss, alpha_hidden=0.5, train_steps=2,
                     grad_accum_steps=1, eval_max_batches=1)  # fmt: skip
    assert main(["train", *args]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2 and all(r["xtok_kl"] >= 0 and r["kd_loss"] > 0 for r in steps)
    assert all(("hidden_mse" in r) == (dual_loss == "both") for r in steps)
    assert AutoModelForCausalLM.from_pretrained(out / "student").config.vocab_size == 49152
    assert (out / "projection.pt").is_file() == (dual_loss == "both")
    assert set(torch.load(out / "router_update.pt", weights_only=True)) == {
        f"model.layers.{i}.mlp.gate.weight" for i in range(2)
    }
    cfg = json.loads((out / "sar_kd_config.json").read_text())
    assert cfg["config"]["dual_loss"] == dual_loss and cfg["mode"] == "dual"
