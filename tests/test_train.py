"""End-to-end runs of the trainer and the CLI on tiny local models (CPU, offline)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import base_args
from sar_kd.cli import main
from sar_kd.config import config_from_args
from sar_kd.routers import find_routers, router_params
from sar_kd.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
STEP_KEYS = {
    "step", "loss", "kd_loss", "ce_loss", "teacher_ce", "router_anchor", "router_entropy",
    "router_load_balance", "router_grad_norm", "lr_student", "lr_router", "tokens_per_s",
}  # fmt: skip


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tiny_pair, tmp_path_factory):
    """One CLI run of 8 steps (checkpoints at 4 and 8), shared by the output checks below."""
    out = tmp_path_factory.mktemp("run") / "out"
    assert main(["train", *base_args(tiny_pair, out, train_steps=8, eval_steps=4, save_steps=4)]) == 0
    return out


def test_cli_writes_every_output(trained, tiny_pair):
    out = trained
    for f in ("student/config.json", "router_update.pt", "metrics.jsonl", "sar_kd_config.json", "summary.json"):
        assert (out / f).is_file(), f
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    tok = AutoTokenizer.from_pretrained(out / "student")
    ids = tok("To be, or not to be", return_tensors="pt")["input_ids"]
    assert student(ids).logits.shape[-1] == len(tok)

    teacher = AutoModelForCausalLM.from_pretrained(tiny_pair["teacher"])
    expected = set(router_params(teacher, find_routers(teacher)))
    update = torch.load(out / "router_update.pt", weights_only=True)
    assert set(update) == expected  # routers and nothing else
    moved = [n for n in expected if not torch.equal(update[n], teacher.state_dict()[n])]
    assert moved == sorted(expected) or set(moved) == expected

    rows = _rows(out)
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "student_ppl" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    for r in steps:
        assert set(r) >= STEP_KEYS
        assert r["router_grad_norm"] > 0
    assert [r["step"] for r in evals] == [0, 4, 8]
    for r in evals:
        assert 1 < r["student_ppl"] < 10_000 and 1 < r["teacher_ppl"] < 10_000

    cfg = json.loads((out / "sar_kd_config.json").read_text())
    assert cfg["config"]["train_steps"] == 8 and "torch" in cfg["versions"]
    for r in evals:  # router insight: per-layer expert load of the validation split
        assert len(r["expert_load"]) == 2 and all(abs(sum(layer) - 1) < 1e-3 for layer in r["expert_load"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["final_student_ppl"] == evals[-1]["student_ppl"]
    assert summary["initial_expert_load"] == evals[0]["expert_load"]


def test_checkpoints_hold_outputs_and_only_trainable_state(trained):
    for step in (4, 8):
        cp = trained / f"checkpoint-{step}"
        assert (cp / "student/model.safetensors").is_file()
        assert (cp / "router_update.pt").is_file()
        assert json.loads((cp / "trainer_state.json").read_text())["step"] == step
        state = load_file(cp / "state/model.safetensors")
        assert not any(k.startswith("teacher.") and ".mlp.gate." not in k for k in state)
        assert any(k.startswith("student.") for k in state)
    assert not list(trained.glob("*.tmp"))


def test_resume_reproduces_the_straight_run(trained, tiny_pair, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(trained, out)
    for p in ("checkpoint-8", "student", "router_update.pt", "summary.json"):
        shutil.rmtree(out / p) if (out / p).is_dir() else (out / p).unlink()
    args = base_args(tiny_pair, out, train_steps=8, eval_steps=4, save_steps=4, resume_from_checkpoint="latest")
    assert main(["train", *args]) == 0
    a = load_file(trained / "student/model.safetensors")
    b = load_file(out / "student/model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    ua = torch.load(trained / "router_update.pt", weights_only=True)
    ub = torch.load(out / "router_update.pt", weights_only=True)
    for k in ua:
        assert torch.allclose(ua[k], ub[k], atol=1e-6)
    ra = [r for r in _rows(trained) if "loss" in r]
    rb = [r for r in _rows(out) if "loss" in r]
    assert [r["step"] for r in rb] == list(range(1, 9))
    for x, y in zip(ra, rb):
        for key in ("loss", "kd_loss", "ce_loss", "router_entropy", "router_grad_norm"):
            assert abs(x[key] - y[key]) <= 1e-6 * max(1.0, abs(x[key])), (key, x, y)
    ea = [r for r in _rows(trained) if "student_ppl" in r]
    eb = [r for r in _rows(out) if "student_ppl" in r]
    assert [r["step"] for r in eb] == [0, 4, 8]
    assert abs(ea[-1]["student_ppl"] - eb[-1]["student_ppl"]) < 1e-4


def test_apply_router_writes_adapted_teacher(trained, tiny_pair, tmp_path):
    dest = tmp_path / "adapted"
    rc = main(["apply-router", "--teacher_model", tiny_pair["teacher"], "--router_update",
               str(trained / "router_update.pt"), "--output_dir", str(dest)])  # fmt: skip
    assert rc == 0
    orig = AutoModelForCausalLM.from_pretrained(tiny_pair["teacher"]).state_dict()
    adapted = AutoModelForCausalLM.from_pretrained(dest).state_dict()
    update = torch.load(trained / "router_update.pt", weights_only=True)
    assert set(orig) == set(adapted)
    for k in orig:
        if k in update:
            assert torch.equal(adapted[k], update[k].to(adapted[k].dtype))
            assert not torch.equal(adapted[k], orig[k])
        else:
            assert torch.equal(adapted[k], orig[k]), k
    assert AutoTokenizer.from_pretrained(dest) is not None


def test_apply_router_rejects_foreign_tensors(trained, tiny_pair, tmp_path):
    update = torch.load(trained / "router_update.pt", weights_only=True)
    update["model.layers.0.mlp.experts.gate_up_proj"] = torch.zeros(1)
    bad = tmp_path / "bad.pt"
    torch.save(update, bad)
    rc = main(["apply-router", "--teacher_model", tiny_pair["teacher"], "--router_update", str(bad),
               "--output_dir", str(tmp_path / "x")])  # fmt: skip
    assert rc == 2 and not (tmp_path / "x").exists()


def test_only_routers_change_in_the_teacher(tiny_pair, tmp_path):
    cfg = config_from_args(base_args(tiny_pair, tmp_path / "o", train_steps=3, eval_steps=0, save_steps=0))
    trainer = Trainer(cfg)
    trainer.setup()
    teacher = trainer.model.teacher
    before = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
    trainer.train()
    trainer.controller.remove()
    names = set(trainer.model.router_params)
    after = teacher.state_dict()
    for k, v in before.items():
        if k in names:
            assert not torch.equal(v, after[k]), f"router {k} did not move"
        else:
            assert torch.equal(v, after[k]), f"frozen {k} changed"
    assert {n for n, p in teacher.named_parameters() if p.requires_grad} == names


def test_accumulation_is_normalised_by_tokens(tiny_pair, tmp_path):
    """batch 2 x accum 1 and batch 1 x accum 2 see the same blocks and must give the same gradients.

    (The load-balance penalty is a per-micro-batch statistic, so it is switched off here.)
    """
    results = []
    for bs, acc in ((2, 1), (1, 2)):
        cfg = config_from_args(base_args(tiny_pair, tmp_path / f"o{bs}", train_steps=1, eval_steps=0, save_steps=0,
                                         per_device_batch_size=bs, grad_accum_steps=acc, max_grad_norm=0,
                                         router_load_balance_weight=0))  # fmt: skip
        t = Trainer(cfg)
        t.setup()
        t.optimizer.step = lambda *a, **k: None  # keep the accumulated gradients to compare them
        t.optimizer.zero_grad = lambda *a, **k: None
        m = t.train_step()
        t.controller.remove()
        grads = {n: p.grad.clone() for n, p in t.model.named_parameters() if p.requires_grad}
        results.append((m, grads))
    (m1, g1), (m2, g2) = results
    assert abs(m1["loss"] - m2["loss"]) < 1e-6
    assert abs(m1["router_grad_norm"] - m2["router_grad_norm"]) < 1e-6 * max(1.0, m1["router_grad_norm"])
    for k in g1:
        assert torch.allclose(g1[k], g2[k], rtol=1e-4, atol=1e-7), k


def test_scheduler_is_sized_in_optimizer_steps(tiny_pair, tmp_path):
    out = tmp_path / "sched"
    args = base_args(tiny_pair, out, train_steps=4, grad_accum_steps=3, per_device_batch_size=1, eval_steps=0,
                     save_steps=0, use_scheduler=True, warmup_steps=1, scheduler_type="linear")  # fmt: skip
    assert main(["train", *args]) == 0
    lrs = [r["lr_student"] for r in _rows(out) if "loss" in r]
    # warm-up step 0 -> lr 0, then linear decay to 0 over the remaining 3 optimizer steps
    assert lrs == pytest.approx([0.0, 1e-3, 1e-3 * 2 / 3, 1e-3 / 3])


def test_teacher_layers_are_checkpointed_although_frozen(tiny_pair, tmp_path):
    counts = {}
    for gc in (True, False):
        cfg = config_from_args(base_args(tiny_pair, tmp_path / f"gc{gc}", no_gradient_checkpointing=not gc))
        assert cfg.gradient_checkpointing is gc
        t = Trainer(cfg)
        t.setup()
        teacher = t.model.teacher
        layer = teacher.model.layers[0]
        assert layer.self_attn.training is False  # no dropout / jitter in the teacher
        n = [0]

        def pack(x, n=n):
            n[0] += x.numel()
            return x

        ids = next(iter(t.stream))["input_ids"]
        t.controller.active = True
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            t.model._teacher_body(ids, None)
        t.controller.remove()
        counts[gc] = n[0]
    assert counts[True] < counts[False] / 2


def test_train_script_runs_as_the_spec_shows(tiny_pair, tmp_path):
    out = tmp_path / "script"
    args = base_args(tiny_pair, out, train_steps=1, eval_steps=1, save_steps=0)
    args += ["--temperature", "2.0", "--alpha_kd", "0.9", "--alpha_ce", "0.1", "--router_anchor_weight", "1e-4",
             "--router_load_balance_weight", "1e-3", "--router_entropy_weight", "1e-4",
             "--router_patterns", "gate", "router"]  # fmt: skip
    r = subprocess.run([sys.executable, str(ROOT / "train_sar_kd.py"), *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "student/config.json").is_file() and (out / "router_update.pt").is_file()
    assert "Qwen3MoeTopKRouter" in r.stderr  # the discovery table is logged


def test_plot_renders_the_run(trained, tmp_path):
    png = tmp_path / "curves.png"
    assert main(["plot", str(trained), "--png", str(png)]) == 0
    assert png.stat().st_size > 20_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_save_total_limit_keeps_the_newest(tiny_pair, tmp_path):
    out = tmp_path / "limited"
    args = base_args(tiny_pair, out, train_steps=6, save_steps=2, eval_steps=0, save_total_limit=2)
    assert main(["train", *args]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]


def test_killed_mid_save_leaves_previous_checkpoint(tiny_pair, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    cfg = config_from_args(base_args(tiny_pair, out, train_steps=4, save_steps=2, eval_steps=0))
    trainer = Trainer(cfg)
    real_save = Trainer.save_outputs
    calls = []

    def dying_save(self, where):
        calls.append(where)
        if self.step == 4:
            real_save(self, where)
            raise KeyboardInterrupt("killed while writing checkpoint-4")
        real_save(self, where)

    monkeypatch.setattr(Trainer, "save_outputs", dying_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (out / "checkpoint-4").exists()  # only the temporary directory was being written
    from sar_kd.checkpointing import resolve_checkpoint

    assert resolve_checkpoint(str(out), "latest").name == "checkpoint-2"
    monkeypatch.setattr(Trainer, "save_outputs", real_save)
    assert main(["train", *base_args(tiny_pair, out, train_steps=4, save_steps=2, eval_steps=0,
                                     resume_from_checkpoint="latest")]) == 0  # fmt: skip
    assert (out / "checkpoint-4" / "trainer_state.json").is_file() and not list(out.glob("*.tmp"))


def test_bf16_on_cpu_keeps_fp32_masters(tiny_pair, tmp_path):
    cfg = config_from_args(base_args(tiny_pair, tmp_path / "bf16", model_dtype="bfloat16", train_steps=2, eval_steps=2,
                                     save_steps=0))  # fmt: skip
    trainer = Trainer(cfg)
    trainer.setup()
    teacher = trainer.model.teacher
    routers_ = set(trainer.model.router_params)
    for n, p in teacher.named_parameters():
        assert p.dtype == (torch.float32 if n in routers_ else torch.bfloat16), n
    assert all(p.dtype == torch.float32 for p in trainer.model.student.parameters())
    summary = trainer.train()
    trainer.controller.remove()
    rows = [r for r in _rows(tmp_path / "bf16") if "loss" in r]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["router_grad_norm"] > 0 for r in rows)
    assert 1 < summary["final_student_ppl"] < 10_000


def test_tensorboard_tracker_writes_events(tiny_pair, tmp_path):
    out = tmp_path / "tb"
    assert main(["train", *base_args(tiny_pair, out, train_steps=2, eval_steps=2, save_steps=0,
                                     report_to="tensorboard")]) == 0  # fmt: skip
    events = list(out.rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_non_finite_step_is_skipped_and_counted(tiny_pair, tmp_path, monkeypatch):
    from sar_kd.objective import SARKDModel

    real_forward = SARKDModel.forward
    calls = [0]

    def poisoned(self, batch, norms):
        out = real_forward(self, batch, norms)
        calls[0] += 1
        if calls[0] == 3:  # the first micro-batch of step 2
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(SARKDModel, "forward", poisoned)
    out = tmp_path / "nan"
    cfg = config_from_args(base_args(tiny_pair, out, train_steps=3, eval_steps=0, save_steps=0))
    trainer = Trainer(cfg)
    trainer.setup()
    before = {k: v.clone() for k, v in trainer.model.student.state_dict().items()}
    trainer.train_step()
    after_1 = {k: v.clone() for k, v in trainer.model.student.state_dict().items()}
    m2 = trainer.train_step()
    after_2 = trainer.model.student.state_dict()
    trainer.controller.remove()
    assert m2["skipped_steps"] == 1
    assert any(not torch.equal(before[k], after_1[k]) for k in before)  # step 1 was applied
    assert all(torch.equal(after_1[k], after_2[k]) for k in after_1)  # step 2 was dropped, no NaN applied
    assert all(torch.isfinite(v).all() for v in after_2.values())


def test_native_mode_warns_that_top1_routing_gives_no_gradient(tiny_pair, tmp_path, caplog):
    cfg = config_from_args(base_args(tiny_pair, tmp_path / "native", router_grad="native", train_steps=1,
                                     eval_steps=0, save_steps=0, router_anchor_weight=0, router_entropy_weight=0,
                                     router_load_balance_weight=0))  # fmt: skip
    trainer = Trainer(cfg)
    with caplog.at_level("WARNING", logger="sar_kd"):
        trainer.setup()
    assert any("NO gradient" in r.message for r in caplog.records)
    m = trainer.train_step()
    trainer.controller.remove()
    assert m["router_grad_norm"] < 1e-6  # and indeed: nothing reaches the routers


def test_dual_mode_refuses_slow_tokenizers(tiny_pair, dual_pair, tmp_path, monkeypatch, capsys):
    import sar_kd.trainer as tr

    real = tr.load_tokenizer

    def slow(name, role, trust):
        tok = real(name, role, trust)
        if role == "student":
            monkeypatch.setattr(type(tok), "is_fast", property(lambda self: False))
        return tok

    monkeypatch.setattr(tr, "load_tokenizer", slow)
    rc = main(["train", *base_args(dual_pair, tmp_path / "slow", block_size=64)])
    assert rc == 2 and "slow (Python) tokenizer" in capsys.readouterr().err


def test_router_update_is_written_as_safetensors_with_its_metadata(trained, tiny_pair, tmp_path):
    # issue 18 item 11: the router update was only a pickle (router_update.pt, read with torch.load)
    import collections

    from safetensors import safe_open

    from sar_kd import __version__

    path = trained / "router_update.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        update = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_pair["teacher"])
    found = find_routers(teacher)
    assert set(update) == set(router_params(teacher, found))
    legacy = torch.load(trained / "router_update.pt", weights_only=True)
    assert all(torch.equal(update[k], legacy[k]) for k in legacy)
    assert meta["sar_kd_version"] == __version__ and meta["teacher_model"] == tiny_pair["teacher"]
    assert json.loads(meta["router_names"]) == [r.name for r in found] and json.loads(meta["router_patterns"]) is None
    assert (trained / "checkpoint-8" / "router_update.safetensors").is_file()

    # apply-router reads it (and gives what the .pt gives)
    for name in ("router_update.safetensors", "router_update.pt"):
        dest = tmp_path / name
        rc = main(["apply-router", "--teacher_model", tiny_pair["teacher"], "--router_update", str(trained / name),
                   "--output_dir", str(dest)])  # fmt: skip
        assert rc == 0
        adapted = AutoModelForCausalLM.from_pretrained(dest).state_dict()
        assert all(torch.equal(adapted[k], update[k].to(adapted[k].dtype)) for k in update)

    # a .pt is read with weights_only=True: a pickle of anything but tensors is refused, never run
    evil = tmp_path / "evil.pt"
    torch.save({"x": collections.OrderedDict(a=torch.zeros(1)), "y": collections.Counter()}, evil)
    rc = main(["apply-router", "--teacher_model", tiny_pair["teacher"], "--router_update", str(evil),
               "--output_dir", str(tmp_path / "no")])  # fmt: skip
    assert rc == 2 and not (tmp_path / "no").exists()
