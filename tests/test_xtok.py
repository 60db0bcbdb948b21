"""Cross-tokenizer logit KD: the byte-level vocabulary map, the chunk alignment and the loss."""

from __future__ import annotations

import pytest
import torch

from sar_kd import losses
from sar_kd.vocab_map import (
    VocabMap,
    bucket_probs,
    build_vocab_map,
    default_cache_dir,
    load_or_build_vocab_map,
    token_bytes,
    tokenizer_style,
)
from sar_kd.xtok import binarised_kl, chunk_alignment, xtok_loss_sums

TEXTS = [
    "The café serves naïve crème brûlée — résumé, Straße, Ελληνικά, русский текст.",
    "中文字符和日本語のテキスト、한국어도 있습니다。東京は晴れ",
    "Emoji 🤖🚀👍🏽 and flags 🇫🇷 mixed with 👨‍👩‍👧 families.",
    "   leading,    inner\t\ttabs\n\n\n  and trailing spaces   \n",
    "Numbers 3.14159, 1,000,000 and 2026-11-27 12:34:56.",
]


@pytest.fixture(scope="module")
def toks(real_tokenizer_dirs):
    from transformers import AutoTokenizer

    return {k: AutoTokenizer.from_pretrained(v) for k, v in real_tokenizer_dirs.items()}


@pytest.fixture(scope="module")
def real_map(toks, tmp_path_factory) -> VocabMap:
    return load_or_build_vocab_map(toks["qwen3"], toks["smollm"], tmp_path_factory.mktemp("vmap"))


