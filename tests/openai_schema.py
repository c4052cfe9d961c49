"""Validate responses against OpenAI's published OpenAPI spec (shared/openai-openapi)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

ROOT = Path(__file__).resolve().parents[1]
SPEC_PATH = Path(
    os.environ.get(
        "OPENAI_OPENAPI_SPEC", ROOT.parent / "shared" / "openai-openapi" / "openapi.yaml"
    )
)


@lru_cache(maxsize=1)
def _registry() -> Registry | None:
    if not SPEC_PATH.is_file():
        return None
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    spec = _nullable_as_json_schema(yaml.load(SPEC_PATH.read_text(encoding="utf-8"), Loader=loader))
    resource = Resource.from_contents(spec, default_specification=DRAFT202012)
    return Registry().with_resource("openai.yaml", resource)


def _nullable_as_json_schema(node: Any) -> Any:
    """The spec still uses OpenAPI 3.0's `nullable: true` in places, which JSON Schema ignores;
    rewrite each as `anyOf: [schema, null]`, which is what it means."""
    if isinstance(node, list):
        return [_nullable_as_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {k: _nullable_as_json_schema(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [converted, {"type": "null"}]}
    return converted


def spec_available() -> bool:
    return _registry() is not None


def schema_errors(instance: Any, schema_name: str) -> list[str]:
    """Every way `instance` breaks OpenAI's schema `schema_name` (empty: it conforms)."""
    registry = _registry()
    assert registry is not None, f"OpenAI spec not found at {SPEC_PATH}"
    validator = Draft202012Validator(
        {"$ref": f"openai.yaml#/components/schemas/{schema_name}"}, registry=registry
    )
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(instance)]
