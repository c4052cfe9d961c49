"""Many models behind one URL, through HTTP, on scripted engines: listing, loading on demand,
the admin routes and the pull stream (the real engines: tests/integration/test_many_models.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from tests.api_helpers import ReadyTestClient, assert_error
from tests.scripted_engine import ScriptedEngine
from vllm_obtain.api.app import create_app
from vllm_obtain.core.registry import ModelRegistry, ModelSource
from vllm_obtain.core.residency import GIB, ResidencyPolicy
from vllm_obtain.core.served_model import ServedModel
from vllm_obtain.settings import Settings
from vllm_obtain.wiring import api_config


def scripted(name: str, gib: float = 1, *, pinned: bool = False) -> ModelSource:
    def build() -> ServedModel:
        return ServedModel(id=name, engine=ScriptedEngine(reply=f"I am {name}."))

    return ModelSource(
        name, "scripted", build, format="gguf", estimated_bytes=int(gib * GIB), pinned=pinned
    )


def client(
    *sources: ModelSource,
    budget_gib: float | None = None,
    keys: list[str] | None = None,
    admin_keys: list[str] | None = None,
    puller: Callable[[str, str | None, Callable[[dict[str, Any]], None]], str] | None = None,
    client_address: str = "127.0.0.1",
) -> ReadyTestClient:
    budget = None if budget_gib is None else int(budget_gib * GIB)
    registry = ModelRegistry(sources=sources, policy=ResidencyPolicy(memory_budget=budget))
    settings = Settings(api_keys=keys or [], admin_keys=admin_keys or [])
    app = create_app(api_config(settings), registry, model_puller=puller)
    return ReadyTestClient(app, raise_server_exceptions=False, client=(client_address, 5000))


def ask(http: ReadyTestClient, model: str, **headers: str) -> Any:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return http.post("/v1/chat/completions", json=body, headers=headers)


def admin_states(http: ReadyTestClient, **headers: str) -> dict[str, str]:
    listed = http.get("/admin/models", headers=headers).json()
    assert listed["object"] == "list"
    return {m["id"]: m["state"] for m in listed["data"]}


def test_every_servable_model_is_listed_and_one_loads_when_a_request_names_it():
    with client(scripted("start", pinned=True), scripted("other")) as http:
        listed = http.get("/v1/models").json()
        assert [m["id"] for m in listed["data"]] == ["start", "other"]
        assert http.get("/v1/models/other").json()["id"] == "other"
        assert admin_states(http) == {"start": "loaded", "other": "available"}
        answer = ask(http, "other")
        assert answer.status_code == 200
        assert answer.json()["choices"][0]["message"]["content"] == "I am other."
        assert admin_states(http) == {"start": "loaded", "other": "loaded"}
        health = http.get("/health").json()
        assert health["status"] == "ok"
        assert [m["id"] for m in health["models"]] == ["start", "other"]


def test_admin_reports_each_model_in_full():
    with client(scripted("a", 2, pinned=True)) as http:
        (model,) = http.get("/admin/models").json()["data"]
        assert model["id"] == "a" and model["engine"] == "scripted" and model["format"] == "gguf"
        assert model["estimated_bytes"] == 2 * GIB and model["pinned"] is True
        assert model["state"] == "loaded" and model["expires_at"] is None
        assert isinstance(model["last_used"], float) and model["loads"] == 1


def test_admin_load_and_unload():
    with client(scripted("a")) as http:
        loaded = http.post("/admin/models/a/load")
        assert loaded.status_code == 200 and loaded.json()["state"] == "loaded"
        unloaded = http.post("/admin/models/a/unload")
        assert unloaded.status_code == 200 and unloaded.json()["state"] == "available"
        assert unloaded.json()["unloads"] == {"admin": 1}
        assert_error(http.post("/admin/models/nope/load"), 404, "model", "model_not_found")


def test_a_model_larger_than_the_budget_is_a_400_naming_both_sizes():
    with client(scripted("small", 1), scripted("huge", 5), budget_gib=4) as http:
        error = assert_error(ask(http, "huge"), 400, "model", "model_too_large")
        assert "5.0 GiB" in error["message"] and "4.0 GiB" in error["message"]
        assert ask(http, "small").status_code == 200


def test_asking_for_a_third_model_evicts_the_least_recently_used():
    with client(scripted("a", 2), scripted("b", 2), scripted("c", 2), budget_gib=5) as http:
        for name in ("a", "b", "a", "c"):
            assert ask(http, name).status_code == 200
        assert admin_states(http) == {"a": "loaded", "b": "available", "c": "loaded"}
        metrics = http.get("/metrics").text
        assert 'vllm_obtain_model_unloads_total{model="b",reason="memory"} 1.0' in metrics
        assert 'vllm_obtain_model_loaded{engine="scripted",model="c"} 1.0' in metrics


def test_admin_needs_an_admin_key_a_user_key_is_refused_with_403():
    with client(scripted("a", pinned=True), keys=["sk-user"], admin_keys=["sk-admin"]) as http:
        assert_error(http.get("/admin/models"), 401, None, "invalid_api_key")
        refused = http.post("/admin/models/a/unload", headers={"Authorization": "Bearer sk-user"})
        assert_error(refused, 403, None, "admin_key_required")
        assert admin_states(http, Authorization="Bearer sk-admin") == {"a": "loaded"}
        # The admin key calls the inference API too.
        assert ask(http, "a", Authorization="Bearer sk-admin").status_code == 200


def test_with_user_keys_and_no_admin_key_admin_routes_are_refused_saying_how_to_allow_them():
    with client(scripted("a", pinned=True), keys=["sk-user"]) as http:
        refused = http.get("/admin/models", headers={"Authorization": "Bearer sk-user"})
        error = assert_error(refused, 403, None, "admin_key_required")
        assert "--admin-key" in error["message"]


def test_without_keys_admin_routes_serve_this_machine_only():
    sources = (scripted("a", pinned=True),)
    with client(*sources) as http:
        assert admin_states(http) == {"a": "loaded"}
    with client(*sources, client_address="192.168.1.20") as http:
        error = assert_error(http.get("/admin/models"), 403, None, "admin_local_only")
        assert "--admin-key" in error["message"]
        assert ask(http, "a").status_code == 200  # the inference API stays open


def test_pull_streams_progress_as_json_lines_then_the_id():
    def puller(name: str, sha256: str | None, report: Callable[[dict[str, Any]], None]) -> str:
        report({"status": "downloading", "file": "x.gguf", "completed": 0, "total": 10})
        report({"status": "downloading", "file": "x.gguf", "completed": 10, "total": 10})
        return f"{name}-id"

    with client(scripted("a", pinned=True), puller=puller) as http:
        response = http.post("/admin/pull", json={"name": "org/x:Q4_0"})
        assert response.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in response.text.splitlines()]
        assert lines[0]["status"] == "downloading"
        assert lines[-2] == {
            "status": "downloading",
            "file": "x.gguf",
            "completed": 10,
            "total": 10,
        }
        assert lines[-1] == {"status": "success", "id": "org/x:Q4_0-id"}


def test_a_failed_pull_ends_its_stream_with_the_error():
    def puller(name: str, sha256: str | None, report: Callable[[dict[str, Any]], None]) -> str:
        raise RuntimeError("checksum mismatch: expected ab, got cd")

    with client(scripted("a", pinned=True), puller=puller) as http:
        response = http.post("/admin/pull", json={"name": "http://127.0.0.1/x.gguf"})
        last = json.loads(response.text.splitlines()[-1])
        assert last["status"] == "error" and "checksum mismatch" in last["error"]["message"]
        assert_error(http.post("/admin/pull", json={}), 400, "name")


def test_a_request_refused_for_an_unsupported_param_loads_no_model():
    with client(scripted("start", pinned=True), scripted("other")) as http:
        body = {"model": "other", "prompt": "hi", "suffix": "there"}
        assert_error(http.post("/v1/completions", json=body), 400, "suffix", "unsupported")
        assert admin_states(http) == {"start": "loaded", "other": "available"}
