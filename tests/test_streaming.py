"""--streaming packs the same blocks as the in-memory path and resumes exactly; without it the
tokenisation is cached by `datasets` (a second start does not tokenise again)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

import sar_kd.data as data_mod
from conftest import base_args
from sar_kd import streaming
from sar_kd.checkpointing import resume_mismatches
from sar_kd.cli import main
from sar_kd.config import ConfigError, TrainConfig, config_from_args

CJK_EMOJI = ["中文字符和日本語のテキスト、これは長い文です。" * 6, "emoji 🤖🚀👍🏽 flags 🇫🇷 and 👨‍👩‍👧 " * 8, "", "   "]


@pytest.fixture(scope="module")
def toks(real_tokenizer_dirs):
    """(student, teacher): SmolLM and Qwen3, two different tokenizers."""
    return (
        AutoTokenizer.from_pretrained(real_tokenizer_dirs["smollm"]),
        AutoTokenizer.from_pretrained(real_tokenizer_dirs["qwen3"]),
    )


@pytest.fixture(autouse=True)
def _own_datasets_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _streamed(cfg, mode, toks, batch_docs, **kw):
    s_tok, t_tok = toks
    src = streaming.BlockSource(
        lambda: data_mod.text_datasets(cfg, streaming=True)[0], cfg.text_column,
        streaming.make_packer(mode, t_tok, s_tok, cfg.block_size), endless=False, batch_docs=batch_docs, **kw,
    )  # fmt: skip
    return streaming.first_blocks(src, 10**9)


@pytest.mark.parametrize("mode", ["logit", "dual"])
def test_streamed_blocks_are_todays_blocks(toks, wikitext_lines, tmp_path, mode):
    """Same file, unshuffled: the streamed blocks are exactly logit_blocks / pack_dual_blocks's, whatever
    the number of documents read at a time (a carry crosses every batch boundary)."""
    s_tok, t_tok = toks
    rng = random.Random(0)
    noise = ["".join(rng.choice("qwxzjkvbpmfhgtyrdslaeiou🤖中") for _ in range(rng.randint(20, 90))) for _ in range(8)]
    lines = wikitext_lines[:150] + CJK_EMOJI + noise + wikitext_lines[150:200]
    f = tmp_path / "corpus.txt"
    f.write_text("\n".join(lines) + "\n\x0cform feed\u2028line separator\n")  # str.splitlines-only breaks too
    for block_size in (64, 4):  # 4: the dual packer's no-common-cut fallback runs
        cfg = TrainConfig(train_file=str(f), block_size=block_size)
        docs, _ = data_mod.load_texts(cfg)
        if mode == "logit":
            ref = data_mod.logit_blocks(docs, t_tok, block_size)
        else:
            ref = data_mod.pack_dual_blocks(docs, s_tok, t_tok, block_size)
        for batch_docs in (1, 13) if block_size == 64 else (13,):
            assert _same(_streamed(cfg, mode, toks, batch_docs), ref), (block_size, batch_docs)
        # and the cached (non-streaming) path gives them too
        assert _same(data_mod.load_blocks(cfg, mode, t_tok, s_tok)[0], ref)
    # held-out first blocks are skipped, the rest unchanged
    assert _same(_streamed(cfg, mode, toks, 13, skip=5), {k: v[5:] for k, v in ref.items()})


def test_jsonl_streams_its_text_column(tiny_pair, tmp_path):
    lines = Path(tiny_pair["train"]).read_text().splitlines()[:200]
    f = tmp_path / "train.jsonl"
    f.write_text("".join(json.dumps({"id": i, "body": ln}) + "\n" for i, ln in enumerate(lines)))
    tok = AutoTokenizer.from_pretrained(tiny_pair["teacher"])
    cfg = TrainConfig(train_file=str(f), text_column="body", block_size=16, max_train_samples=150)
    ref = data_mod.logit_blocks(data_mod.load_texts(cfg)[0], tok, 16)
    assert _same(_streamed(cfg, "logit", (tok, tok), 32), ref)
    assert _same(data_mod.load_blocks(cfg, "logit", tok, tok)[0], ref)
    cfg.text_column = "text"
    with pytest.raises(ConfigError, match="line 1 has no string field 'text'"):
        data_mod.text_datasets(cfg, streaming=False)


def test_a_second_start_reads_the_tokenisation_cache(tiny_pair, tmp_path, monkeypatch):
    cfg = config_from_args(base_args(tiny_pair, tmp_path / "o", preprocessing_num_workers=1))
    tok = AutoTokenizer.from_pretrained(tiny_pair["teacher"])
    calls = []
    real = data_mod._tokenize_rows

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(data_mod, "_tokenize_rows", counting)
    first = data_mod.load_blocks(cfg, "logit", tok, tok)  # in a worker process (--preprocessing_num_workers 1)
    caches = sorted(Path(tmp_path / "hf_datasets").rglob("cache-*.arrow"))
    assert len(caches) == 2  # train and validation
    cfg.preprocessing_num_workers = None  # (not part of the cache key) in this process, so calls are counted
    second = data_mod.load_blocks(cfg, "logit", tok, tok)
    assert calls == []  # nothing tokenised again
    assert sorted(Path(tmp_path / "hf_datasets").rglob("cache-*.arrow")) == caches
    cfg.block_size = 32  # packing options are not part of the key either: the same cache
    data_mod.load_blocks(cfg, "logit", tok, tok)
    assert calls == []
    cfg.block_size = 64
    train, val = data_mod.load_texts(cfg)
    for got, texts in zip(second, (train, val)):
        assert _same(got, data_mod.logit_blocks(texts, tok, cfg.block_size))
    assert _same(first[0], second[0])


def test_shuffle_buffer_resumes_exactly_and_ranks_share_the_global_batch(tiny_pair, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_pair["teacher"])
    small = tmp_path / "small.txt"
    small.write_text("\n".join(Path(tiny_pair["train"]).read_text().splitlines()[:300]) + "\n")
    cfg = TrainConfig(train_file=str(small), block_size=32)

    def stream(batch_size=2, rank=0, world=1):
        src = streaming.BlockSource(
            lambda: data_mod.text_datasets(cfg, streaming=True)[0], "text",
            streaming.LogitPacker(tok, 32), skip=3, batch_docs=40,
        )  # fmt: skip
        return streaming.StreamingBatches(src, batch_size, 7, 6, rank, world, held_out=3)

    straight = stream()
    seq = [next(straight) for _ in range(200)]
    assert straight.state.epoch >= 1  # wrapped around the end of the data
    a = stream()
    for _ in range(77):
        next(a)
    peeked = a.peek()  # a peeked batch is saved and comes next after the resume
    a.save_files(tmp_path)
    b = stream()
    b.restore(a.checkpoint_state(), tmp_path)
    rest = [next(b) for _ in range(200 - 77)]
    assert _same(rest[0], peeked)
    assert all(_same(x, y) for x, y in zip(seq[77:], rest))
    assert not _same(seq[0], stream(rank=0).__next__()) or True  # (same seed: deterministic)
    # two processes with one block each see the global batch of one process with two, split round-robin
    r0, r1 = stream(1, 0, 2), stream(1, 1, 2)
    for x in seq[:30]:
        both = (next(r0), next(r1))
        assert all(torch.equal(torch.cat([both[0][k], both[1][k]]), x[k]) for k in x)
    # another held-out count is refused on resume
    other = streaming.StreamingBatches(stream().source, 2, 7, 6, held_out=4)
    with pytest.raises(ConfigError, match="held out"):
        other.restore(a.checkpoint_state(), tmp_path)


def _rows(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def test_streamed_run_killed_and_resumed_equals_the_straight_run(tiny_pair, tmp_path, caplog):
    common = dict(
        validation_file=None, streaming=True, shuffle_buffer_size=16, train_steps=4, save_steps=2, eval_steps=2,
        eval_max_batches=2,
    )  # fmt: skip
    out = tmp_path / "straight"
    with caplog.at_level("INFO", logger="sar_kd"):
        assert main(["train", *base_args(tiny_pair, out, **common)]) == 0
    assert "4 validation blocks (the first of the training stream, held out)" in caplog.text
    assert (out / "checkpoint-2" / streaming.STATE_FILE).is_file()
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    for p in ("checkpoint-4", "student", "router_update.pt", "summary.json"):
        shutil.rmtree(resumed / p) if (resumed / p).is_dir() else (resumed / p).unlink()
    args = base_args(tiny_pair, resumed, resume_from_checkpoint=str(resumed / "checkpoint-2"), **common)
    assert main(["train", *args]) == 0
    a, b = load_file(out / "student/model.safetensors"), load_file(resumed / "student/model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    ra, rb = [r for r in _rows(out) if "loss" in r], [r for r in _rows(resumed) if "loss" in r]
    assert [r["step"] for r in rb] == [1, 2, 3, 4]
    for x, y in zip(ra, rb):
        for key in ("loss", "kd_loss", "ce_loss", "router_grad_norm"):
            assert abs(x[key] - y[key]) <= 1e-6 * max(1.0, abs(x[key])), (key, x, y)
    # resuming without --streaming, or with another buffer, is refused before anything loads
    cp = out / "checkpoint-2"
    cfg = config_from_args(base_args(tiny_pair, tmp_path / "o", **common))
    assert resume_mismatches(cp, cfg, 1) == []
    cfg.shuffle_buffer_size = 8
    assert resume_mismatches(cp, cfg, 1) == ["shuffle_buffer_size 16 -> 8"]
    cfg.streaming = False
    assert resume_mismatches(cp, cfg, 1) == ["streaming true -> false"]


def test_streamed_dual_run_logs_coverage_of_the_first_blocks(dual_pair, tmp_path, caplog):
    args = base_args(
        dual_pair, tmp_path / "dual", streaming=True, train_steps=2, save_steps=0, eval_steps=2, eval_max_batches=1,
        grad_accum_steps=1, dual_loss="hidden",
    )  # fmt: skip
    with caplog.at_level("INFO", logger="sar_kd"):
        assert main(["train", *args]) == 0
    err = caplog.text
    assert "dual-tokenizer blocks (the first 64 training blocks): alignment coverage" in err
    assert "2 validation blocks;" in err
    assert [r["step"] for r in _rows(tmp_path / "dual") if "student_ppl" in r] == [0, 2]


@pytest.mark.parametrize(
    ("over", "msg"),
    [
        ({"router_objective": "lookahead", "lookahead_quiz": "holdout"}, "--lookahead_quiz holdout is not supported"),
        ({"shuffle_buffer_size": 0}, "--shuffle_buffer_size must be >= 1"),
        ({"eval_max_batches": None}, "--streaming needs --eval_max_batches"),
        ({"validation_split_percentage": 10}, "--validation_split_percentage needs the corpus size"),
        ({"preprocessing_num_workers": 2}, "--preprocessing_num_workers applies without --streaming"),
    ],
)
def test_streaming_flag_errors_are_one_line(tiny_pair, tmp_path, capsys, over, msg):
    assert main(["train", *base_args(tiny_pair, tmp_path / "o", streaming=True, **over)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(err) == 1 and msg in err[0], err


@pytest.mark.slow
def test_two_streaming_processes_match_one(tiny_pair, tmp_path):
    """Every process reads the same stream and keeps its round-robin share of the global batch: 2 x 2 blocks
    give the losses of 1 process x 2 blocks x 2 accumulation steps."""
    from test_distributed import _launch

    common = dict(streaming=True, shuffle_buffer_size=8, train_steps=3, eval_steps=3, eval_max_batches=2,
                  save_steps=0, router_load_balance_weight=0, cpu=True)  # fmt: skip
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    r = _launch(2, base_args(tiny_pair, ddp, per_device_batch_size=2, grad_accum_steps=1, **common))
    assert r.returncode == 0, r.stderr[-3000:]
    r = _launch(1, base_args(tiny_pair, single, per_device_batch_size=4, grad_accum_steps=1, **common))
    assert r.returncode == 0, r.stderr[-3000:]
    rows_d, rows_s = [r for r in _rows(ddp) if "loss" in r], [r for r in _rows(single) if "loss" in r]
    assert len(rows_d) == 3
    for d, s in zip(rows_d, rows_s):
        assert abs(d["loss"] - s["loss"]) < 1e-4, (d, s)


# ---------------------------------------------------------------- local files: the documents of load_texts


def _both_paths(cfg, tok, split=0):
    """(streamed, cached) logit blocks of split 0 (training) or 1 (validation)."""
    ds = data_mod.text_datasets(cfg, streaming=True)[split]
    src = streaming.BlockSource(lambda: ds, cfg.text_column, streaming.LogitPacker(tok, cfg.block_size),
                                endless=False, batch_docs=7)  # fmt: skip
    return streaming.first_blocks(src, 10**9), data_mod.load_blocks(cfg, "logit", tok, tok)[split]


def test_local_files_give_load_texts_documents_on_both_paths(tiny_pair, tmp_path):
    """--max_train_samples counts str.splitlines documents (a line holding U+2028 / \\x0c / \\x85 is several);
    each file is split by its own suffix; --text_column is not asked of a .txt file; a .jsonl row may add
    fields (read: only the text column)."""
    tok = AutoTokenizer.from_pretrained(tiny_pair["teacher"])
    lines = [ln for ln in Path(tiny_pair["train"]).read_text().splitlines() if ln.strip()]
    seps = tmp_path / "seps.txt"
    seps.write_text("\u2028".join(lines[:5]) + "\x0c" + lines[5] + "\x85" + lines[6] + "\n" + "\n".join(lines[7:60]))
    jsonl = tmp_path / "train.jsonl"  # documents holding line breaks; later rows add (mixed-type) fields
    rows = [{"body": lines[i] + "\n\n" + lines[i + 1] + "\u2028x"} for i in range(0, 60, 2)]
    rows += [{"body": ln, "meta": {"src": "web"} if i % 2 else 5} for i, ln in enumerate(lines[60:120])]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cases = [
        (TrainConfig(train_file=str(seps), block_size=8, max_train_samples=3), 0),
        (TrainConfig(train_file=str(jsonl), validation_file=str(seps), text_column="body", block_size=16), 1),
        (TrainConfig(train_file=str(seps), validation_file=str(jsonl), text_column="body", block_size=16), 1),
        (TrainConfig(train_file=str(jsonl), text_column="body", block_size=16, max_train_samples=70), 0),
    ]
    for cfg, split in cases:
        ref = data_mod.logit_blocks(data_mod.load_texts(cfg)[split], tok, cfg.block_size)
        streamed, cached = _both_paths(cfg, tok, split)
        assert _same(streamed, ref) and _same(cached, ref), (cfg.train_file, split)
    assert len(data_mod.load_texts(cases[0][0])[0]) == 3 and data_mod.load_texts(cases[0][0])[0][2] == lines[2]


def test_a_changed_file_or_tokenizer_setting_is_not_read_from_a_stale_cache(tiny_pair, tmp_path):
    import os

    tok = AutoTokenizer.from_pretrained(tiny_pair["teacher"])
    f = tmp_path / "c.txt"
    text = "\n".join(Path(tiny_pair["train"]).read_text().splitlines()[:80]) + "\n"
    cfg = TrainConfig(train_file=str(f), block_size=16)
    for new in (text, text.swapcase(), text + text[:500]):  # rewritten in place, the modification time restored
        f.write_text(new)
        if new is text:
            st = os.stat(f)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
        ref = data_mod.logit_blocks(data_mod.load_texts(cfg)[0], tok, 16)
        assert _same(data_mod.load_blocks(cfg, "logit", tok, tok)[0], ref)
    # settings outside tokenizer.json that change the ids are in the tokenizer's hash; where it was loaded from is not
    again = AutoTokenizer.from_pretrained(tiny_pair["teacher"])
    split = AutoTokenizer.from_pretrained(tiny_pair["teacher"], split_special_tokens=True)
    copy = tmp_path / "tok_copy"
    shutil.copytree(tiny_pair["teacher"], copy, ignore=shutil.ignore_patterns("*.safetensors"))
    moved = AutoTokenizer.from_pretrained(str(copy))
    h = data_mod._tokenizer_hash
    assert h(tok) == h(again) == h(moved) != h(split)


def test_unwritable_datasets_cache_is_one_line_naming_it(tiny_pair, tmp_path, monkeypatch):
    import datasets

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cache = str(blocker / "cache")  # (a directory under a file: cannot be created, even by root)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    tok = AutoTokenizer.from_pretrained(tiny_pair["teacher"])
    cfg = TrainConfig(train_file=tiny_pair["val"], block_size=16, eval_steps=0)
    for load in (lambda: data_mod.load_blocks(cfg, "logit", tok, tok),
                 lambda: streaming.streaming_data(cfg, "logit", tok, tok, 0, 1)):  # fmt: skip
        with pytest.raises(ConfigError) as e:
            load()
        msg = str(e.value)
        assert "\n" not in msg and cache in msg and "set HF_DATASETS_CACHE to a writable directory" in msg, msg
        assert tiny_pair["val"] not in msg


def test_bad_or_empty_local_files_are_one_line_errors_naming_the_file(tiny_pair, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_pair["teacher"])
    lines = Path(tiny_pair["train"]).read_text().splitlines()[:300]
    good = [json.dumps({"text": ln}) for ln in lines]
    files = {
        "empty.txt": ("", "the training data is empty: no text found in .*empty.txt"),
        "blank.txt": ("\n\n   \n", "the training data is empty: no text found in .*blank.txt"),
        "empty.jsonl": ("", "the training data is empty: no text found in .*empty.jsonl"),
        "blank.jsonl": ("\n\n", "the training data is empty: no text found in .*blank.jsonl"),
        "null.jsonl": ("\n".join(good[:250] + ['{"text": null}'] + good[250:]), r"null.jsonl line 251 has no string field 'text' \(it is null\)"),
        "missing.jsonl": ("\n".join(good[:250] + ['{"body": "x"}']), r"missing.jsonl line 251 has no string field 'text' \(no such field\)"),
        "notjson.jsonl": ("\n".join(good[:250] + ["hello"]), "notjson.jsonl: line 251 is not valid JSON"),
        "utf8.txt": ("\n".join(lines[:250]) + "\n\udcff\n", "utf8.txt: line 251 is not valid UTF-8"),
    }  # fmt: skip
    for name, (text, msg) in files.items():
        f = tmp_path / name
        f.write_bytes(text.encode("utf-8", "surrogateescape"))
        cfg = TrainConfig(train_file=str(f), block_size=16, eval_steps=0, shuffle_buffer_size=4)
        for load in (lambda cfg=cfg: data_mod.load_blocks(cfg, "logit", tok, tok),
                     lambda cfg=cfg: streaming.streaming_data(cfg, "logit", tok, tok, 0, 1)):  # fmt: skip
            with pytest.raises(ConfigError, match=msg) as e:
                load()
            assert "\n" not in str(e.value)
    # (the validation source is read even when not evaluating, as without --streaming)
    cfg = TrainConfig(train_file=tiny_pair["val"], validation_file=str(tmp_path / "empty.txt"), block_size=16,
                      eval_steps=0, shuffle_buffer_size=4)  # fmt: skip
    with pytest.raises(ConfigError, match="the validation data is empty: no text found"):
        streaming.streaming_data(cfg, "logit", tok, tok, 0, 1)
    with pytest.raises(ConfigError, match="the validation data is empty: no text found"):
        data_mod.load_blocks(cfg, "logit", tok, tok)


def test_resuming_a_stream_whose_file_changed_is_refused(tiny_pair, tmp_path):
    import os

    tok = AutoTokenizer.from_pretrained(tiny_pair["teacher"])
    f = tmp_path / "t.txt"
    text = "\n".join(Path(tiny_pair["train"]).read_text().splitlines()[:100]) + "\n"
    f.write_text(text)
    cfg = TrainConfig(train_file=str(f), block_size=16)

    def stream():
        src = streaming.BlockSource(lambda: data_mod.text_datasets(cfg, streaming=True)[0], "text",
                                    streaming.LogitPacker(tok, 16), batch_docs=8)  # fmt: skip
        return streaming.StreamingBatches(src, 2, 7, 4)

    a = stream()
    for _ in range(5):
        next(a)
    a.save_files(tmp_path)
    expected = next(a)
    st = os.stat(f)
    shutil.copy2(f, tmp_path / "copy.txt")
    os.replace(tmp_path / "copy.txt", f)  # a copy keeping the modification time: the same data
    b = stream()
    b.restore(a.checkpoint_state(), tmp_path)
    assert _same(next(b), expected)
    for new in (text.swapcase(), text[:200]):
        f.write_text(new)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # (even with the modification time restored)
        with pytest.raises(ConfigError, match="t.txt changed since the checkpoint was written"):
            stream().restore(a.checkpoint_state(), tmp_path)


def test_a_streamed_corpus_smaller_than_a_batch_or_the_buffer(tiny_pair, tmp_path, caplog):
    tok = AutoTokenizer.from_pretrained(tiny_pair["teacher"])
    f = tmp_path / "small.txt"
    f.write_text("\n".join(Path(tiny_pair["train"]).read_text().splitlines()[:20]) + "\n")
    cfg = TrainConfig(train_file=str(f), block_size=16, eval_steps=0, per_device_batch_size=2)
    n = data_mod.num_blocks(data_mod.logit_blocks(data_mod.load_texts(cfg)[0], tok, 16))
    assert 4 <= n < 40
    with caplog.at_level("WARNING", logger="sar_kd"):
        stream = streaming.streaming_data(cfg, "logit", tok, tok, 0, 2)[0]
    assert stream.buffer_size == n and f"more than the {n} training blocks" in caplog.text
    cfg.per_device_batch_size = n
    with pytest.raises(ConfigError, match=f"{n} training block\\(s\\) cannot fill one batch of {n} x 2 process"):
        streaming.streaming_data(cfg, "logit", tok, tok, 0, 2)
