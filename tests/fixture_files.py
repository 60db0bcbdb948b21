"""The vendored fixtures (real tokenizers of the default pair, WikiText-2 text), unpacked on demand.

Shared by the tests (conftest.py) and the benchmarks (bench/), which add tests/ to ``sys.path``.
"""

from __future__ import annotations

import lzma
import shutil
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"


def unpack_real_tokenizers(root: Path) -> dict[str, Path]:
    """Write the Qwen3 (teacher) and SmolLM-135M (student) tokenizers under ``root``; name -> directory."""
    dirs = {}
    for name in ("qwen3", "smollm"):
        d = Path(root) / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "tokenizer.json").write_bytes(lzma.decompress((FIXTURES / f"{name}_tokenizer.json.xz").read_bytes()))
        shutil.copy(FIXTURES / f"{name}_tokenizer_config.json", d / "tokenizer_config.json")
        extra = FIXTURES / f"{name}_special_tokens_map.json"
        if extra.exists():
            shutil.copy(extra, d / "special_tokens_map.json")
        dirs[name] = d
    return dirs


def wikitext_text() -> str:
    """WikiText-2 raw validation split (CC BY-SA 3.0), the copy the package ships."""
    from sar_kd.toy import wikitext_text as bundled

    return bundled()
