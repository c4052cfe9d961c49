"""Many real models behind one server: the embedded GGUF and a Q8_0 copy of it on llama.cpp,
its Hugging Face copy on vLLM, another on MLX. Models load when named, the least recently used
idle one makes room under a small memory budget, two models answer at once, and a worker that
dies takes no other model with it."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.gguf_copies import quantize_q8
from tests.integration.conftest import MODEL, free_port, start_server, wait_for
from vllm_obtain.contract import EngineConfig
from vllm_obtain.engines.registry import ENGINES
from vllm_obtain.weights.catalog import load_catalog, packaged_file
from vllm_obtain.weights.footprint import MIB, estimate_footprint

for _engine in ENGINES.values():
    pytest.importorskip(_engine.package, reason=f"needs every engine: {_engine.install_hint}")

Q8, HF, MLX = "smollm2-q8_0", "smollm2-hf", "smollm2-mlx"


def embedded_gguf() -> Path:
    source = load_catalog()["models"][MODEL]["llama.cpp"]
    return packaged_file(source["package"], source["file"])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> Iterator[str]:
    from vllm_obtain.weights.gguf_to_hf import gguf_to_hf

    workdir = tmp_path_factory.mktemp("many-models")
    models = workdir / "models"
    models.mkdir()
    quantize_q8(embedded_gguf(), models / f"{Q8}.gguf")
    converted = gguf_to_hf(embedded_gguf(), shared_cache)
    shutil.copytree(converted, models / HF)
    shutil.copytree(converted, models / MLX)
    # Room for the two models named at start and one more, never for both others at once.
    vllm_config = EngineConfig(cpu_kv_cache_gib=1)
    sizes = {
        MODEL: estimate_footprint(embedded_gguf(), engine="llama.cpp", config=EngineConfig()),
        MLX: estimate_footprint(models / MLX, engine="mlx", config=EngineConfig()),
        Q8: estimate_footprint(models / f"{Q8}.gguf", engine="llama.cpp", config=EngineConfig()),
        HF: estimate_footprint(models / HF, engine="vllm", config=vllm_config),
    }
    total = {name: footprint.total for name, footprint in sizes.items()}
    budget = total[MODEL] + total[MLX] + max(total[Q8], total[HF]) + 256 * MIB
    assert budget < sum(total.values())
    args = [
        MODEL, f"{MLX}@mlx", "--kv-cache-gib", "1", "--memory-budget", str(budget),
        "--keep-alive", "-1", "--pull-allow-http", "--pull-allow-host", "127.0.0.1",
    ]  # fmt: skip
    with start_server(workdir, args, free_port(), cache_dir=shared_cache) as url:
        yield url


@pytest.fixture(scope="module")
def gguf_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A real GGUF (a Q8_0 copy of the embedded model) on a web server on 127.0.0.1: its URL
    and sha256."""
    folder = tmp_path_factory.mktemp("web")
    quantize_q8(embedded_gguf(), folder / "Pulled-Q8_0.gguf")
    digest = hashlib.sha256((folder / "Pulled-Q8_0.gguf").read_bytes()).hexdigest()
    handler = functools.partial(QuietFiles, directory=str(folder))
    web = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{web.server_address[1]}/Pulled-Q8_0.gguf", digest
    finally:
        web.shutdown()


class QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def ask(url: str, model: str, content: str = "Say hello.") -> str:
    client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0
    )
    assert answer.model == model and answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage is not None and answer.usage.completion_tokens > 0
    return answer.choices[0].message.content or ""


def admin(url: str) -> dict[str, dict]:
    listed = httpx.get(f"{url}/admin/models", timeout=10).json()["data"]
    return {model["id"]: model for model in listed}


def test_every_installed_model_is_listed_and_only_those_named_at_start_are_loaded(server):
    listed = {m["id"] for m in httpx.get(f"{server}/v1/models", timeout=10).json()["data"]}
    assert {MODEL, Q8, HF, MLX} <= listed
    models = admin(server)
    engines = {name: models[name]["engine"] for name in (MODEL, Q8, HF, MLX)}
    assert engines == {MODEL: "llama.cpp", Q8: "llama.cpp", HF: "vllm", MLX: "mlx"}
    states = {name: models[name]["state"] for name in (MODEL, Q8, HF, MLX)}
    assert states == {MODEL: "loaded", Q8: "available", HF: "available", MLX: "loaded"}
    assert models[MODEL]["memory_bytes"] > 50 * MIB and models[Q8]["size_bytes"] > 100 * MIB


def test_a_model_named_by_a_request_loads_and_answers(server):
    assert ask(server, MODEL)
    assert ask(server, MLX)
    assert ask(server, Q8)
    assert admin(server)[Q8]["state"] == "loaded"


def test_a_third_model_evicts_the_least_recently_used_idle_one(server):
    assert ask(server, Q8)
    assert ask(server, HF)  # vLLM: room only once the Q8_0 model is unloaded
    models = admin(server)
    assert models[HF]["state"] == "loaded"
    assert models[Q8]["state"] == "available" and models[Q8]["unloads"] == {"memory": 1}
    assert models[MODEL]["state"] == models[MLX]["state"] == "loaded"  # named at start
    metrics = httpx.get(f"{server}/metrics", timeout=10).text
    assert f'vllm_obtain_model_unloads_total{{model="{Q8}",reason="memory"}} 1.0' in metrics


def test_two_models_answer_at_the_same_time(server):
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda model: ask(server, model), [MODEL, HF, MLX] * 2))
    assert all(answers)


def test_killing_one_models_worker_leaves_the_others_serving(server):
    pid = int(
        next(m for m in httpx.get(f"{server}/health").json()["models"] if m["id"] == MLX)["pid"]
    )
    os.kill(pid, signal.SIGKILL)
    assert ask(server, MODEL) and ask(server, HF)
    wait_for(lambda: admin(server)[MLX]["engine_state"] == "ready", 180, "MLX back")
    assert ask(server, MLX)


def test_asking_for_the_evicted_model_again_evicts_the_other(server):
    assert ask(server, Q8)
    models = admin(server)
    assert models[Q8]["state"] == "loaded" and models[HF]["state"] == "available"
    assert models[HF]["unloads"] == {"memory": 1}


def pull_lines(url: str, body: dict[str, str]) -> list[dict]:
    with httpx.stream("POST", f"{url}/admin/pull", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-ndjson"
        return [json.loads(line) for line in response.iter_lines() if line]


def test_a_model_pulled_over_http_is_served_at_once(server, gguf_url):
    url, digest = gguf_url
    wrong = pull_lines(server, {"name": url, "sha256": "0" * 64})
    assert wrong[-1]["status"] == "error" and digest in wrong[-1]["error"]["message"]
    assert "pulled-q8_0" not in admin(server)
    lines = pull_lines(server, {"name": url, "sha256": digest})
    assert lines[0]["status"] == "resolving"
    assert any(line["status"] == "downloading" and line["completed"] > 0 for line in lines)
    assert lines[-1] == {"status": "success", "id": "pulled-q8_0"}
    assert admin(server)["pulled-q8_0"]["state"] == "available"
    assert ask(server, "pulled-q8_0")


def test_ps_shows_what_the_server_has_loaded(server):
    shown = subprocess.run(
        [sys.executable, "-m", "vllm_obtain", "ps", "--base-url", server],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    loaded = {name for name, model in admin(server).items() if model["state"] == "loaded"}
    assert loaded and all(name in shown for name in loaded)
    assert "never" in shown  # the models named at start stay
