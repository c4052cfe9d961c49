"""`vllm-obtain serve --ray ADDRESS` on a Ray cluster of two nodes on this one machine (a head
and a second raylet, each with resources of its own, as ray.cluster_utils makes them):
replicas are placed on both, and losing the second node's raylet is recovered within 30 s."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.integration.conftest import MODEL, free_port, running_server, wait_for

pytest.importorskip("ray.serve", reason="Ray Serve not installed: ./install.sh --ray")
pytest.importorskip("llama_cpp", reason="llama.cpp engine not installed: ./install.sh")

from ray.cluster_utils import Cluster

OBJECT_STORE_BYTES = 150 * 1024 * 1024


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    # The head has room for both replicas (2 CPUs), the second node for one: Serve spreads
    # replicas over nodes, and the head takes the one a lost node leaves.
    made = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "include_dashboard": False,
            "object_store_memory": OBJECT_STORE_BYTES,
        },
    )
    made.add_node(num_cpus=1, object_store_memory=OBJECT_STORE_BYTES)
    try:
        yield made
    finally:
        made.shutdown()


def ready_replicas(url: str) -> list[dict[str, Any]]:
    models = httpx.get(f"{url}/health", timeout=10).json()["models"]
    return [r for r in models[0].get("replicas", []) if r["state"] == "ready"]


def node_of_each_replica(url: str) -> dict[str, str]:
    return {r["id"]: r["node"] for r in ready_replicas(url)}


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def answers(url: str) -> bool:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4,
    }
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 200


def test_replicas_are_placed_on_both_nodes_and_a_lost_node_is_recovered_within_30_s(
    cluster: Cluster, tmp_path: Path
):
    args = [
        "--ray", cluster.address, "--replicas", "2", "--replica-cpus", "1",
        "--engine", "llama.cpp", "--threads", "1", "--parallel", "2",
        "--embedding-model", "none",
    ]  # fmt: skip
    with running_server(tmp_path, args, free_port()) as server:
        url = server.url
        wait_for(lambda: len(node_of_each_replica(url)) == 2, 60, "two ready replicas")
        placed = node_of_each_replica(url)
        worker = next(iter(cluster.worker_nodes))
        head = cluster.head_node
        assert head is not None
        assert set(placed.values()) == {head.node_id, worker.node_id}
        assert answers(url)
        (on_worker,) = [r for r in ready_replicas(url) if r["node"] == worker.node_id]

        (raylet,) = worker.all_processes["raylet"]
        raylet.process.kill()  # the node is lost: its raylet, then its workers with it
        lost_at = time.monotonic()

        def recovered() -> bool:
            nodes = node_of_each_replica(url)
            return len(nodes) == 2 and worker.node_id not in nodes.values() and answers(url)

        wait_for(recovered, 30, "both replicas back on the remaining node")
        print(f"recovered in {time.monotonic() - lost_at:.1f} s")
        assert answers(url)
        # Its replica and engine went with the node, not left running as orphans.
        wait_for(lambda: gone(on_worker["replica_pid"]) and gone(on_worker["pid"]), 10, "exit")
        # Joined, not started: the server takes its application down and leaves the cluster.
        server.process.terminate()
        server.process.wait(timeout=60)
        assert "Ray is down" not in Path(server.log_path).read_text()
