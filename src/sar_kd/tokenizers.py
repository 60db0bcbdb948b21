"""Deciding whether teacher and student share a tokenizer (logit KD) or not (hidden-state KD)."""

from __future__ import annotations

PROBES = (
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé: naïve café, straße, Ελληνικά, русский текст.",
    "中文字符和日本語のテキスト、한국어도 있습니다。",
    "Emoji 🤖🚀👍🏽 and flags 🇫🇷 mixed in.",
    "def f(x):\n    return x**2  # code\n\tindent\ttabs",
    "   leading, multiple     inner   and trailing spaces   \n\n\n",
    "Numbers 3.14159, 1,000,000 and 2026-11-27 12:34:56.",
)


def compare_tokenizers(a, b) -> tuple[bool, str]:
    """(compatible, reason): same class, same length, same ids and offsets on :data:`PROBES`."""
    if type(a) is not type(b):
        return False, f"classes differ: {type(a).__name__} vs {type(b).__name__}"
    if len(a) != len(b):
        return False, f"vocabulary sizes differ: {len(a)} vs {len(b)}"
    fast = getattr(a, "is_fast", False) and getattr(b, "is_fast", False)
    for text in PROBES:
        ea = a(text, add_special_tokens=False, return_offsets_mapping=fast)
        eb = b(text, add_special_tokens=False, return_offsets_mapping=fast)
        if ea["input_ids"] != eb["input_ids"]:
            return False, f"different ids on probe {text[:24]!r}"
        if fast and ea["offset_mapping"] != eb["offset_mapping"]:
            return False, f"different offsets on probe {text[:24]!r}"
    return True, f"same class {type(a).__name__}, {len(a)} tokens, identical on {len(PROBES)} probes"
