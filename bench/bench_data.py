"""Benchmark: memory and start-up time of the data path, 1x and 20x the corpus, streamed or not.

A tiny teacher/student pair (same byte-level BPE tokenizer: logit mode) trains a few steps on WikiText-2
(the vendored validation split, 1.1 MB) repeated 1x and 20x. Each run is a fresh subprocess that reports

* ``peak_rss_mb``: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at the end (the whole process:
  Python, torch, transformers, the models, the data);
* ``data_setup_s``: the Trainer's data setup alone (loading, tokenisation or the cache, packing; with
  --streaming the validation blocks and the first training blocks);
* ``setup_s``: the whole ``Trainer.setup`` (models too);
* ``first_step_s``: from building the Trainer to the end of the first optimizer step (data loading,
  tokenisation or the `datasets` cache, packing, the shuffle buffer's first fill, one step).

Runs: ``--streaming`` at 1x and 20x; without it at 1x and 20x, each twice, first with an empty `datasets`
cache (``uncached``: Arrow build + tokenisation) and then again (``cached``: both read back).
Target: the streamed 20x run within +10 % of the streamed 1x run's peak RSS.

    python bench/bench_data.py [--scales 1 20] [--steps 3] [--block_size 128] [--work /tmp/sar_kd_bench_data]

Prints one JSON line per run and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def prepare(work: Path, scales: list[int]) -> dict[str, str]:
    """The tiny pair and one corpus per scale, under ``work`` (built once)."""
    from fixture_files import wikitext_text
    from sar_kd.toy import save_random_model, tiny_llama_config, tiny_moe_config, train_bpe_tokenizer

    text = wikitext_text()
    lines = text.splitlines()
    paths = {}
    for n in scales:
        f = work / f"wikitext_x{n}.txt"
        if not f.exists():
            f.write_text(text * n)
        paths[f"x{n}"] = str(f)
    val = work / "val.txt"
    val.write_text("\n".join(lines[:300]) + "\n")
    pair = work / "pair"
    if not (pair / "student" / "config.json").exists():
        tok = train_bpe_tokenizer(lines[:3000], 2048, pair / "tok")
        save_random_model(tiny_moe_config(len(tok)), pair / "teacher", seed=1, tokenizer=tok)
        save_random_model(tiny_llama_config(len(tok)), pair / "student", seed=2, tokenizer=tok)
    return {**paths, "val": str(val), "teacher": str(pair / "teacher"), "student": str(pair / "student")}


def child(args: argparse.Namespace) -> None:
    """One run, in this (fresh) process: print its JSON line."""
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from sar_kd.config import config_from_args
    from sar_kd.trainer import Trainer

    flags = [
        "--teacher_model", args.teacher, "--student_model", args.student, "--train_file", args.train_file,
        "--block_size", str(args.block_size), "--train_steps", str(args.steps), "--per_device_batch_size", "2",
        "--grad_accum_steps", "1", "--eval_steps", "0", "--save_steps", "0", "--kd_chunk_size", "64",
        "--output_dir", str(Path(args.out)), "--overwrite_output_dir", "--cpu",
    ]  # fmt: skip
    if args.streaming:
        flags += ["--streaming", "--shuffle_buffer_size", str(args.shuffle_buffer_size)]
    else:
        flags += ["--validation_file", args.val]
    cfg = config_from_args(flags)
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    timed = {}
    setup_data = trainer._setup_data

    def timed_setup_data():
        t = time.perf_counter()
        setup_data()
        timed["data_s"] = time.perf_counter() - t

    trainer._setup_data = timed_setup_data
    trainer.setup()
    setup_s = time.perf_counter() - t0
    trainer.train_step()
    first_step_s = time.perf_counter() - t0
    for _ in range(args.steps - 1):
        trainer.train_step()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(
        "RESULT "
        + json.dumps(
            {
                "data_setup_s": round(timed["data_s"], 2),
                "setup_s": round(setup_s, 2),
                "first_step_s": round(first_step_s, 2),
                "peak_rss_mb": round(rss_mb, 1),
            }
        ),
        flush=True,
    )


def run_child(paths: dict, scale: int, streaming: bool, cache: Path, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable, __file__, "--child", "--teacher", paths["teacher"], "--student", paths["student"],
        "--train_file", paths[f"x{scale}"], "--val", paths["val"], "--block_size", str(args.block_size),
        "--steps", str(args.steps), "--shuffle_buffer_size", str(args.shuffle_buffer_size),
        "--out", str(Path(args.work) / "out"),
    ]  # fmt: skip
    if streaming:
        cmd.append("--streaming")
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))
    return {**json.loads(line[len("RESULT ") :]), "process_s": round(time.perf_counter() - t0, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scales", type=int, nargs="+", default=[1, 20])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--shuffle_buffer_size", type=int, default=1000)
    p.add_argument("--work", default="/tmp/sar_kd_bench_data")
    p.add_argument("--modes", nargs="+", default=["streaming", "memory"], choices=["streaming", "memory"])
    # (child-process arguments)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--streaming", action="store_true", help=argparse.SUPPRESS)
    for name in ("teacher", "student", "train_file", "val", "out"):
        p.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    paths = prepare(work, args.scales)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch CPU"
    print(json.dumps({"machine": machine, "python": platform.python_version()}), flush=True)
    results = []
    for scale in args.scales:
        size_mb = Path(paths[f"x{scale}"]).stat().st_size / 2**20
        if "streaming" in args.modes:
            r = run_child(paths, scale, True, work / "cache_unused", args)
            results.append({"scale": scale, "corpus_mb": round(size_mb, 1), "mode": "streaming", **r})
            print(json.dumps(results[-1]), flush=True)
        if "memory" not in args.modes:
            continue
        cache = work / f"cache_x{scale}"
        shutil.rmtree(cache, ignore_errors=True)
        for label in ("uncached", "cached"):
            r = run_child(paths, scale, False, cache, args)
            results.append({"scale": scale, "corpus_mb": round(size_mb, 1), "mode": f"in-memory {label}", **r})
            print(json.dumps(results[-1]), flush=True)
    print(
        "\n| corpus | mode | peak RSS (MB) | data setup (s) | setup (s) | to first step (s) |\n"
        "|---|---|---:|---:|---:|---:|"
    )
    for r in results:
        print(
            f"| {r['scale']}x ({r['corpus_mb']} MB) | {r['mode']} | {r['peak_rss_mb']:.0f} | {r['data_setup_s']:.1f} | "
            f"{r['setup_s']:.1f} | "
            f"{r['first_step_s']:.1f} |"
        )
    streamed = {r["scale"]: r["peak_rss_mb"] for r in results if r["mode"] == "streaming"}
    if len(streamed) >= 2:
        lo, hi = min(args.scales), max(args.scales)
        print(f"\nstreaming peak RSS {hi}x / {lo}x: {streamed[hi] / streamed[lo]:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
