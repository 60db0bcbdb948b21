"""GGUF checkpoints wherever a model is named (train, estimate, apply-router), offline.

The tiny GGUF files are written here with the ``gguf`` package the way llama.cpp's ``convert_hf_to_gguf.py``
writes a model (F32 tensors, its tensor names and metadata keys, its q/k permutation for llama, the
byte-level BPE vocabulary as ``tokenizer.ggml.*``) and loaded back through transformers' own GGUF loader.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import base_args
from sar_kd import loading
from sar_kd.cli import main
from sar_kd.config import ConfigError, config_from_args
from sar_kd.estimate import count_model
from sar_kd.routers import find_routers, router_params
from sar_kd.tokenizers import PROBES, compare_tokenizers

gguf = pytest.importorskip("gguf")  # the [gguf] extra (part of [dev])


def _permute(w, n_head: int, n_head_kv: int):
    """llama.cpp's q/k row order for llama (``LlamaModel.permute``); transformers undoes it on loading."""
    if n_head_kv != n_head:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model):
    """(GGUF name, F32 array) of every weight, named and laid out as llama.cpp writes them."""
    c = model.config
    arch = gguf.MODEL_ARCH.LLAMA if c.model_type == "llama" else gguf.MODEL_ARCH.QWEN3MOE
    names = gguf.get_tensor_name_map(arch, c.num_hidden_layers)
    for key, value in model.state_dict().items():
        a = value.detach().float().numpy()
        if key == "lm_head.weight" and c.tie_word_embeddings:
            continue  # a GGUF without output.weight is tied
        if key.endswith("mlp.experts.gate_up_proj"):  # (experts, 2 x inter, hidden): gate rows first
            block, inter = key.split(".")[2], a.shape[1] // 2
            yield f"blk.{block}.ffn_gate_exps.weight", a[:, :inter]
            yield f"blk.{block}.ffn_up_exps.weight", a[:, inter:]
            continue
        if key.endswith("mlp.experts.down_proj"):
            yield f"blk.{key.split('.')[2]}.ffn_down_exps.weight", a
            continue
        base, suffix = key.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        if c.model_type == "llama" and ".attn_q." in name:
            a = _permute(a, c.num_attention_heads, c.num_attention_heads)
        elif c.model_type == "llama" and ".attn_k." in name:
            a = _permute(a, c.num_attention_heads, c.num_key_value_heads)
        yield name, a


