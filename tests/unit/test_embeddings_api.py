"""/v1/embeddings on the API layer, with a stand-in embedder (one dimension per character
class, so vectors are predictable). The real model is tested in integration/."""

import base64
import struct
from pathlib import Path

import pytest

from tests.api_helpers import MODEL, ReadyTestClient, assert_error, chat
from tests.scripted_engine import ScriptedEngine
from vllm_obtain.api.app import create_app
from vllm_obtain.contract import EmbeddingModelInfo, EngineState
from vllm_obtain.core.embeddings import EmbeddingModels, ServedEmbedder
from vllm_obtain.core.registry import ModelRegistry
from vllm_obtain.core.served_model import ServedModel, ServingLimits
from vllm_obtain.settings import Settings
from vllm_obtain.wiring import api_config

EMBEDDER = "tiny-embedder"


class CountingEmbedder:
    """Text is tokenized as its characters; a vector counts [vowels, others, tokens], scaled
    to unit length."""

    name = "counting"
    state: EngineState = "ready"

    def __init__(self, *, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[list[list[int]]] = []

    async def load(self) -> EmbeddingModelInfo:
        if self.fail:
            raise RuntimeError("no weights")
        return EmbeddingModelInfo(dimensions=3, context_length=32, vocab_size=256)

    async def unload(self) -> None:
        return None

    def stats(self) -> dict[str, float]:
        return {"running": 0, "waiting": 0}

    async def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return [ord(c) % 256 for c in text]

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        self.calls.append(inputs)
        out = []
        for tokens in inputs:
            vowels = sum(chr(t) in "aeiou" for t in tokens)
            raw = [float(vowels), float(len(tokens) - vowels), float(len(tokens))]
            norm = sum(v * v for v in raw) ** 0.5
            out.append([v / norm for v in raw])
        return out


def client_with(embedder: CountingEmbedder) -> ReadyTestClient:
    served = ServedEmbedder(
        EMBEDDER, weights=lambda: Path("unused"), make_embedder=lambda _: embedder
    )
    registry = ModelRegistry(
        [ServedModel(id=MODEL, engine=ScriptedEngine(), limits=ServingLimits())]
    )
    app = create_app(
        api_config(Settings()), registry=registry, embedding_models=EmbeddingModels([served])
    )
    return ReadyTestClient(app, raise_server_exceptions=False)


@pytest.fixture
def embedder() -> CountingEmbedder:
    return CountingEmbedder()


@pytest.fixture
def client(embedder):
    with client_with(embedder) as client:
        client.post("/v1/embeddings", json={"model": EMBEDDER, "input": "warm"})  # loaded
        yield client


def embed(client, **body):
    return client.post("/v1/embeddings", json={"model": EMBEDDER, **body})


def test_one_text_gives_one_embedding_with_usage(client):
    body = embed(client, input="abc").json()
    assert body["object"] == "list" and body["model"] == EMBEDDER
    (item,) = body["data"]
    assert item["object"] == "embedding" and item["index"] == 0
    assert len(item["embedding"]) == 3
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


def test_list_of_texts_and_token_arrays_keep_their_order(client, embedder):
    texts = embed(client, input=["aaa", "bcd", "abcde"]).json()["data"]
    assert [d["index"] for d in texts] == [0, 1, 2]
    tokens = embed(client, input=[[97, 97, 97], [98, 99, 100]]).json()["data"]
    assert [d["embedding"] for d in tokens] == [d["embedding"] for d in texts[:2]]
    single = embed(client, input=[97, 98]).json()["data"]
    assert len(single) == 1 and embedder.calls[-1] == [[97, 98]]


def test_base64_is_little_endian_float32_of_the_same_vector(client):
    floats = embed(client, input="hello").json()["data"][0]["embedding"]
    encoded = embed(client, input="hello", encoding_format="base64").json()["data"][0]["embedding"]
    decoded = struct.unpack("<3f", base64.b64decode(encoded))
    assert decoded == pytest.approx(floats, rel=1e-6)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": ["ok", ""]}, "input"),
        ({"input": "x" * 33}, "input"),  # longer than the model's 32 tokens
        ({"input": [999]}, "input"),  # not a token of the vocabulary
        ({"input": ["a"] * 2049}, "input"),
        ({"input": "a", "dimensions": 2}, "dimensions"),
        ({"input": "a", "encoding_format": "hex"}, "encoding_format"),
        ({"input": 5}, "input"),
    ],
)
def test_bad_embedding_requests_are_400_naming_the_param(client, body, param):
    response = embed(client, **body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith(param)


def test_dimensions_equal_to_the_models_own_are_accepted(client):
    assert embed(client, input="a", dimensions=3).status_code == 200


def test_models_are_not_mixed_up_between_routes(client):
    assert_error(chat(client, model=EMBEDDER), 400, "model")
    response = client.post("/v1/embeddings", json={"model": MODEL, "input": "a"})
    assert_error(response, 400, "model")
    missing = client.post("/v1/embeddings", json={"model": "nope", "input": "a"})
    assert_error(missing, 404, "model")


def test_embedding_model_is_listed_and_retrievable(client):
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == [MODEL, EMBEDDER]
    assert client.get(f"/v1/models/{EMBEDDER}").json()["id"] == EMBEDDER


def test_an_embedding_model_that_fails_to_load_is_a_503_and_chat_still_works():
    with client_with(CountingEmbedder(fail=True)) as client:
        response = embed(client, input="a")
        assert_error(response, 503, None)
        assert "no weights" in response.json()["error"]["message"]
        assert chat(client).status_code == 200
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [MODEL]


def test_health_reports_the_embedding_model_and_a_failed_one_does_not_block_readiness():
    with client_with(CountingEmbedder()) as client:
        body = client.get("/health").json()
        assert body["status"] == "ok"
        assert body["embedding_models"][0]["id"] == EMBEDDER
        assert body["embedding_models"][0]["state"] == "ready"
    with client_with(CountingEmbedder(fail=True)) as client:
        body = client.get("/health").json()
        assert body["status"] == "degraded" and body["embedding_models"][0]["state"] == "failed"
        assert client.get("/health/ready").status_code == 200
        assert client.get("/health/live").status_code == 200
