"""Benchmark: the sampled all-experts router gradient (``--router_grad_samples M``) against M.

For a Qwen3-MoE teacher with random weights (64 experts, top-8), one "step" is the teacher's
forward with the router hook + CE on random token ids + backward to the routers. Per estimator:

* ``cos_mean`` / ``cos_min``: cosine similarity of the router-weight gradient (all layers, summed over
  the step's tokens) to the all-experts gradient (M = 0) of the same batch, over ``--draws`` draws
  on each of ``--steps`` batches; ``cos_of_draw_mean``: that of the mean of a batch's draws (an
  unbiased estimator's improves with more draws, i.e. more tokens or steps; a biased one's does not);
  ``topk_mass``: the chosen experts' share of the routing softmax (how peaked the routers are);
* ``fb_ms``: the fastest of ``--time_rounds`` teacher forward + backward passes, the estimators
  interleaved round by round (a shared machine's noise only adds), and ``vs_topk``: that over the
  top-k-only cost
  (``straight_through_topk``, which runs only the chosen experts).

Estimators: ``all`` (M = 0), ``topk`` (straight_through_topk), and M in ``--samples`` with the
baselines in ``--baselines`` (the time does not depend on the baseline).

Models (``--models``):

* ``tiny``: hidden 64, expert width 128, 2 layers, 64 experts top-8; run three times: independent
  random experts (``spread`` 1) and experts that share a common part (each expert = a shared one +
  0.3 × its own random part, as upcycled experts are), with router logits of std 1.5, and independent
  experts with more peaked routers (logit std 3);
* ``qwen3``: the default teacher's widths (sar_kd/assets/configs/huihui-moe-1b-a0.6b: hidden 1024,
  expert width 3072, 16 heads of 128) with 64 experts top-8, ``--qwen3_layers`` layers and a
  2048-token vocabulary (the vocabulary does not touch the routers);
* ``trained``: the demo's trained teacher (4 experts top-1, ``sar-kd demo`` cache) on its validation
  text, when present: how much the experts' v_i = <dL/dy, expert_i(x)> share, and the variance of the
  M = 1 estimator per baseline (closed form from every expert's v, many draws).

Prints one JSON line per (model, estimator), machine info included.
    python bench/bench_router_samples.py [--models tiny qwen3 trained] [--tokens 256]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from sar_kd.router_grad import BASELINES, sample_other_experts, sampled_all_experts_gradient
from sar_kd.routers import RouterController, find_routers, freeze_all_but_routers


def _machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": "cpu",
    }


def build_teacher(kind: str, layers: int, spread: float, router_std: float = 1.5, seed: int = 0):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from sar_kd.estimate import builtin_config

    if kind == "tiny":
        over = dict(hidden_size=64, moe_intermediate_size=128, intermediate_size=128, num_attention_heads=4)
        over.update(num_key_value_heads=2, head_dim=16)
    else:  # the default teacher's widths
        base = builtin_config("teacher").to_dict()
        keys = ("hidden_size", "moe_intermediate_size", "intermediate_size", "num_attention_heads")
        over = {k: base[k] for k in keys + ("num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps")}
    conf = Qwen3MoeConfig(
        vocab_size=2048 if kind == "qwen3" else 512,
        num_hidden_layers=layers,
        num_experts=64,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        **over,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(conf).eval()
    routers = find_routers(model)
    h = conf.hidden_size
    with torch.no_grad():
        for r in routers:
            r.module.weight.normal_(0, router_std / h**0.5)  # logits of about this std (fresh routers are zero)
            if spread != 1.0:
                block = model.get_submodule(r.name.rpartition(".")[0])
                for p in block.experts.parameters():
                    if p.ndim == 3 and p.shape[0] == r.num_experts:
                        p.copy_(p[:1] + spread * (p - p[:1]))
    freeze_all_but_routers(model, routers)
    return model, routers


def step(model, routers, ids, mode: str, samples: int, baseline: str, seed: int) -> tuple[torch.Tensor, float]:
    """Router-weight gradient (flattened over layers) and forward+backward seconds of one step."""
    params = [r.module.weight for r in routers]
    for p in params:
        p.grad = None
    ctl = RouterController(routers, mode, samples=samples)
    ctl.baseline = baseline
    ctl.active = True
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model(ids, labels=ids).loss.backward()
    dt = time.perf_counter() - t0
    ctl.remove()
    return torch.cat([p.grad.flatten() for p in params]).double(), dt


def bench_model(name: str, model, routers, a) -> None:
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(123)
    batches = [torch.randint(0, vocab, (1, a.tokens), generator=gen) for _ in range(a.steps)]
    for mode, m in (("straight_through_topk", 0), ("straight_through", 0), ("straight_through", a.samples[0])):
        step(model, routers, batches[0], mode, m, "none", 0)  # warm-up
    with torch.no_grad():  # how peaked the routing is: the chosen experts' share of the softmax
        mass = []
        hook = [
            r.module.register_forward_hook(
                lambda _m, _a, out: mass.append(float(out[0].float().softmax(-1).topk(8, -1).values.sum(-1).mean()))
            )
            for r in routers
        ]
        model(batches[0])
        for h in hook:
            h.remove()
        topk_mass = round(statistics.fmean(mass), 3)
    # timing: the arms interleaved round by round (a shared machine's load drifts), the fastest kept
    timed = [("all", "straight_through", 0), ("topk", "straight_through_topk", 0)]
    timed += [(f"M={m}", "straight_through", m) for m in a.samples]
    times: dict[str, list[float]] = {label: [] for label, _, _ in timed}
    for r in range(a.time_rounds):
        for label, mode, m in timed:
            times[label].append(step(model, routers, batches[0], mode, m, "shrunk", 500 + r)[1])
    if a.time_only:
        topk = min(times["topk"])
        for label, _mode, m in timed:
            row = {"bench": "router_samples_time", "model": name, "estimator": label, "samples": m}
            row.update(fb_ms=round(1000 * min(times[label]), 1), vs_topk=round(min(times[label]) / topk, 2))
            row.update(rounds=a.time_rounds, tokens=a.tokens, layers=model.config.num_hidden_layers)
            print(json.dumps({**row, **_machine()}), flush=True)
        return
    refs = [step(model, routers, ids, "straight_through", 0, "none", 0)[0] for ids in batches]
    arms = [("all", "straight_through", 0, "none"), ("topk", "straight_through_topk", 0, "none")]
    arms += [(f"M={m}/{b}", "straight_through", m, b) for m in a.samples for b in a.baselines]
    for label, mode, m, baseline in arms:
        cos, cos_avg = [], []
        for i, ids in enumerate(batches):
            gs = []
            for d in range(1 if mode != "straight_through" or m == 0 else a.draws):
                g, _ = step(model, routers, ids, mode, m, baseline, 1000 * i + d + 1)
                gs.append(g)
                cos.append(float(torch.nn.functional.cosine_similarity(g, refs[i], dim=0)))
            avg = torch.stack(gs).mean(0)
            cos_avg.append(float(torch.nn.functional.cosine_similarity(avg, refs[i], dim=0)))
        key = label.split("/")[0]
        row = {
            "bench": "router_samples",
            "model": name,
            "estimator": label,
            "samples": m,
            "baseline": baseline if m else None,
            "experts_per_token": 8 + m
            if mode == "straight_through" and m
            else (8 if mode != "straight_through" else 64),
            "cos_mean": round(statistics.fmean(cos), 4),
            "cos_min": round(min(cos), 4),
            "cos_of_draw_mean": round(statistics.fmean(cos_avg), 4),
            "n": len(cos),
            "fb_ms": round(1000 * min(times[key]), 1),
            "vs_topk": round(min(times[key]) / min(times["topk"]), 2),
            "tokens": a.tokens,
            "topk_mass": topk_mass,
            "layers": model.config.num_hidden_layers,
            **_machine(),
        }
        print(json.dumps(row), flush=True)


def bench_trained(a) -> None:
    """The demo's trained teacher: do the experts' v share a common part? Variance per baseline, M = 1."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    roots = sorted(Path(a.demo_cache).glob("same-*/teacher")) if Path(a.demo_cache).is_dir() else []
    if not roots:
        print(json.dumps({"bench": "router_samples_trained", "skipped": f"no demo teacher under {a.demo_cache}"}))
        return
    path = roots[0]
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    text = (path.parent / "val.txt").read_text()[:20000]
    ids = torch.tensor(tok(text)["input_ids"][: a.tokens * 4]).view(4, -1)
    routers = find_routers(model)
    freeze_all_but_routers(model, routers)
    ctl = RouterController(routers, "straight_through")
    ctl.active = True
    kept = []

    def keep(_m, _a, out):
        out[1].retain_grad()
        kept.append((out[0].detach(), out[1]))

    handles = [r.module.register_forward_hook(keep) for r in routers]
    model(ids, labels=ids).loss.backward()
    for h in handles:
        h.remove()
    ctl.remove()
    spec = ctl.specs[id(routers[0].module)]
    for layer, ((z, w), r) in enumerate(zip(kept, routers)):
        v = w.grad.double()  # (T, E): every expert's v (all-experts mode returns all E weights)
        native = w.detach()
        idx = native.float().topk(r.top_k, -1).indices
        scores = native.float().gather(-1, idx)
        centred = v - v.mean(-1, keepdim=True)
        shared = 1 - float(centred.pow(2).sum() / (v - v.mean()).pow(2).sum())
        corr = torch.corrcoef(v.T.float())
        off = corr[~torch.eye(v.shape[1], dtype=torch.bool)]
        row = {
            "bench": "router_samples_trained",
            "model": str(path),
            "layer": layer,
            "experts": v.shape[1],
            "top_k": r.top_k,
            "v_share_common": round(shared, 3),  # fraction of v's variance that is the per-token mean over experts
            "v_corr_between_experts": round(float(off.mean()), 3),
        }
        for b in BASELINES:
            torch.manual_seed(0)
            gs = torch.stack(
                [
                    sampled_all_experts_gradient(
                        z, v.float(), idx, *sample_other_experts(z, idx, 1, spec), scores, spec, b
                    ).double()
                    for _ in range(a.trained_draws)
                ]
            )
            row[f"var_{b}"] = float(gs.var(0).sum())
        print(json.dumps({**row, **_machine()}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["tiny", "qwen3", "trained"])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--qwen3_tokens", type=int, default=128)
    p.add_argument("--qwen3_layers", type=int, default=2)
    p.add_argument("--qwen3_router_std", type=float, default=2.0, help="std of the qwen3 model's router logits")
    p.add_argument("--steps", type=int, default=2, help="batches")
    p.add_argument("--draws", type=int, default=4, help="draws per batch for each sampled estimator")
    p.add_argument("--samples", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--baselines", nargs="+", default=["shrunk", "mean", "none"], choices=BASELINES)
    p.add_argument("--demo_cache", default=str(Path.home() / ".cache" / "sar_kd" / "demo"))
    p.add_argument("--trained_draws", type=int, default=300)
    p.add_argument("--time_rounds", type=int, default=3, help="interleaved timing rounds (fastest kept)")
    p.add_argument("--time_only", action="store_true", help="only the timing (no gradient-quality draws)")
    a = p.parse_args()
    for kind in a.models:
        if kind == "trained":
            bench_trained(a)
            continue
        if kind == "tiny":
            for spread, std in ((1.0, 1.5), (0.3, 1.5), (1.0, 3.0)):
                model, routers = build_teacher("tiny", 2, spread, std)
                bench_model(f"tiny64e-top8-spread{spread:g}-logitstd{std:g}", model, routers, a)
        else:
            model, routers = build_teacher("qwen3", a.qwen3_layers, 1.0, a.qwen3_router_std)
            tokens, a.tokens = a.tokens, a.qwen3_tokens
            bench_model(f"qwen3-widths-64e-top8-{a.qwen3_layers}L", model, routers, a)
            a.tokens = tokens
            del model


if __name__ == "__main__":
    main()
