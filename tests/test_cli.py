"""What a newcomer meets first: help texts, a typo'd flag, log lines, and the hub when it is unreachable."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from sar_kd import loading
from sar_kd.cli import main
from sar_kd.config import ConfigError, build_parser


def _help(capsys, argv) -> str:
    with pytest.raises(SystemExit):
        main(argv)
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_train_help_texts(capsys):
    text = _help(capsys, ["train", "--help"])
    no_ckpt = text.split("--no_gradient_checkpointing ")[-1].split(" --seed")[0]
    assert no_ckpt.startswith("Turn off activation checkpointing") and "(default" not in no_ckpt
    eval_mb = text.split("--eval_max_batches EVAL_MAX_BATCHES ")[-1].split(" --logging_steps")[0]
    assert eval_mb.count("default") == 1
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "--block_size BLOCK_SIZE Tokens per training block (text is packed, no padding). (default: 1024)" in text


def test_top_level_help_points_to_each_command_help(capsys):
    assert main(["--help"]) == 0
    assert "sar-kd COMMAND --help" in capsys.readouterr().out


@pytest.mark.parametrize(
    "typo, hint", [("--train-steps", "--train_steps"), ("--studnet_lr", "--student_lr"), ("--no_gradient_ckpt", None)]
)
def test_typo_flag_gets_one_line_with_the_closest_flag(capsys, typo, hint):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([typo, "5"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "usage:" not in err
    assert f"unrecognized arguments: {typo}" in err
    if hint:
        assert f"did you mean {hint}?" in err


def test_each_log_line_appears_once():
    code = (
        "from sar_kd.cli import _setup_logging; _setup_logging()\n"
        "import logging; from huggingface_hub.utils import logging as hub; from transformers.utils import logging as tf\n"
        "hub.get_logger('huggingface_hub.utils._http').warning('HUBMSG')\n"
        "tf.get_logger('transformers.modeling_utils').warning('TFMSG')\n"
        "logging.getLogger('sar_kd').info('OURMSG')\n"
    )
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    for msg in ("HUBMSG", "TFMSG", "OURMSG"):
        assert err.count(msg) == 1, err


@pytest.fixture
def hub_down(monkeypatch):
    """No offline flag, and every name lookup fails as it does without a network; counts the lookups."""
    from huggingface_hub import constants

    calls = []

    def no_dns(*args, **kw):
        calls.append(args[0])
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(loading, "_hub_down", {})
    from huggingface_hub.utils import build_hf_headers

    build_hf_headers()  # its once-per-process user-agent registry fetch (silent, no retry) is not ours to count
    calls.clear()
    return calls


def test_unreachable_hub_fails_after_one_lookup_with_what_to_do(hub_down, tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    t0 = time.perf_counter()
    for loader in (loading.load_config, loading.load_tokenizer):
        with pytest.raises(ConfigError) as e:
            loader("nobody/no-such-model", "teacher")
        msg = str(e.value)
        assert "\n" not in msg and "cannot reach the Hugging Face hub" in msg and "not in the local cache" in msg
        assert "pass a local directory" in msg and "HF_HUB_OFFLINE=1" in msg
    assert len(hub_down) == 1  # one lookup, no retries, remembered for the second load
    assert time.perf_counter() - t0 < 10


def test_unreachable_hub_still_loads_a_cached_copy(hub_down, tmp_path, monkeypatch):
    from sar_kd.toy import tiny_llama_config

    cache = tmp_path / "hub"
    snap = cache / "models--someone--tiny" / "snapshots" / ("0" * 40)
    tiny_llama_config(100).save_pretrained(snap)
    (cache / "models--someone--tiny" / "refs").mkdir()
    (cache / "models--someone--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    assert loading.load_config("someone/tiny", "student").vocab_size == 100
    assert len(hub_down) == 1


def test_estimate_of_the_default_pair_makes_no_network_call(hub_down, monkeypatch, capsys):
    import huggingface_hub

    def refuse(*a, **kw):
        raise AssertionError("network call")

    for name in ("get_hf_file_metadata", "hf_hub_download", "snapshot_download"):
        monkeypatch.setattr(huggingface_hub, name, refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    assert main(["estimate", "--json"]) == 0
    out = capsys.readouterr()
    assert hub_down == [] and '"total_bytes"' in out.out
    assert out.err.count("using the bundled config") == 2
