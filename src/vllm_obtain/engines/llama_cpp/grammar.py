"""JSON constraints as llama.cpp grammars (GBNF), made with llama-cpp-python's converter.

The converter passes over some schema keywords without enforcing them (numeric bounds among
them: an `age <= 30` came back as 30233168890); a schema using one is refused with a 400 naming
the request field, rather than answered with JSON that may break it.
"""

from __future__ import annotations

import functools
import json

from vllm_obtain.contract import EngineRequestError, JsonOutput

# Schema keywords llama-cpp-python's grammar converter passes over without enforcing.
UNENFORCED_KEYWORDS = frozenset({
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "uniqueItems",
    "not", "contains", "minProperties", "maxProperties", "patternProperties", "if", "then",
    "else", "dependentRequired", "dependentSchemas",
})  # fmt: skip
# Keywords whose value maps names to schemas (the names are not keywords).
_NAMED_SCHEMAS = frozenset({"properties", "$defs", "definitions"})


def unenforced_keywords(schema: object) -> set[str]:
    """The keywords of `schema`, at any depth, that the grammar would not enforce."""
    found: set[str] = set()
    if isinstance(schema, list):
        for item in schema:
            found |= unenforced_keywords(item)
    elif isinstance(schema, dict):
        for key, value in schema.items():
            if key in _NAMED_SCHEMAS and isinstance(value, dict):
                for named in value.values():
                    found |= unenforced_keywords(named)
                continue
            if key in UNENFORCED_KEYWORDS:
                found.add(key)
            if key not in ("enum", "const", "default", "examples"):
                found |= unenforced_keywords(value)
    return found


@functools.lru_cache(maxsize=64)
def gbnf_for(json_output: JsonOutput) -> str:
    """The llama.cpp grammar (GBNF) for a JSON constraint; clients repeat their schemas."""
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    if json_output.schema is None:
        return JSON_GBNF
    unenforced = unenforced_keywords(json.loads(json_output.schema))
    if unenforced:
        raise EngineRequestError(
            "The llama.cpp engine cannot enforce these JSON schema keywords: "
            f"{', '.join(sorted(unenforced))}.",
            param=json_output.param,
        )
    try:
        return json_schema_to_gbnf(json_output.schema)
    except Exception as exc:  # the converter raises bare errors on what it does not support
        raise EngineRequestError(
            f"llama.cpp cannot turn this JSON schema into a grammar: {exc}",
            param=json_output.param,
        ) from exc
