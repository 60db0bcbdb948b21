"""Memory estimate of a SAR-KD run from model configs alone (no weights are downloaded or allocated).

Parameter counts come from building both models on PyTorch's ``meta`` device. Activations follow a
per-token count of the tensors a decoder layer keeps for its backward pass (flash-style attention,
no T×T matrix); checkpointed layers keep only their input, plus one layer recomputed at a time.
The numbers are validated against measured peaks (``bench/validate_estimate.py``, docs/memory.md).
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

from .config import DEFAULT_STUDENT, DEFAULT_TEACHER, ConfigError, gguf_source, model_name
from .routers import num_experts_of

BUILTIN = {
    "teacher": ("huihui-moe-1b-a0.6b", DEFAULT_TEACHER),
    "student": ("smollm-135m", DEFAULT_STUDENT),
}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
GB = 1024**3
# CUDA context, cuBLAS workspaces and allocator slack, seen on current GPUs (not part of the CPU check).
CUDA_OVERHEAD_BYTES = int(0.75 * GB)
GPU_SIZES_GB = (6, 8, 12, 16, 24, 40, 80)
TABLE_BLOCKS = (256, 512, 1024, 2048)


# Big MoE teachers people distil from, vendored (config.json only) so that the estimate answers
# "which GPUs do I need" offline: hub id -> folder in sar_kd/assets/configs.
VENDORED = {
    DEFAULT_TEACHER: "huihui-moe-1b-a0.6b",
    DEFAULT_STUDENT: "smollm-135m",
    "allenai/OLMoE-1B-7B-0924": "olmoe-1b-7b",
    "Qwen/Qwen3-30B-A3B": "qwen3-30b-a3b",
    "mistralai/Mixtral-8x7B-v0.1": "mixtral-8x7b",
}
BIG_TEACHERS = ("allenai/OLMoE-1B-7B-0924", "Qwen/Qwen3-30B-A3B", "mistralai/Mixtral-8x7B-v0.1")


def _vendored_config(folder: str):
    from transformers import AutoConfig

    path = resources.files("sar_kd.assets").joinpath("configs").joinpath(folder)
    with resources.as_file(path) as p:
        return AutoConfig.from_pretrained(str(p))


def builtin_config(role: str):
    """The vendored config of the default teacher or student (works offline)."""
    return _vendored_config(BUILTIN[role][0])


def resolve_config(name: str, role: str, gguf_file: str | None = None):
    """A model config from a local dir, hub id or GGUF file (a ``.gguf`` path, or a folder and ``gguf_file``:
    read from the file's metadata, no tensor is read); vendored hub ids (the default pair,
    :data:`BIG_TEACHERS`) use the bundled copy (no network)."""
    import sys

    from .loading import load_config

    if name in VENDORED and gguf_file is None:
        print(f"{role} {name}: using the bundled config (sar_kd/assets/configs, no download)", file=sys.stderr)
        return _vendored_config(VENDORED[name])
    return load_config(name, role, gguf_file=gguf_file)


@dataclass
class ModelCounts:
    params: int  # unique parameters (tied weights once)
    router_params: int
    layers: int
    hidden: int
    layer_elements: float  # elements the largest decoder layer keeps per token for its backward (training forward)
    vocab: int
    all_layer_elements: float = 0.0  # the same, summed over all decoder layers (dense and MoE layers differ)
    max_layer_params: int = 0  # parameters of the largest decoder layer (one FSDP unit)
    root_params: int = 0  # parameters outside the decoder layers (embeddings, final norm, LM head)


@dataclass
class LayerMLP:
    """The feed-forward part of one decoder layer, by intermediate width (0: absent)."""

    dense: int  # a plain MLP (a dense layer of an MoE model, or any layer of a dense model)
    expert: int = 0  # each routed expert's width
    shared: int = 0  # the shared expert(s), run for every token, as one MLP of this width


def layer_mlps(conf) -> list[LayerMLP]:
    """Per decoder layer, the MLPs it holds, following the families' own rules: DeepSeek-style
    ``first_k_dense_replace`` leading dense layers and ``n_shared_experts`` shared experts of
    ``moe_intermediate_size`` each; Qwen2/3-MoE ``mlp_only_layers`` and ``decoder_sparse_step``;
    Qwen2-MoE ``shared_expert_intermediate_size``; GraniteMoE-shared ``shared_intermediate_size``."""
    n = conf.num_hidden_layers
    if not num_experts_of(conf):
        return [LayerMLP(dense=conf.intermediate_size) for _ in range(n)]
    expert = getattr(conf, "moe_intermediate_size", None) or conf.intermediate_size
    shared = getattr(conf, "shared_expert_intermediate_size", 0) or getattr(conf, "shared_intermediate_size", 0) or 0
    shared = shared or (getattr(conf, "n_shared_experts", 0) or 0) * expert
    only_mlp = set(getattr(conf, "mlp_only_layers", None) or ())
    step = getattr(conf, "decoder_sparse_step", None) or 1
    first_dense = getattr(conf, "first_k_dense_replace", None) or 0
    layers = []
    for i in range(n):
        if i in only_mlp or (i + 1) % step != 0 or i < first_dense:
            layers.append(LayerMLP(dense=conf.intermediate_size))
        else:
            layers.append(LayerMLP(dense=0, expert=expert, shared=shared))
    return layers


def _layer_elements(conf, mlp: LayerMLP, experts_run: int | None = None) -> float:
    h = conf.hidden_size
    nh = conf.num_attention_heads
    hd = getattr(conf, "head_dim", None) or h // nh
    nkv = getattr(conf, "num_key_value_heads", None) or nh
    q, kv = nh * hd, nkv * hd
    # norms (fp32 copy + output) x2, q/k/v, rotary q/k and halves, q/k norms, SDPA q/k/v/out, o_proj input
    attn = 4 * h + 3 * q + 2 * kv + 2 * (q + kv) + (q + kv) + (2 * q + 2 * kv) + q
    ffn = 5 * mlp.dense + 5 * mlp.shared  # gate, up, act in/out, product of each plain MLP
    if mlp.expert:
        e = num_experts_of(conf)
        k = experts_run or getattr(conf, "num_experts_per_tok", 1) or 1
        # router logits + fp32 probs; per chosen expert: gathered input, gate_up, act in/out, product, out, weighted
        ffn += 2 * e + k * (3 * h + 2 * mlp.expert + 3 * mlp.expert)
    return float(attn + ffn)


def count_model(conf, all_experts: bool = False, samples: int = 0) -> ModelCounts:
    """Parameter and activation counts of a causal LM config, built on the meta device.

    ``all_experts``: every expert runs for every token (``straight_through``/``dense`` training);
    ``samples`` (``--router_grad_samples``, -1 auto): with it, only top_k + M experts do."""
    import torch
    from transformers import AutoModelForCausalLM

    from .routers import find_routers

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf)
    params = sum(p.numel() for p in model.parameters())
    from .sharding import decoder_layers

    layer_sizes = [sum(p.numel() for p in layer.parameters()) for layer in decoder_layers(model)]
    try:
        routers = find_routers(model)
        router_params = sum(p.numel() for r in routers for p in r.module.parameters(recurse=False))
        moe = True
    except ConfigError:
        router_params, moe = 0, False
    # the training forward of the teacher: every expert runs with the default router gradient
    run = num_experts_of(conf) if (moe and all_experts) else None
    if run and samples:  # the sampled all-experts gradient: the chosen experts and M others
        from .router_grad import resolve_samples

        k = getattr(conf, "num_experts_per_tok", 1) or 1
        m = resolve_samples(samples, run, k)
        run = k + m if m else run
    per_layer = [_layer_elements(conf, mlp, run) for mlp in layer_mlps(conf)]
    return ModelCounts(
        params=params,
        router_params=router_params,
        layers=conf.num_hidden_layers,
        hidden=conf.hidden_size,
        layer_elements=max(per_layer),
        vocab=conf.vocab_size,
        all_layer_elements=sum(per_layer),
        max_layer_params=max(layer_sizes, default=0),
        root_params=params - sum(layer_sizes),
    )


def estimate_memory(
    teacher_conf,
    student_conf,
    model_dtype: str = "float32",
    block_size: int = 1024,
    batch_size: int = 1,
    mode: str = "hidden",
    gradient_checkpointing: bool = True,
    kd_chunk_size: int = 256,
    layer_pairs: int = 1,
    cuda: bool = True,
    router_grad: str = "straight_through",
    router_teacher_ce_weight: float = 0.0,
    router_grad_samples: int = -1,
    num_gpus: int = 1,
    fsdp: bool = False,
) -> dict[str, Any]:
    """Peak memory (bytes) of one training step on one GPU, by component; ``total_bytes`` is their sum.

    ``router_teacher_ce_weight`` > 0 runs the teacher's LM head in hidden (dual-tokenizer) mode too.
    ``fsdp`` over ``num_gpus``: weights, gradients (reduce-scattered after every micro-batch) and
    optimizer states are divided by ``num_gpus``;
    ``gathered_units`` adds what FSDP2 holds whole for a while: the root unit (embeddings, norms,
    LM heads, projection) for the whole step with its unsharded gradient, and two decoder layers
    (the one running and the one prefetched) of the larger model with a layer's gradient. Without
    ``fsdp`` every GPU holds both models whole (DDP), whatever ``num_gpus``."""
    samples = router_grad_samples if router_grad == "straight_through" else 0
    t = count_model(teacher_conf, all_experts=router_grad in ("straight_through", "dense"), samples=samples)
    s = count_model(student_conf)
    if t.router_params == 0:
        raise ConfigError("the teacher config has no MoE routers: SAR-KD needs an MoE teacher")
    half = model_dtype != "float32"
    wb = DTYPE_BYTES[model_dtype]  # frozen teacher weights and activations under autocast
    proj = layer_pairs * (t.hidden * s.hidden + s.hidden) if mode == "hidden" else 0
    trainable = s.params + t.router_params + proj
    tokens = batch_size * block_size
    out: dict[str, Any] = {}
    n = num_gpus if fsdp else 1
    out["teacher_weights"] = ((t.params - t.router_params) * wb + t.router_params * 4) / n
    out["student_weights"] = (s.params * 4 + proj * 4) / n
    # autocast keeps a half copy of each fp32 weight it multiplies, for the whole forward (FSDP
    # gathers the student in the compute dtype instead: no copies)
    out["autocast_weight_copies"] = s.params * 2 if half and not fsdp else 0
    out["gradients"] = trainable * 4 / n
    out["optimizer_states"] = trainable * 8 / n  # AdamW exp_avg + exp_avg_sq, fp32
    if fsdp:
        gb = wb  # parameters are gathered in the compute dtype
        root = (t.root_params + s.root_params + proj) * gb + (s.root_params + proj) * 4
        layers = 2 * max(t.max_layer_params, s.max_layer_params) * gb + s.max_layer_params * 4
        out["gathered_units"] = root + layers
    act_b = wb
    if gradient_checkpointing:
        kept = tokens * (t.layers * t.hidden + s.layers * s.hidden) * act_b
        # one layer recomputed at a time, its activations and their gradients
        recompute = 2 * tokens * max(t.layer_elements, s.layer_elements) * act_b
    else:
        kept = tokens * (t.all_layer_elements + s.all_layer_elements) * act_b
        recompute = 0
    out["activations"] = int(kept + recompute)
    chunk = min(kd_chunk_size, tokens)
    if mode == "logit":
        # one chunk of both models' logits: raw, fp32, log-softmaxes, probabilities, product, gradients
        out["logits"] = chunk * min(t.vocab, s.vocab) * 4 * 8
    elif mode == "xtok":
        # cross-tokenizer logit loss: one slice of paired positions holds both models' full-vocabulary
        # logits (raw, fp32 softmax and their gradients) and both bucketed distributions (at most the
        # smaller vocabulary's size) with theirs
        out["logits"] = chunk * (t.vocab + s.vocab) * 4 * 4 + chunk * min(t.vocab, s.vocab) * 4 * 4
    else:
        # one chunk of the student's logits for its CE; alignment matrices and pooled teacher states
        # with teacher CE, a chunk of the teacher's logits too; the two heads' chunks run one after the
        # other (each checkpointed), so the wider one sets the peak
        out["logits"] = chunk * max(s.vocab, t.vocab if router_teacher_ce_weight > 0 else 0) * 4 * 4
        out["alignment"] = batch_size * block_size * block_size * 4 * 3 + tokens * (t.hidden + s.hidden) * 4 * 3
    out["cuda_overhead"] = CUDA_OVERHEAD_BYTES if cuda else 0
    out = {k: int(v) for k, v in out.items()}
    out["total_bytes"] = sum(out.values())
    out["params"] = {"teacher": t.params, "teacher_routers": t.router_params, "student": s.params, "projection": proj}
    out["settings"] = {
        "model_dtype": model_dtype,
        "block_size": block_size,
        "per_device_batch_size": batch_size,
        "mode": mode,
        "gradient_checkpointing": gradient_checkpointing,
        "kd_chunk_size": kd_chunk_size,
        "router_grad": router_grad,
        "router_teacher_ce_weight": router_teacher_ce_weight,
        "router_grad_samples": router_grad_samples,
        "num_gpus": num_gpus,
        "fsdp": fsdp,
    }
    return out


def parse_size(text: str) -> int:
    """'16GB', '16 GiB', '80G', '12000MB' -> bytes (GB taken as GiB, as GPU vendors label cards)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([GMT]i?B?|)\s*", text, re.IGNORECASE)
    if not m:
        raise ConfigError(f"--gpu_memory {text!r}: expected a size like 16GB")
    unit = (m.group(2) or "G").upper()[0]
    return int(float(m.group(1)) * {"M": 1024**2, "G": GB, "T": 1024**4}[unit])