def _encode(tok, texts: list[str], trim: dict[int, int] | None = None):
    """Right-padded ids (B, T), mask (B, T) and offsets (B, T, 2); ``trim`` row -> tokens to keep."""
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    seqs = [(ids, off) for ids, off in zip(enc["input_ids"], enc["offset_mapping"])]
    if trim:
        seqs = [(ids[: trim.get(r, len(ids))], off[: trim.get(r, len(ids))]) for r, (ids, off) in enumerate(seqs)]
    n = max(len(ids) for ids, _ in seqs)
    ids_t = torch.zeros(len(seqs), n, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    off_t = torch.zeros(len(seqs), n, 2, dtype=torch.int32)
    for r, (ids, off) in enumerate(seqs):
        ids_t[r, : len(ids)] = torch.tensor(ids)
        mask[r, : len(ids)] = 1
        off_t[r, : len(ids)] = torch.tensor(off, dtype=torch.int32).view(-1, 2)
    return ids_t, mask, off_t


# --- byte map ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["qwen3", "smollm"])
def test_token_bytes_of_real_byte_level_tokenizers(toks, name):
    tok = toks[name]
    tb = token_bytes(tok)
    assert tokenizer_style(tok) == "byte_level" and len(tb) == len(tok)
    expect = {
        "Ġthe": b" the",
        "Ã©": "é".encode(),  # two-byte UTF-8
        "ä¸Ń": "中".encode(),  # CJK, three bytes
        "ðŁ": b"\xf0\x9f",  # the first half of a four-byte emoji
        "1": b"1",
        "Ċ": b"\n",
        "ĠĠ": b"  ",
    }
    for piece, want in expect.items():
        assert tb[tok.convert_tokens_to_ids(piece)] == want, piece
    assert tb[tok.eos_token_id] is None and all(tb[i] is None for i in tok.all_special_ids)
    for text in TEXTS:  # the bytes of a tokenisation are the text's UTF-8 bytes
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert b"".join(tb[i] for i in ids) == text.encode()


def _sentencepiece_tokenizer(path):
    """A tiny Llama-style tokenizer: BPE with byte fallback, Metaspace, saved and reloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    vocab += ["▁", "t", "h", "e", "▁t", "▁th", "▁the", "é", "中", "c", "a", "f", "ca", "caf", "▁caf", "▁café", "1"]
    merges = [("▁", "t"), ("▁t", "h"), ("▁th", "e"), ("c", "a"), ("ca", "f"), ("▁", "caf"), ("▁caf", "é")]
    model = models.BPE({p: i for i, p in enumerate(vocab)}, merges, unk_token="<unk>", byte_fallback=True)
    tk = Tokenizer(model)
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return PreTrainedTokenizerFast.from_pretrained(path)


def test_token_bytes_of_a_sentencepiece_style_tokenizer(tmp_path, toks):
    tok = _sentencepiece_tokenizer(tmp_path / "sp")
    tb = token_bytes(tok)
    assert tokenizer_style(tok) == "sentencepiece"
    ids = tok.convert_tokens_to_ids
    assert tb[ids("▁the")] == b" the" and tb[ids("▁")] == b" " and tb[ids("<0xE2>")] == b"\xe2"
    assert tb[ids("é")] == "é".encode() and tb[ids("中")] == "中".encode() and tb[ids("1")] == b"1"
    assert tb[ids("<unk>")] is None and tb[ids("</s>")] is None
    same = build_vocab_map(tok, tok)  # "▁" and "<0x20>" are both b" ", yet each stays its own bucket
    assert torch.equal(same.teacher_to_bucket, torch.arange(len(tok))) and same.num_buckets == len(tok)
    text = "the café 中 🤖"  # the emoji falls back to its four byte tokens
    enc = tok(text, add_special_tokens=False)["input_ids"]
    assert ids("<0xF0>") in enc
    assert b"".join(tb[i] for i in enc) == (" " + text).encode()  # Metaspace prepends "▁"
    # Mapped against a byte-level vocabulary, "▁the" and "Ġthe" are one bucket.
    vm = build_vocab_map(tok, toks["smollm"])
    s_the = toks["smollm"].convert_tokens_to_ids("Ġthe")
    assert vm.teacher_to_bucket[ids("▁the")] == vm.student_to_bucket[s_the]
    assert vm.teacher_to_bucket[ids("</s>")] == vm.student_to_bucket[toks["smollm"].eos_token_id]


def test_real_map_buckets_and_eos(toks, real_map):
    t, s, vm = toks["qwen3"], toks["smollm"], real_map
    assert vm.teacher_to_bucket.shape == (len(t),) and vm.student_to_bucket.shape == (len(s),)
    for piece in ("Ġthe", "Ã©", "1", "Ċ"):
        bt, bs = (
            vm.teacher_to_bucket[t.convert_tokens_to_ids(piece)],
            vm.student_to_bucket[s.convert_tokens_to_ids(piece)],
        )
        assert bt == bs
    assert vm.teacher_to_bucket[t.eos_token_id] == vm.student_to_bucket[s.eos_token_id]
    assert int(vm.teacher_exact.sum()) > 39000 and int(vm.student_exact.sum()) > 39000
    # Every bucket holds at least one token; no bucket id out of range.
    used = torch.zeros(vm.num_buckets, dtype=torch.bool)
    used[vm.teacher_to_bucket] = True
    used[vm.student_to_bucket] = True
    assert bool(used.all())


def test_non_shared_tokens_go_to_their_longest_shared_prefix(toks, real_map):
    t, s, vm = toks["qwen3"], toks["smollm"], real_map
    tb, sb = token_bytes(t), token_bytes(s)
    bucket_bytes = {int(vm.student_to_bucket[i]): b for i, b in enumerate(sb) if b is not None and vm.student_exact[i]}
    shared = set(bucket_bytes.values())
    g = torch.Generator().manual_seed(0)
    checked = 0
    for i in torch.randint(0, len(t), (3000,), generator=g).tolist():
        b = tb[i]
        if b is None or vm.teacher_exact[i]:
            continue
        prefixes = [b[:k] for k in range(1, len(b)) if b[:k] in shared]  # slow reference: all shared prefixes
        assert prefixes, b
        assert bucket_bytes[int(vm.teacher_to_bucket[i])] == max(prefixes, key=len)
        checked += 1
    assert checked > 500


def test_bucketed_distributions_keep_all_mass(toks, real_map):
    g = torch.Generator().manual_seed(0)
    for to_bucket, n in (
        (real_map.teacher_to_bucket, len(toks["qwen3"])),
        (real_map.student_to_bucket, len(toks["smollm"])),
    ):
        p = torch.softmax(torch.randn(3, n, generator=g) * 4, -1)
        q = bucket_probs(p, to_bucket, real_map.num_buckets)
        assert q.shape == (3, real_map.num_buckets)
        assert torch.allclose(q.sum(-1), torch.ones(3), atol=1e-5)
    with pytest.raises(AssertionError, match="trim the head"):  # Qwen's padded head rows must be cut first
        bucket_probs(torch.rand(1, 151936), real_map.teacher_to_bucket, real_map.num_buckets)


def test_identical_tokenizers_give_the_identity_map(toks):
    s = toks["smollm"]
    vm = build_vocab_map(s, s)
    assert vm.num_buckets == len(s)
    identity = torch.arange(len(s))
    assert torch.equal(vm.teacher_to_bucket, identity) and torch.equal(vm.student_to_bucket, identity)
    assert bool(vm.teacher_exact.all())


def test_map_cache_roundtrip_and_env_override(toks, real_map, tmp_path, monkeypatch):
    monkeypatch.setenv("SAR_KD_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "vocab_maps"
    s = toks["smollm"]
    a = load_or_build_vocab_map(s, s)
    assert len(list((tmp_path / "vocab_maps").glob("*.pt"))) == 1
    b = load_or_build_vocab_map(s, s)
    assert torch.equal(a.student_to_bucket, b.student_to_bucket) and a.num_buckets == b.num_buckets


# --- chunk alignment --------------------------------------------------------------------------


def reference_chunks(s_off: list, t_off: list, s_len: list | None = None, t_len: list | None = None):
    """Per-token chunk ids by walking both token lists, token by token (-1: not in a closed chunk).

    With byte lengths, a chunk holding the same number of bytes on both sides (no 0-byte token) is
    split where the running byte counts of the two sides meet."""
    s_ids, t_ids = [-1] * len(s_off), [-1] * len(t_off)
    i = j = c = 0
    while i < len(s_off) and j < len(t_off):
        si, tj = [i], [j]
        es, et = s_off[i][1], t_off[j][1]
        i, j = i + 1, j + 1
        closed = False
        while True:
            if es == et:  # a common end: a boundary unless the next token on a side starts before it
                if i < len(s_off) and s_off[i][0] < es:
                    es, i = max(es, s_off[i][1]), i + 1
                    si.append(i - 1)
                elif j < len(t_off) and t_off[j][0] < et:
                    et, j = max(et, t_off[j][1]), j + 1
                    tj.append(j - 1)
                else:
                    closed = True
                    break
            elif es < et:
                if i == len(s_off):
                    break
                es, i = max(es, s_off[i][1]), i + 1
                si.append(i - 1)
            else:
                if j == len(t_off):
                    break
                et, j = max(et, t_off[j][1]), j + 1
                tj.append(j - 1)
        if not closed:
            break
        ends_s, ends_t = [0] * len(si), [0] * len(tj)
        if s_len is not None:
            ls, lt = [s_len[k] for k in si], [t_len[k] for k in tj]
            if sum(ls) == sum(lt) and min(ls) > 0 and min(lt) > 0:
                ends_s = [sum(ls[: m + 1]) for m in range(len(ls))]
                ends_t = [sum(lt[: m + 1]) for m in range(len(lt))]
        common = sorted(set(ends_s) & set(ends_t))
        for k, e in zip(si, ends_s):
            s_ids[k] = c + sum(1 for x in common if x < e)
        for k, e in zip(tj, ends_t):
            t_ids[k] = c + sum(1 for x in common if x < e)
        c += len(common)
    return s_ids, t_ids


@pytest.mark.parametrize("by_bytes", [False, True])
def test_chunk_alignment_matches_a_per_token_reference(toks, real_map, wikitext_lines, by_bytes):
    texts = TEXTS + [next(line for line in wikitext_lines[100:] if len(line) > 300)]
    # Row 1's teacher side is cut short, so its tokenisations end at different places.
    s_ids, s_mask, s_off = _encode(toks["smollm"], texts)
    t_ids, t_mask, t_off = _encode(toks["qwen3"], texts, trim={1: 9})
    extra = (s_ids, t_ids, real_map) if by_bytes else ()
    al = chunk_alignment(s_off, s_mask, t_off, t_mask, *extra)
    s_tb, t_tb = token_bytes(toks["smollm"]), token_bytes(toks["qwen3"])
    pairs = []
    for r in range(len(texts)):
        ns, nt = int(s_mask[r].sum()), int(t_mask[r].sum())
        lens = {}
        if by_bytes:
            lens = {
                "s_len": [len(s_tb[i] or b"") for i in s_ids[r, :ns].tolist()],
                "t_len": [len(t_tb[i] or b"") for i in t_ids[r, :nt].tolist()],
            }
        rs, rt = reference_chunks(s_off[r, :ns].tolist(), t_off[r, :nt].tolist(), **lens)
        assert al.student_chunk[r, :ns].tolist() == rs and al.teacher_chunk[r, :nt].tolist() == rt
        assert bool((al.student_chunk[r, ns:] == -1).all()) and bool((al.teacher_chunk[r, nt:] == -1).all())
        n = max(rs) + 1
        for c in range(n):
            ks, kt = [k for k in range(ns) if rs[k] == c], [k for k in range(nt) if rt[k] == c]
            assert al.student_count[r, c] == len(ks) and al.teacher_count[r, c] == len(kt)
            if len(ks) == len(kt) == 1:
                pairs.append([r, ks[0], kt[0]])
        assert bool((al.student_count[r, n:] == 0).all())
    assert al.pairs.tolist() == pairs
    assert -1 in al.student_chunk[1, : int(s_mask[1].sum())].tolist()  # the open tail of row 1
    assert bool((al.student_count > 1).any()) and bool((al.teacher_count > 1).any())


def test_byte_split_characters_become_one_to_one_pairs(toks, real_map):
    s, t = toks["smollm"], toks["qwen3"]
    s_ids, s_mask, s_off = _encode(s, ["a 🤖 b"])
    t_ids, t_mask, t_off = _encode(t, ["a 🤖 b"])
    assert s.convert_ids_to_tokens(s_ids[0]) == t.convert_ids_to_tokens(t_ids[0]) == ["a", "ĠðŁ", "¤", "ĸ", "Ġb"]
    assert chunk_alignment(s_off, s_mask, t_off, t_mask).student_count.tolist() == [[1, 3, 1]]
    al = chunk_alignment(s_off, s_mask, t_off, t_mask, s_ids, t_ids, real_map)
    assert al.student_count.tolist() == al.teacher_count.tolist() == [[1, 1, 1, 1, 1]]
    assert al.pairs[:, 1].tolist() == al.pairs[:, 2].tolist() == [0, 1, 2, 3, 4]


# --- the loss ---------------------------------------------------------------------------------


def _heads(hs: int, vs: int, ht: int, vt: int, seed: int = 0):
    torch.manual_seed(seed)
    s_head, t_head = torch.nn.Linear(hs, vs, bias=False), torch.nn.Linear(ht, vt, bias=False)
    with torch.no_grad():
        s_head.weight.mul_(3.0)
        t_head.weight.mul_(3.0)
    return s_head, t_head


def test_identical_tokenizers_equal_same_tokenizer_kd(toks):
    tok = toks["smollm"]
    vm = build_vocab_map(tok, tok)
    ids, mask, off = _encode(tok, [TEXTS[2], TEXTS[1][:12]])  # row 1 is padded; emoji and CJK pieces
    al = chunk_alignment(off, mask, off, mask, ids, ids, vm)
    s_head, t_head = _heads(12, len(tok), 16, len(tok))
    torch.manual_seed(1)
    hs = torch.randn(*ids.shape, 12, requires_grad=True)
    ht = torch.randn(*ids.shape, 16, requires_grad=True)
    T = 2.0
    out = xtok_loss_sums(hs, ht, s_head, t_head, ids, ids, al, vm, T, chunk_size=32)
    gs, gt = torch.autograd.grad(out["kl_sum"], [hs, ht])
    labels = losses.shift_labels(ids, mask)
    ref = losses.kd_kl_loss(s_head(hs).flatten(0, 1), t_head(ht).flatten(0, 1), labels.flatten(), T)
    rs, rt = torch.autograd.grad(ref, [hs, ht])
    assert torch.allclose(out["kl_sum"], ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(gs, rs, atol=1e-5) and torch.allclose(gt, rt, atol=1e-5)
    assert out["n_pairs"] == int((labels != losses.IGNORE_INDEX).sum()) and out["n_chunks"] == 0
    assert out["chunk_sum"] == 0 and out["student_tokens_in_pairs"] == mask.sum()


@pytest.fixture(scope="module")
def real_batch(toks, real_map):
    """Two texts tokenised by the real pair (row 1 padded), with small random heads at the real vocab sizes."""
    texts = [TEXTS[0][:40] + TEXTS[2], TEXTS[1][:20]]
    s_ids, s_mask, s_off = _encode(toks["smollm"], texts)
    t_ids, t_mask, t_off = _encode(toks["qwen3"], texts)
    s_head, t_head = _heads(8, len(toks["smollm"]), 8, len(toks["qwen3"]), seed=2)
    return {
        "al": chunk_alignment(s_off, s_mask, t_off, t_mask, s_ids, t_ids, real_map),
        "s_ids": s_ids,
        "t_ids": t_ids,
        "heads": (s_head, t_head),
    }


def _run(batch, vm, chunk_size, seed=3):
    torch.manual_seed(seed)
    hs = torch.randn(*batch["s_ids"].shape, 8, requires_grad=True)
    ht = torch.randn(*batch["t_ids"].shape, 8, requires_grad=True)
    s_head, t_head = batch["heads"]
    out = xtok_loss_sums(hs, ht, s_head, t_head, batch["s_ids"], batch["t_ids"], batch["al"], vm, 1.5, chunk_size)
    return out, hs, ht


def test_gradient_reaches_the_teacher_through_each_term(real_batch, real_map):
    out, hs, ht = _run(real_batch, real_map, chunk_size=64)
    assert out["n_pairs"] > 20 and out["n_chunks"] > 3
    assert 0 < out["mass_sum"] <= out["n_pairs"] + 1e-3
    for term in ("kl_sum", "chunk_sum"):
        assert out[term] > 0
        g_t, g_s = torch.autograd.grad(out[term], [ht, hs], retain_graph=True)
        assert g_t.abs().sum() > 0 and g_s.abs().sum() > 0, term
        assert g_t[1, int(real_batch["al"].teacher_valid[1].sum()) :].abs().sum() == 0  # padding gets none


def test_chunked_equals_unchunked(real_batch, real_map):
    big, hs1, ht1 = _run(real_batch, real_map, chunk_size=10_000)
    small, hs2, ht2 = _run(real_batch, real_map, chunk_size=12)
    for k in big:
        assert torch.allclose(big[k].float(), small[k].float(), rtol=1e-5, atol=1e-5), k
    loss1, loss2 = big["kl_sum"] + big["chunk_sum"], small["kl_sum"] + small["chunk_sum"]
    g1, g2 = torch.autograd.grad(loss1, [hs1, ht1]), torch.autograd.grad(loss2, [hs2, ht2])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g1, g2))
    with torch.no_grad():  # no autograd: no checkpointing, same values
        nograd, _, _ = _run(real_batch, real_map, chunk_size=12)
    assert torch.allclose(nograd["kl_sum"], big["kl_sum"].detach(), rtol=1e-5)


def test_a_batch_with_nothing_to_score_gives_zeros_that_backpropagate(toks, real_map, real_batch):
    s_ids, s_mask, s_off = _encode(toks["smollm"], ["Hello"])  # one token each: never predicted
    t_ids, t_mask, t_off = _encode(toks["qwen3"], ["Hello"])
    al = chunk_alignment(s_off, s_mask, t_off, t_mask, s_ids, t_ids, real_map)
    hs, ht = torch.randn(1, 1, 8, requires_grad=True), torch.randn(1, 1, 8, requires_grad=True)
    out = xtok_loss_sums(hs, ht, *real_batch["heads"], s_ids, t_ids, al, real_map, 2.0, 16)
    assert out["n_pairs"] == 0 and out["n_chunks"] == 0 and out["kl_sum"] == 0 and out["chunk_sum"] == 0
    (out["kl_sum"] + out["chunk_sum"]).backward()
    assert ht.grad is not None and ht.grad.abs().sum() == 0


def test_binarised_kl_properties():
    lp = torch.tensor([-0.0, -1e-9, -0.3, -2.0, -40.0])
    assert torch.allclose(binarised_kl(lp, lp), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    pt, ps = torch.tensor([0.9, 0.2], dtype=torch.float64), torch.tensor([0.5, 0.6], dtype=torch.float64)
    direct = pt * (pt / ps).log() + (1 - pt) * ((1 - pt) / (1 - ps)).log()
    assert torch.allclose(binarised_kl(pt.log(), ps.log()), direct)
    x = torch.tensor([0.0, -1e-3], requires_grad=True)  # P_s = 1 exactly stays finite, with gradient
    out = binarised_kl(torch.tensor([-0.5, -0.5]), x).sum()
    out.backward()
    assert torch.isfinite(out) and bool(torch.isfinite(x.grad).all()) and bool((x.grad != 0).all())
