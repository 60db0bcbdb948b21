"""Memory estimate of a SAR-KD run from model configs alone (no weights are downloaded or allocated)."""

from __future__ import annotations

from importlib import resources

from .config import DEFAULT_STUDENT, DEFAULT_TEACHER

BUILTIN = {
    "teacher": ("huihui-moe-1b-a0.6b", DEFAULT_TEACHER),
    "student": ("smollm-135m", DEFAULT_STUDENT),
}


def builtin_config(role: str):
    """The vendored config of the default teacher or student (works offline)."""
    from transformers import AutoConfig

    folder, _ = BUILTIN[role]
    path = resources.files("sar_kd.assets").joinpath("configs").joinpath(folder)
    with resources.as_file(path) as p:
        return AutoConfig.from_pretrained(str(p))