def _fmt(n: int) -> str:
    return f"{n / GB:7.2f} GB"


def format_estimate(est: dict[str, Any], gpu_bytes: int | None = None) -> str:
    st = est["settings"]
    lines = [
        f"SAR-KD memory estimate ({st['mode']} mode, {st['model_dtype']}, block {st['block_size']}, "
        f"batch {st['per_device_batch_size']}, checkpointing {'on' if st['gradient_checkpointing'] else 'off'}"
        + (f", FSDP over {st['num_gpus']} GPUs, per GPU)" if st.get("fsdp") else ")")
    ]
    for k, v in est.items():
        if isinstance(v, int) and k != "total_bytes" and v:
            lines.append(f"  {k.replace('_', ' '):24s}{_fmt(v)}")
    lines.append(f"  {'total':24s}{_fmt(est['total_bytes'])}")
    if gpu_bytes is not None:
        verdict = "fits" if est["total_bytes"] <= gpu_bytes else "does NOT fit"
        lines.append(f"verdict: {verdict} in {gpu_bytes / GB:.0f} GB")
    return "\n".join(lines)


TABLE_BATCHES = (1, 2, 4, 8, 16, 32)


def memory_table(teacher_conf, student_conf, mode: str = "hidden") -> str:
    """Markdown table: per GPU size and dtype, the largest block size at batch 1 and the largest
    per-device batch at block 1024 that fit (gradient checkpointing on)."""
    dtypes = ("float16", "bfloat16", "float32")
    rows = ["| GPU memory | " + " | ".join(dtypes) + " |", "|---:|" + "---|" * len(dtypes)]
    limit = min(getattr(c, "max_position_embeddings", 1 << 30) for c in (teacher_conf, student_conf))
    blocks = tuple(b for b in (256, 512, 1024, 2048, 4096, 8192) if b <= limit)
    need = {
        (d, b, n): estimate_memory(teacher_conf, student_conf, model_dtype=d, block_size=b, batch_size=n, mode=mode)[
            "total_bytes"
        ]
        for d in dtypes
        for b, n in [(b, 1) for b in blocks] + [(1024, n) for n in TABLE_BATCHES]
    }
    for gb in GPU_SIZES_GB:
        cells = []
        for d in dtypes:
            fit_blocks = [b for b in blocks if need[(d, b, 1)] <= gb * GB]
            fit_batches = [n for n in TABLE_BATCHES if need[(d, 1024, n)] <= gb * GB]
            if not fit_blocks:
                cells.append(f"does not fit (block 256 needs {need[(d, 256, 1)] / GB:.1f} GB)")
                continue
            cell = f"block ≤ {max(fit_blocks)}"
            if fit_batches:
                top = max(fit_batches)
                cell += f", batch {'≥' if top == TABLE_BATCHES[-1] else '≤'} {top} at 1024"
            else:
                cell += ", batch 1 at 1024 does not fit"
            cells.append(cell)
        rows.append(f"| {gb} GB | " + " | ".join(cells) + " |")
    return "\n".join(rows)


