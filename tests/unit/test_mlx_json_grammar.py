"""The MLX engine's JSON constraint bounds whitespace as llama.cpp's grammars do: at most one space
around each `,` and `:`. llguidance's default let a small model pad between items with tabs and
newlines until max_tokens. Driven through the logits processor, on the embedded model's
tokenizer read from its GGUF file (no weights are loaded)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from vllm_obtain.contract import JsonOutput
from vllm_obtain.engines.mlx.json_grammar import JsonGrammars
from vllm_obtain.weights.catalog import ModelResolutionError, load_catalog, packaged_file

mx = pytest.importorskip("mlx.core", reason="MLX engine not installed: ./install.sh --engines mlx")
pytest.importorskip("llguidance", reason="MLX engine not installed: ./install.sh --engines mlx")
pytest.importorskip("transformers", reason="reading the GGUF tokenizer needs transformers")
pytest.importorskip("gguf", reason="reading the GGUF tokenizer needs gguf")

PET = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "toys": {"type": "array", "items": {"type": "string"}},
        "owner": {"type": "object"},
    },
    "required": ["name", "age"],
}
VALUE = {"name": "Tom", "age": 3, "toys": ["ball", "mouse"], "owner": {"name": "Ann", "pets": []}}
PADDED = '{"name": "Tom",\t\t\t\t\n\n\n\t\t"age": 3}'


class Tokenizer:
    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf = hf_tokenizer
        self.eos: int = hf_tokenizer.eos_token_id
        self.grammars = JsonGrammars(hf_tokenizer, [self.eos])

    def accepts(self, json_output: JsonOutput, text: str) -> bool:
        """Whether the constraint lets the model write `text` token by token, then end."""
        processor = self.grammars.processor(json_output)
        tokens = [self.eos]  # the prompt
        logits = mx.zeros((1, len(self.hf)))
        for token in [*self.hf.encode(text, add_special_tokens=False), self.eos]:
            allowed = processor(mx.array(tokens)[None], logits)
            if not bool(mx.isfinite(allowed[0, token]).item()):
                return False
            tokens.append(token)
        return True


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    from transformers import AutoTokenizer

    source = load_catalog()["models"]["smollm2-135m-instruct"]["llama.cpp"]
    try:
        gguf = packaged_file(source["package"], source["file"])
    except ModelResolutionError as exc:
        pytest.skip(f"the embedded model is not installed: {exc}")
    return Tokenizer(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))


SCHEMA = JsonOutput(json.dumps(PET))
ANY_OBJECT = JsonOutput()  # json_object
# A client's own llguidance options do not lift the bound.
LIFTED = JsonOutput(json.dumps(PET | {"x-guidance": {"whitespace_pattern": r"\s+"}}))


@pytest.mark.parametrize("json_output", [SCHEMA, ANY_OBJECT, LIFTED], ids=["schema", "any", "x"])
def test_compact_and_spaced_json_are_accepted(tokenizer, json_output):
    assert tokenizer.accepts(json_output, json.dumps(VALUE, separators=(",", ":")))
    assert tokenizer.accepts(json_output, json.dumps(VALUE))  # ", " and ": "
    assert tokenizer.accepts(json_output, '{"name" : "Tom" , "age" : 3}')  # one space each side


@pytest.mark.parametrize("json_output", [SCHEMA, ANY_OBJECT, LIFTED], ids=["schema", "any", "x"])
@pytest.mark.parametrize(
    "text",
    [
        PADDED,
        '{"name": "Tom",  "age": 3}',
        '{"name":   "Tom", "age": 3}',
        json.dumps(VALUE, indent="\t"),
        '{ "name": "Tom", "age": 3 }',
    ],
    ids=["tabs-and-newlines", "two-spaces", "three-spaces", "indented", "inside-braces"],
)
def test_runs_of_whitespace_are_refused(tokenizer, json_output, text):
    assert not tokenizer.accepts(json_output, text)


def test_the_answer_still_follows_the_schema(tokenizer):
    assert tokenizer.accepts(SCHEMA, '{"name": "Tom   the cat", "age": 3}')  # inside a string
    assert not tokenizer.accepts(SCHEMA, '{"name": "Tom", "age": "3"}')
    assert not tokenizer.accepts(ANY_OBJECT, "[1, 2]")
