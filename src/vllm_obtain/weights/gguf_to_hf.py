"""Hugging Face-format weights from a GGUF file, for engines that cannot read GGUF (vLLM, MLX).

transformers dequantizes the GGUF; its state dict is copied into a fresh model built from a clean
config (the GGUF-loaded model carries a `quantization_config` that vLLM refuses and that
transformers will not save), and saved with the tokenizer and its chat template. The result is
cached: made once, on first use.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from loguru import logger

COMPLETE_MARKER = ".complete"


def converted_dir(gguf_path: Path, cache_dir: Path) -> Path:
    """Where the HF copy of `gguf_path` lives (one per file name and size)."""
    return cache_dir / "converted" / f"{gguf_path.stem}-{gguf_path.stat().st_size}"


def gguf_to_hf(gguf_path: Path, cache_dir: Path) -> Path:
    """The HF-format directory for `gguf_path`, converting it if it is not cached yet."""
    target = converted_dir(gguf_path, cache_dir)
    if (target / COMPLETE_MARKER).is_file():
        return target
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise RuntimeError(
            "converting GGUF weights for this engine needs torch, transformers and gguf: "
            "./install.sh installs them with the vLLM and MLX engines"
        ) from exc
    logger.info("converting {} to Hugging Face format in {} (once)", gguf_path.name, target)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    folder, name = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)
    fresh = AutoModelForCausalLM.from_config(type(loaded.config).from_dict(config))
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    # bfloat16 halves the size; every engine here computes in it (or upcasts) anyway.
    fresh.to(torch.bfloat16).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / COMPLETE_MARKER).write_text(gguf_path.name)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target