def write_gguf(model, tokenizer, path: Path) -> Path:
    """``model`` (a Llama or Qwen3-MoE) and its byte-level BPE ``tokenizer`` as one F32 GGUF file."""
    import numpy as np

    c = model.config
    arch = "llama" if c.model_type == "llama" else "qwen3moe"
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    if arch == "llama":
        w.add_rope_dimension_count(c.head_dim)
    else:
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
        w.add_expert_count(c.num_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
    backend = tokenizer.backend_tokenizer
    vocab = backend.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    special = set(tokenizer.all_special_tokens)
    merges = json.loads(backend.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    for add, token_id in ((w.add_bos_token_id, c.bos_token_id), (w.add_eos_token_id, c.eos_token_id)):
        if token_id is not None:
            add(token_id)
    if c.pad_token_id is not None:
        w.add_pad_token_id(c.pad_token_id)
    for name, a in _tensors(model):
        w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def gguf_student(tiny_pair, tmp_path_factory):
    """The tiny pair's Llama student and tokenizer, and the same model written as a GGUF file."""
    model = AutoModelForCausalLM.from_pretrained(tiny_pair["student"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny_pair["student"])
    path = write_gguf(model, tok, tmp_path_factory.mktemp("gguf") / "student" / "tiny-student.F32.gguf")
    return {"model": model, "tok": tok, "path": path}


@pytest.fixture(scope="module")
def gguf_teacher(tiny_pair, tmp_path_factory):
    """A tiny Qwen3-MoE teacher on the pair's tokenizer written as a GGUF file.

    transformers reads no expert width from a qwen3moe GGUF (llama.cpp's ``expert_feed_forward_length``
    is written all the same) and takes Qwen3MoeConfig's default, 768 (Qwen3-30B-A3B's), so the tiny
    teacher has that width.
    """
    from sar_kd.toy import tiny_moe_config

    tok = AutoTokenizer.from_pretrained(tiny_pair["teacher"])
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(tiny_moe_config(len(tok), hidden=32, moe_intermediate_size=768)).eval()
    for r in find_routers(model):
        torch.nn.init.normal_(r.module.weight, std=0.5)
    path = write_gguf(model, tok, tmp_path_factory.mktemp("gguf") / "teacher" / "tiny-moe.F32.gguf")
    return {"model": model, "tok": tok, "path": path}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[1, 5, 17, 200, 33, 9, 383, 0, 42, 42, 7, 100]])


def test_gguf_student_loads_as_a_plain_saveable_model(gguf_student, tmp_path):
    model = loading.load_model(str(gguf_student["path"]), "student", torch.float32)
    assert getattr(model.config, "quantization_config", None) is None
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as the original
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    torch.testing.assert_close(_logits(model, IDS), _logits(gguf_student["model"], IDS), atol=1e-5, rtol=0)
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((tmp_path / "saved" / "config.json").read_text())
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    torch.testing.assert_close(_logits(again, IDS), _logits(model, IDS), atol=0, rtol=0)


def test_gguf_path_and_folder_with_flag_are_the_same_model(gguf_student):
    path = gguf_student["path"]
    as_path = loading.load_model(str(path), "student", torch.float32)
    as_flag = loading.load_model(str(path.parent), "student", torch.float32, gguf_file=path.name)
    torch.testing.assert_close(_logits(as_flag, IDS), _logits(as_path, IDS), atol=0, rtol=0)
    for conf in (
        loading.load_config(str(path), "student"),
        loading.load_config(str(path.parent), "student", gguf_file=path.name),
    ):
        assert (conf.model_type, conf.hidden_size, conf.num_hidden_layers) == ("llama", 48, 2)
        assert conf.vocab_size == len(gguf_student["tok"]) and conf.tie_word_embeddings
    for tok in (
        loading.load_tokenizer(str(path), "student"),
        loading.load_tokenizer(str(path.parent), "student", gguf_file=path.name),
    ):
        assert len(tok) == len(gguf_student["tok"])
        same, why = compare_tokenizers(gguf_student["tok"], tok)  # same ids and offsets on every probe
        assert same, why
        assert tok(PROBES[0])["input_ids"] == gguf_student["tok"](PROBES[0])["input_ids"]


def test_gguf_moe_teacher_loads_with_its_routers(gguf_teacher):
    model = loading.load_model(str(gguf_teacher["path"]), "teacher", torch.float32)
    assert type(model).__name__ == "Qwen3MoeForCausalLM" and len(find_routers(model)) == 2
    torch.testing.assert_close(_logits(model, IDS), _logits(gguf_teacher["model"], IDS), atol=1e-5, rtol=0)


def test_missing_gguf_package_is_one_line_naming_the_extra(tiny_pair, gguf_student, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    loads = []
    monkeypatch.setattr(loading, "_from_pretrained", lambda *a, **kw: loads.append(a))
    args = base_args(tiny_pair, tmp_path / "out", student_model=str(gguf_student["path"]))
    with pytest.raises(ConfigError, match=r'pip install "sar-kd\[gguf\]"') as e:
        config_from_args(args)
    assert "\n" not in str(e.value) and "--student_model" in str(e.value)
    with pytest.raises(ConfigError, match=r"sar-kd\[gguf\]"):
        loading.load_model(
            str(gguf_student["path"].parent), "student", torch.float32, gguf_file="tiny-student.F32.gguf"
        )
    assert main(["train", *args]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(err) == 1 and 'pip install "sar-kd[gguf]"' in err[0]
    assert loads == [] and not (tmp_path / "out").exists()


BAD = {
    "flag_with_hub_id": (
        lambda s: {"student_model": "someone/tiny", "student_gguf_file": s.name},
        "--student_gguf_file needs a local folder",
    ),
    "flag_not_gguf": (
        lambda s: {"student_model": str(s.parent), "student_gguf_file": "model.safetensors"},
        "--student_gguf_file model.safetensors: not a .gguf file name",
    ),
    "flag_file_missing": (
        lambda s: {"student_model": str(s.parent), "student_gguf_file": "other.gguf"},
        f"no such file in {{}} (it holds {'tiny-student.F32.gguf'})",
    ),
    "path_and_flag": (
        lambda s: {"student_model": str(s), "student_gguf_file": s.name},
        "is already a .gguf file",
    ),
    "path_missing": (lambda s: {"student_model": str(s.parent / "gone.gguf")}, "no such .gguf file"),
    "flag_folder_missing": (
        lambda s: {"student_model": str(s.parent / "nowhere"), "student_gguf_file": s.name},
        "no such directory",
    ),
    "folder_without_flag": (
        lambda s: {"student_model": str(s.parent)},
        "no config.json in that directory, but it holds tiny-student.F32.gguf: pass --student_gguf_file",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_gguf_names_are_refused_before_loading(case, tiny_pair, gguf_student, tmp_path, monkeypatch, capsys):
    import transformers

    loads = []  # no model is loaded (the teacher's tokenizer may be, for the error raised at loading)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **kw: loads.append(a))
    over, message = BAD[case]
    path = gguf_student["path"]
    out = tmp_path / "out"
    assert main(["train", *base_args(tiny_pair, out, **over(path))]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(err) == 1 and message.format(path.parent) in err[0], err
    assert loads == [] and not out.exists()


def test_estimate_reads_the_configs_of_gguf_files(gguf_teacher, gguf_student, capsys):
    t = gguf_teacher["path"]
    rc = main(["estimate", "--teacher_model", str(t.parent), "--teacher_gguf_file", t.name,
               "--student_model", str(gguf_student["path"]), "--block_size", "64", "--json"])  # fmt: skip
    assert rc == 0
    est = json.loads(capsys.readouterr().out)
    assert est["params"]["teacher"] == count_model(gguf_teacher["model"].config).params
    assert est["params"]["student"] == count_model(gguf_student["model"].config).params
    assert main(["estimate", "--teacher_model", str(t), "--teacher_gguf_file", t.name]) == 2
    assert "already a .gguf file" in capsys.readouterr().err


def test_apply_router_with_a_gguf_teacher(gguf_teacher, tmp_path):
    teacher, path = gguf_teacher["model"], gguf_teacher["path"]
    update = {n: torch.randn_like(p) for n, p in router_params(teacher, find_routers(teacher)).items()}
    torch.save(update, tmp_path / "router_update.pt")
    dest = tmp_path / "adapted"
    rc = main(["apply-router", "--teacher_model", str(path.parent), "--teacher_gguf_file", path.name,
               "--router_update", str(tmp_path / "router_update.pt"), "--output_dir", str(dest)])  # fmt: skip
    assert rc == 0
    assert (dest / "model.safetensors").is_file() and not list(dest.glob("*.gguf"))
    adapted = AutoModelForCausalLM.from_pretrained(dest).state_dict()
    orig = teacher.state_dict()
    assert set(adapted) == set(orig)
    for k in orig:
        assert torch.equal(adapted[k], update[k] if k in update else orig[k]), k
    tok = AutoTokenizer.from_pretrained(dest)
    assert (
        len(tok) == len(gguf_teacher["tok"])
        and tok(PROBES[0])["input_ids"] == gguf_teacher["tok"](PROBES[0])["input_ids"]
    )


def test_two_step_train_with_a_gguf_student_writes_safetensors(tiny_pair, gguf_student, tmp_path, capsys):
    out = tmp_path / "out"
    args = base_args(tiny_pair, out, student_model=str(gguf_student["path"]), train_steps=2, eval_steps=0, save_steps=0)
    assert main(["train", *args]) == 0
    assert json.loads((out / "sar_kd_config.json").read_text())["mode"] == "logit"  # same tokenizer as the teacher
    student = out / "student"
    assert (student / "model.safetensors").is_file() and not list(student.glob("*.gguf"))
    assert "quantization_config" not in json.loads((student / "config.json").read_text())
    trained = AutoModelForCausalLM.from_pretrained(student).eval()
    assert not torch.equal(trained.model.embed_tokens.weight, gguf_student["model"].model.embed_tokens.weight)
    assert len(AutoTokenizer.from_pretrained(student)) == len(gguf_student["tok"])
