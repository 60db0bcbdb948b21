"""The fused KD chunk (sar_kd.fused_kd) against the checkpointed path: same sums, same gradients."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from sar_kd import fused_kd, losses
from sar_kd.heads import OutputHead
from sar_kd.objective import ObjectiveWeights, SARKDModel
from sar_kd.routers import RouterController, find_routers, freeze_all_but_routers
from sar_kd.toy import tiny_llama_config, tiny_moe_config

IGN = losses.IGNORE_INDEX
ROWS, VOCAB = 44, 40  # head rows > tokenizer size: the trim is exercised everywhere
POSTS = {
    "plain": {},
    "granite": {"logits_scaling": 4.0},
    "cohere": {"logit_scale": 0.5},
    "gemma": {"final_logit_softcapping": 3.0},
}


class _LM(nn.Module):
    """Embedding -> tanh -> LM head (+ the config attributes OutputHead reads): a stand-in model whose
    hidden state depends on the embedding, so a tied head gets gradient through both uses."""

    def __init__(self, hidden: int, seed: int, bias: bool = False, tied: bool = False, **post):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.config = SimpleNamespace(**post)
        self.embed = nn.Embedding(ROWS, hidden)
        self.lm_head = nn.Linear(hidden, ROWS, bias=bias)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(ROWS, hidden, generator=g))
            self.lm_head.weight.copy_(torch.randn(ROWS, hidden, generator=g) * 4 / hidden**0.5)
            if bias:
                self.lm_head.bias.copy_(torch.randn(ROWS, generator=g))
        if tied:
            self.lm_head.weight = self.embed.weight

    def get_output_embeddings(self):
        return self.lm_head

    def hidden(self, ids):
        return torch.tanh(self.embed(ids))


def _labels():
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, VOCAB, (2, 16), generator=g)
    labels[:, -1] = IGN
    labels[1, :8] = IGN  # with chunks of 5, flat tokens 15..19 form a chunk without a valid label
    return labels


def _run(student, teacher, labels, fused, **kw):
    ids = torch.arange(32).reshape(2, 16) % ROWS
    hs, ht = student.hidden(ids), teacher.hidden(ids)
    w = kw.pop("loss_weights", (0.9 / 30, 0.1 / 30, 0.3 / 30))
    tce_grad = kw.pop("teacher_ce_grad", True)
    kd, ce, tce = losses.chunked_lm_losses(
        hs, ht, OutputHead(student, VOCAB), OutputHead(teacher, VOCAB), labels,
        chunk_size=5, teacher_ce_grad=tce_grad, loss_weights=w, fused=fused, **kw,
    )  # fmt: skip
    (w[0] * kd + w[1] * ce + w[2] * tce).backward()
    params = [p for m in (student, teacher) for p in m.parameters() if p.requires_grad]
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return torch.stack([kd, ce, tce]).detach(), grads


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


@pytest.mark.parametrize("post", list(POSTS))
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("tce_grad,tied", [(True, True), (False, False), (True, False)])
def test_fused_matches_checkpointed_values_and_gradients(post, temperature, tce_grad, tied):
    student = _LM(8, seed=0, bias=post == "cohere", tied=tied, **POSTS[post])
    teacher = _LM(12, seed=1, **POSTS[post])
    teacher.lm_head.requires_grad_(False)  # frozen, as in training: its embedding stands in for the routers
    labels = _labels()
    ref, ref_grads = _run(student, teacher, labels, False, temperature=temperature, teacher_ce_grad=tce_grad)
    got, grads = _run(student, teacher, labels, True, temperature=temperature, teacher_ce_grad=tce_grad)
    assert _rel(got, ref) < 1e-5
    assert len(grads) == len(ref_grads) == (2 if tied else 3) + (post == "cohere")
    for g, r in zip(grads, ref_grads):
        assert r.abs().max() > 0 and _rel(g, r) < 1e-5


def test_teacher_head_weight_gets_its_gradient_when_trainable():
    student, teacher = _LM(8, seed=0), _LM(12, seed=1, bias=True)
    ref, ref_grads = _run(student, teacher, _labels(), False, temperature=2.0)
    got, grads = _run(student, teacher, _labels(), True, temperature=2.0)
    assert _rel(got, ref) < 1e-5 and len(grads) == 5
    for g, r in zip(grads, ref_grads):
        assert _rel(g, r) < 1e-5


def test_bf16_autocast_matches_the_checkpointed_path_loosely():
    student, teacher = _LM(16, seed=0, tied=True), _LM(24, seed=1, final_logit_softcapping=5.0)
    teacher.lm_head.requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, ref_grads = _run(student, teacher, _labels(), False, temperature=2.0)
        got, grads = _run(student, teacher, _labels(), True, temperature=2.0)
    assert _rel(got, ref) < 1e-3  # same bf16 logits: the sums agree far better than the gradients
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32 and _rel(g, r) < 3e-2


def test_fused_path_does_not_checkpoint_or_run_the_heads_again(monkeypatch):
    student, teacher = _LM(8, seed=0, tied=True), _LM(12, seed=1)
    hooked = _LM(8, seed=0)
    hooked.lm_head.register_forward_pre_hook(lambda *_: None)
    assert fused_kd.head_spec(OutputHead(hooked)) is None  # a hook might change the output: not fused
    m_calls = []
    real_linear = fused_kd.F.linear
    monkeypatch.setattr(fused_kd.F, "linear", lambda *a: m_calls.append(1) or real_linear(*a))
    monkeypatch.setattr(losses, "checkpoint", lambda *a, **k: pytest.fail("the fused path checkpointed"))
    ids = torch.arange(32).reshape(2, 16) % ROWS
    kd, ce, _ = losses.chunked_lm_losses(
        student.hidden(ids), teacher.hidden(ids), OutputHead(student, VOCAB), OutputHead(teacher, VOCAB),
        _labels(), 2.0, 5,
    )  # fmt: skip
    assert (
        type(kd.grad_fn).__name__ == "SelectBackward0"
        and "FusedKDLoss" in type(kd.grad_fn.next_functions[0][0]).__name__
    )
    n_forward = len(m_calls)
    assert n_forward == 2 * 6  # two heads, six chunks with a valid label (of seven)
    (kd + ce).backward()
    assert len(m_calls) == n_forward  # the backward ran neither head


def test_an_unfusable_head_takes_the_checkpointed_path(monkeypatch):
    class Scaled(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    torch.manual_seed(0)
    hs, ht = torch.randn(2, 16, 8, requires_grad=True), torch.randn(2, 16, 12, requires_grad=True)
    head_s, head_t = Scaled(8, VOCAB), nn.Linear(12, VOCAB)
    assert fused_kd.head_spec(head_s) is None and fused_kd.head_spec(lambda h: h) is None
    hooked = nn.Linear(8, VOCAB)  # a backward hook on the head must keep firing: not fused
    assert fused_kd.head_spec(hooked) is not None
    handle = hooked.register_full_backward_hook(lambda *a: None)
    assert fused_kd.head_spec(hooked) is None
    handle.remove()
    used = []
    real = losses.checkpoint
    monkeypatch.setattr(losses, "checkpoint", lambda *a, **k: used.append(1) or real(*a, **k))
    out = losses.chunked_lm_losses(hs, ht, head_s, head_t, _labels(), 2.0, 5)
    assert len(used) == 6
    monkeypatch.setattr(losses, "checkpoint", real)
    ref = losses.chunked_lm_losses(hs, ht, head_s, head_t, _labels(), 2.0, 5, fused=False)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


def test_backward_with_other_weights_than_declared_raises():
    student, teacher = _LM(8, seed=0), _LM(12, seed=1)
    ids = torch.arange(32).reshape(2, 16) % ROWS

    def sums():
        return losses.chunked_lm_losses(
            student.hidden(ids), teacher.hidden(ids), OutputHead(student, VOCAB), OutputHead(teacher, VOCAB),
            _labels(), 2.0, 5, loss_weights=(2.0, 1.0, 0.0),
        )  # fmt: skip

    kd, ce, _ = sums()
    (0.25 * (2 * kd + ce)).backward()  # a common factor (accumulation, loss scale) is fine
    kd, ce, _ = sums()
    with pytest.raises(RuntimeError, match="not proportional"):
        (kd + ce).backward()

    def small_ce():  # a term weighted far below the other is checked on its own scale too
        return losses.chunked_lm_losses(
            student.hidden(ids), teacher.hidden(ids), OutputHead(student, VOCAB), OutputHead(teacher, VOCAB),
            _labels(), 2.0, 5, loss_weights=(1.0, 5e-5, 0.0),
        )  # fmt: skip

    kd, ce, _ = small_ce()
    (3.0 * (kd + 5e-5 * ce)).backward()
    kd, ce, _ = small_ce()
    with pytest.raises(RuntimeError, match="not proportional"):
        kd.backward()


def test_no_grad_gives_the_same_sums_and_saves_only_hidden_sized_gradients():
    student, teacher = _LM(8, seed=0), _LM(12, seed=1)
    teacher.lm_head.requires_grad_(False)
    ids = torch.arange(32).reshape(2, 16) % ROWS
    heads = OutputHead(student, VOCAB), OutputHead(teacher, VOCAB)
    with torch.no_grad():
        ref = losses.chunked_lm_losses(student.hidden(ids), teacher.hidden(ids), *heads, _labels(), 2.0, 5, fused=False)
        got = losses.chunked_lm_losses(student.hidden(ids), teacher.hidden(ids), *heads, _labels(), 2.0, 5)
    assert all(_rel(a, b) < 1e-5 for a, b in zip(got, ref))
    hs, ht = student.hidden(ids).detach().requires_grad_(), teacher.hidden(ids).detach().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        losses.chunked_lm_losses(hs, ht, *heads, _labels(), 2.0, 5)
    # the gradients of the two hidden states and of the student head's weight, nothing vocabulary x tokens
    assert sorted(saved) == sorted([torch.Size([32, 8]), torch.Size([32, 12]), torch.Size([ROWS, 8])])


def test_sarkd_model_gradients_reach_the_routers_as_with_the_checkpointed_loss(monkeypatch):
    """The objective's logit mode end to end: a tiny MoE teacher (router gradient on), a tiny student
    with tied embeddings and gradient checkpointing, teacher CE with gradient."""
    v = 64
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(tiny_moe_config(v, hidden=32, experts=4, top_k=2))
    found = find_routers(teacher)
    for r in found:
        torch.nn.init.normal_(r.module.weight, std=0.5)
    rparams = freeze_all_but_routers(teacher, found)
    student = AutoModelForCausalLM.from_config(tiny_llama_config(v, hidden=32, tie_word_embeddings=True))
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ctl = RouterController(found, "straight_through")
    weights = ObjectiveWeights(temperature=2.0, router_teacher_ce_weight=0.05, kd_chunk_size=7)
    model = SARKDModel(student, teacher, ctl, rparams, weights).train()
    ids = torch.randint(0, v, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    n = float((losses.shift_labels(ids, mask) != IGN).sum())
    norms = {"kd": n, "ce": n, "tce": n}
    watched = [*rparams.values(), student.get_output_embeddings().weight, student.model.layers[0].mlp.up_proj.weight]
    results = []
    original = losses.chunked_lm_losses
    for fused in (True, False):
        monkeypatch.setattr(losses, "chunked_lm_losses", lambda *a, _f=fused, **k: original(*a, **k, fused=_f))
        out = model({"input_ids": ids, "attention_mask": mask}, norms)
        (0.5 * out["loss"]).backward()  # as accelerate does with two accumulation steps
        results.append((out["loss"].detach(), [p.grad.clone() for p in watched]))
        model.zero_grad(set_to_none=True)
    ctl.remove()
    (loss_f, grads_f), (loss_c, grads_c) = results
    assert _rel(loss_f, loss_c) < 1e-5
    for g, r in zip(grads_f, grads_c):
        assert r.abs().max() > 0 and _rel(g, r) < 1e-4
