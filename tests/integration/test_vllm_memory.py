"""vLLM on CPU starts while another process holds memory.

vLLM's own sizing (no --kv-cache-gib) asks for 0.92 of the NUMA node and refused to start when
less was free ("Available memory on node 0 ... is less than desired CPU memory utilization").
A helper process holds enough memory that vLLM's default cannot fit; the server must still
become ready and answer. num_gpu_blocks_override keeps vLLM's KV cache small and
enforce_eager skips its graph compilation (minutes on 2 cores); its memory checks run as
without them."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from tests.integration.conftest import MODEL, free_port, start_server
from vllm_obtain.engines.registry import ENGINES

GIB = 1 << 30
VLLMS_DEFAULT = 0.92  # gpu_memory_utilization
HOLD = """import sys, time
held = b"\\1" * int(sys.argv[1])
print("held", flush=True)
time.sleep(3600)
"""


def node_memory() -> tuple[float, float]:
    """Total and free GiB of the NUMA node vLLM's CPU worker binds to, as vLLM counts them."""
    from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info

    info = get_memory_node_info(get_allowed_cpu_list()[0].numa_node)
    return info.total_memory / GIB, info.available_memory / GIB


@pytest.fixture
def memory_in_use() -> Iterator[None]:
    """A process holding what vLLM's default would need, for as long as the test runs."""
    spec = ENGINES["vllm"]
    pytest.importorskip(spec.package, reason=f"vllm engine not installed: {spec.install_hint}")
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("vLLM on a GPU sizes GPU memory")
    total, free = node_memory()
    held = max(3.0, free - VLLMS_DEFAULT * total + 0.5)  # GiB: vLLM's default no longer fits
    if free - held < 6:
        pytest.skip(f"too little memory free to test this ({free:.1f} GiB)")
    hold = [sys.executable, "-c", HOLD, str(int(held * GIB))]
    holder = subprocess.Popen(hold, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        total, free = node_memory()
        if free >= VLLMS_DEFAULT * total:
            pytest.skip("the node grew: vLLM's default would fit")
        yield
    finally:
        holder.kill()
        holder.wait()


def test_vllm_on_cpu_starts_beside_memory_in_use(
    memory_in_use: None, shared_cache: Path, tmp_path: Path
) -> None:
    args = ["--engine", "vllm", "--vllm-arg", "num_gpu_blocks_override=128"]
    args += ["--vllm-arg", "enforce_eager=true"]
    with start_server(tmp_path, args, free_port(), cache_dir=shared_cache) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0, timeout=300)
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=4
        )
    assert reply.usage is not None and reply.usage.completion_tokens > 0