FSDP_GPUS = (1, 2, 4, 8)


def fsdp_table(teachers: dict[str, Any], student_conf, block_size: int = 1024, model_dtype: str = "bfloat16") -> str:
    """Markdown table: per teacher, the per-GPU memory of a run on 1 GPU (or DDP) and with --fsdp over
    2/4/8 GPUs, and the fewest GPUs of 24/40/80 GB that hold it (batch 1, checkpointing on, the
    default router gradient: every expert for 8 or fewer experts, else the sampled estimator)."""
    head = "| teacher (params) | " + " | ".join("1 GPU" if n == 1 else f"FSDP {n}" for n in FSDP_GPUS) + " |"
    head += " fewest GPUs: 24 / 40 / 80 GB |"
    rows = [head, "|---|" + "---:|" * len(FSDP_GPUS) + "---|"]
    for name, conf in teachers.items():
        mode = "logit" if conf.vocab_size == student_conf.vocab_size else "xtok"
        need = {
            n: estimate_memory(
                conf, student_conf, model_dtype=model_dtype, block_size=block_size, mode=mode, num_gpus=n, fsdp=n > 1
            )["total_bytes"]  # fmt: skip
            for n in FSDP_GPUS
        }
        params = count_model(conf).params
        fewest = []
        for gb in (24, 40, 80):
            fits = [n for n in FSDP_GPUS if need[n] <= gb * GB]
            fewest.append(str(min(fits)) if fits else f"> {FSDP_GPUS[-1]}")
        cells = " | ".join(f"{need[n] / GB:.1f} GB" for n in FSDP_GPUS)
        rows.append(f"| {name} ({params / 1e9:.1f} B) | {cells} | {' / '.join(fewest)} |")
    return "\n".join(rows)


