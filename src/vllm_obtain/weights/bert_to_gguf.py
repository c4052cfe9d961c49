"""A GGUF file from a Hugging Face BERT sentence-embedding model, for llama.cpp's embedding mode.

Written with the `gguf` package (llama.cpp's own writer and tensor-name tables), following what
llama.cpp's convert_hf_to_gguf.py does for BERT: WordPiece vocabulary in "phantom space" form,
mean/CLS pooling from the sentence-transformers config, weights kept in float32 (these models
are small). Made once, cached under cache/converted/.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from loguru import logger

COMPLETE_MARKER = ".complete"
# HF tensors llama.cpp does not use: the pooler head (sentence-transformers pools itself) and
# a buffer of position ids.
SKIPPED_TENSORS = ("pooler.", "embeddings.position_ids")


def gguf_path_for(model_dir: Path, cache_dir: Path) -> Path:
    weights = model_dir / "model.safetensors"
    name = f"{model_dir.parent.name}-{weights.stat().st_size}"
    return cache_dir / "converted" / name / f"{model_dir.parent.name}.f32.gguf"


def bert_to_gguf(model_dir: Path, cache_dir: Path) -> Path:
    """The GGUF file for the sentence-transformers BERT model in `model_dir`, made if needed."""
    target = gguf_path_for(model_dir, cache_dir)
    if (target.parent / COMPLETE_MARKER).is_file():
        return target
    logger.info("converting {} to GGUF for llama.cpp in {} (once)", model_dir, target.parent)
    staging = target.parent.with_name(target.parent.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    _write(model_dir, staging / target.name)
    (staging / COMPLETE_MARKER).write_text(str(model_dir))
    shutil.rmtree(target.parent, ignore_errors=True)
    staging.rename(target.parent)
    return target


def _phantom(token: str) -> str:
    """llama.cpp's WordPiece vocabulary: word starts carry U+2581, continuations lose '##'."""
    if token.startswith("[") and token.endswith("]"):
        return token
    return token[2:] if token.startswith("##") else "\u2581" + token


def _pooling(model_dir: Path) -> Any:
    import gguf

    config = model_dir / "1_Pooling" / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("pooling_mode_cls_token"):
        return gguf.PoolingType.CLS
    return gguf.PoolingType.MEAN


def _write(model_dir: Path, path: Path) -> None:
    import gguf
    import numpy as np
    from safetensors import safe_open

    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    vocab: dict[str, int] = tokenizer["model"]["vocab"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    blocks = int(config["num_hidden_layers"])

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.BERT])
    writer.add_name(model_dir.parent.name)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_block_count(blocks)
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_layer_norm_eps(float(config["layer_norm_eps"]))
    writer.add_causal_attention(False)
    writer.add_pooling_type(_pooling(model_dir))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    writer.add_tokenizer_model("bert")
    writer.add_token_type_count(int(config.get("type_vocab_size", 1)))
    writer.add_token_list([_phantom(t) for t in tokens])
    special = {t["content"] for t in tokenizer.get("added_tokens", []) if t.get("special")}
    writer.add_token_types(
        [int(gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL) for t in tokens]
    )
    writer.add_bos_token_id(vocab["[CLS]"])
    writer.add_eos_token_id(vocab["[SEP]"])
    writer.add_sep_token_id(vocab["[SEP]"])
    writer.add_unk_token_id(vocab["[UNK]"])
    writer.add_pad_token_id(vocab["[PAD]"])
    writer.add_mask_token_id(vocab["[MASK]"])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(True)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, blocks)
    with safe_open(model_dir / "model.safetensors", "np") as weights:
        for hf_name in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
            if hf_name.startswith(SKIPPED_TENSORS):
                continue
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise ValueError(f"{hf_name}: not a BERT tensor llama.cpp knows")
            writer.add_tensor(name, weights.get_tensor(hf_name).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