def estimate_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="sar-kd estimate",
        description="Estimate the GPU memory of a SAR-KD run from the model configs (nothing is downloaded "
        "but the configs; the default pair works offline).",
    )
    p.add_argument("--teacher_model", default=DEFAULT_TEACHER, help="hub id, local directory or .gguf file")
    p.add_argument("--student_model", default=DEFAULT_STUDENT, help="hub id, local directory or .gguf file")
    p.add_argument(
        "--teacher_gguf_file",
        default=None,
        help="the teacher's .gguf file inside the --teacher_model folder (its weights are counted dequantised, "
        "as training holds them)",
    )
    p.add_argument(
        "--student_gguf_file", default=None, help="the student's .gguf file inside the --student_model folder"
    )
    p.add_argument("--model_dtype", default="float32", choices=tuple(DTYPE_BYTES))
    p.add_argument("--block_size", type=int, default=1024)
    p.add_argument("--per_device_batch_size", type=int, default=1)
    p.add_argument("--kd_chunk_size", type=int, default=256)
    p.add_argument(
        "--mode",
        default="auto",
        choices=("auto", "logit", "xtok", "hidden"),
        help="auto: xtok (dual-tokenizer, cross-tokenizer logit loss: --dual_loss logit, the default) when the "
        "vocabulary sizes differ, else logit; hidden: dual-tokenizer with --dual_loss hidden",
    )
    p.add_argument("--no_gradient_checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument(
        "--router_grad",
        default="straight_through",
        choices=("straight_through", "straight_through_topk", "dense", "native"),
        help="as for training: straight_through and dense run every expert while training",
    )
    p.add_argument(
        "--router_grad_samples",
        type=int,
        default=-1,
        help="as for training: straight_through runs top_k + M experts per token instead of all (-1: auto)",
    )
    p.add_argument(
        "--router_teacher_ce_weight",
        type=float,
        default=0.0,
        help="as for training: > 0 runs the teacher's LM head in dual-tokenizer mode too",
    )
    p.add_argument("--num_gpus", type=int, default=1, help="GPUs the run uses (with --fsdp: shards over them).")
    p.add_argument("--fsdp", action="store_true", help="as for training: FSDP2 shards both models over --num_gpus")
    p.add_argument(
        "--fsdp_table",
        action="store_true",
        help="Print the README table of per-GPU memory on 1-8 GPUs for the vendored big teachers "
        "(OLMoE-1B-7B, Qwen3-30B-A3B, Mixtral-8x7B) and --teacher_model, with --student_model.",
    )
    p.add_argument("--gpu_memory", default=None, help="Give a verdict for this GPU size, e.g. 16GB.")
    p.add_argument("--json", action="store_true", help="Print one JSON object (with total_bytes).")
    p.add_argument("--table", action="store_true", help="Print the README table of block sizes per GPU size.")
    a = p.parse_args(argv)
    if a.block_size <= 0 or a.per_device_batch_size <= 0 or a.num_gpus <= 0:
        raise ConfigError("--block_size, --per_device_batch_size and --num_gpus must be > 0")
    if a.fsdp and a.num_gpus < 2:
        raise ConfigError("--fsdp shards over processes: give --num_gpus 2 or more")
    for role in ("teacher", "student"):  # a bad GGUF name fails before any config is read
        gguf_source(getattr(a, f"{role}_model"), getattr(a, f"{role}_gguf_file"), role)
    t_conf = resolve_config(a.teacher_model, "teacher", a.teacher_gguf_file)
    s_conf = resolve_config(a.student_model, "student", a.student_gguf_file)
    mode = a.mode if a.mode != "auto" else ("logit" if t_conf.vocab_size == s_conf.vocab_size else "xtok")
    if a.table:
        print(memory_table(t_conf, s_conf, mode))
        return 0
    if a.fsdp_table:
        label = model_name(a.teacher_model, a.teacher_gguf_file)
        names = (label, *(n for n in BIG_TEACHERS if n != label))
        teachers = {n: t_conf if n == label else resolve_config(n, "teacher") for n in names}
        print(fsdp_table(teachers, s_conf, a.block_size, a.model_dtype))
        return 0
    gpu = parse_size(a.gpu_memory) if a.gpu_memory else None
    est = estimate_memory(
        t_conf,
        s_conf,
        model_dtype=a.model_dtype,
        block_size=a.block_size,
        batch_size=a.per_device_batch_size,
        mode=mode,
        gradient_checkpointing=a.gradient_checkpointing,
        kd_chunk_size=a.kd_chunk_size,
        router_grad=a.router_grad,
        router_teacher_ce_weight=a.router_teacher_ce_weight,
        router_grad_samples=a.router_grad_samples,
        num_gpus=a.num_gpus,
        fsdp=a.fsdp,
    )
    if a.json:
        if gpu is not None:
            est["gpu_memory_bytes"] = gpu
            est["fits"] = est["total_bytes"] <= gpu
        print(json.dumps(est))
    else:
        print(format_estimate(est, gpu))
    return 0
