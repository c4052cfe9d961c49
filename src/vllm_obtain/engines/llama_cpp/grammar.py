"""JSON constraints as llama.cpp grammars (GBNF), made with llama-cpp-python's converter.

The converter passes over some schema keywords without enforcing them (numeric bounds among
them: an `age <= 30` came back as 30233168890); a schema using one is refused with a 400 naming
the request field, rather than answered with JSON that may break it. Numeric bounds are written
by our extension of the converter (digit ranges, json_ranges.py) where it can: on an integer,
and on a number whose bounds are whole numbers. A bound anywhere else is refused as before.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterator
from typing import Any

from vllm_obtain.contract import EngineRequestError, JsonOutput
from vllm_obtain.engines.llama_cpp.json_ranges import integer_range, number_range

# Schema keywords llama-cpp-python's grammar converter passes over without enforcing.
UNENFORCED_KEYWORDS = frozenset({
    "multipleOf", "uniqueItems", "not", "contains", "minProperties", "maxProperties",
    "patternProperties", "if", "then", "else", "dependentRequired", "dependentSchemas",
})  # fmt: skip
# Numeric bounds, enforced by _BoundedConverter (draft 4's boolean exclusive* too).
BOUNDS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"})
# Keywords whose value maps names to schemas (the names are not keywords).
_NAMED_SCHEMAS = frozenset({"properties", "$defs", "definitions"})
# Keywords whose value is data, not schemas.
_DATA = frozenset({"enum", "const", "default", "examples"})
# Keywords the converter reads before the type: with them, a schema's bounds go unread.
_SHAPES = frozenset({"$ref", "anyOf", "oneOf", "const", "enum"})


def unenforced_keywords(schema: object) -> set[str]:
    """The keywords of `schema`, at any depth, that no grammar enforces (bounds aside: the
    converter judges those, where it meets them)."""
    return {key for sub in _subschemas(schema) for key in sub if key in UNENFORCED_KEYWORDS}


@functools.lru_cache(maxsize=64)
def gbnf_for(json_output: JsonOutput) -> str:
    """The llama.cpp grammar (GBNF) for a JSON constraint; clients repeat their schemas."""
    from llama_cpp.llama_grammar import JSON_GBNF

    if json_output.schema is None:
        return JSON_GBNF
    schema = json.loads(json_output.schema)
    converter = _converter_class()(
        prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False
    )
    try:
        if unenforced := unenforced_keywords(schema):
            raise _Unenforced(unenforced)
        converter.visit(converter.resolve_refs(schema, "stdin"), "")
        # Bounds where the converter never looked (say, in an integer's allOf) went unread.
        if unread := {
            key
            for sub in _subschemas(schema)
            if id(sub) not in converter.visited
            for key in BOUNDS & sub.keys()
        }:
            raise _Unenforced(unread)
    except _Unenforced as exc:
        raise EngineRequestError(
            "The llama.cpp engine cannot enforce these JSON schema keywords: "
            f"{', '.join(sorted(exc.keywords))}{exc.why}.",
            param=json_output.param,
        ) from None
    except Exception as exc:  # the converter raises bare errors on what it does not support
        raise EngineRequestError(
            f"llama.cpp cannot turn this JSON schema into a grammar: {exc}",
            param=json_output.param,
        ) from exc
    return str(converter.format_grammar())


def _subschemas(schema: object) -> Iterator[dict[str, Any]]:
    """Every object in `schema` that may be a schema, `schema` first (not the data of enum...)."""
    if isinstance(schema, list):
        for item in schema:
            yield from _subschemas(item)
    elif isinstance(schema, dict):
        yield schema
        for key, value in schema.items():
            if key in _NAMED_SCHEMAS and isinstance(value, dict):
                for named in value.values():
                    yield from _subschemas(named)
            elif key not in _DATA:
                yield from _subschemas(value)


class _Unenforced(Exception):
    def __init__(self, keywords: set[str], why: str = "") -> None:
        super().__init__(keywords)
        self.keywords, self.why = keywords, why


@functools.cache
def _converter_class() -> type:
    """llama-cpp-python's converter, taught numeric bounds (made on first use: importing this
    module must not import llama_cpp)."""
    from llama_cpp.llama_grammar import RESERVED_NAMES, SchemaConverter

    class _BoundedConverter(SchemaConverter):
        def __init__(self, **options: Any) -> None:
            super().__init__(**options)
            self.visited: set[int] = set()  # ids of the schema objects visit() saw

        def visit(self, schema: dict[str, Any], name: str) -> str:
            self.visited.add(id(schema))
            kind, bounds = schema.get("type"), BOUNDS & schema.keys()
            rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
            if isinstance(kind, list) and not _SHAPES & schema.keys():
                # The converter would drop the other keywords of a list of types: each keeps them.
                alternatives = [{**schema, "type": one} for one in kind]
                return str(self._add_rule(rule_name, self._generate_union_rule(name, alternatives)))
            if bounds and kind in ("integer", "number") and not _SHAPES & schema.keys():
                return str(self._add_rule(rule_name, f"({_range(schema)}) space"))
            if bounds and kind not in ("string", "boolean", "null", "object", "array"):
                raise _Unenforced(set(bounds))  # beside $ref, anyOf, enum...: the converter's way
            return str(super().visit(schema, name))

    return _BoundedConverter


def _range(schema: dict[str, Any]) -> str:
    """The GBNF of the integers or numbers that `schema`'s bounds allow."""
    # The tightest bound of each side; of two equal ones, the one that excludes its value.
    low, low_excluded = max(_side(schema, "minimum", "exclusiveMinimum"), default=(None, False))
    highs = _side(schema, "maximum", "exclusiveMaximum")
    high, high_excluded = min(highs, key=lambda b: (b[0], not b[1]), default=(None, False))
    if schema["type"] == "integer":
        return integer_range(
            None if low is None else math.floor(low) + 1 if low_excluded else math.ceil(low),
            None if high is None else math.ceil(high) - 1 if high_excluded else math.floor(high),
        )
    fractional = {key for key in BOUNDS & schema.keys() if not _whole(schema[key])}
    if fractional:
        raise _Unenforced(fractional, " (on a number, only whole-number bounds are enforced)")
    return number_range(
        None if low is None else int(low),
        None if high is None else int(high),
        low_excluded=low_excluded,
        high_excluded=high_excluded,
    )


def _side(schema: dict[str, Any], inclusive: str, exclusive: str) -> list[tuple[Any, bool]]:
    """The bounds on one side, (value, excluded): draft 4 writes `exclusiveMinimum: true`."""
    bounds = []
    if inclusive in schema:
        bounds.append((schema[inclusive], schema.get(exclusive) is True))
    if exclusive in schema and not isinstance(schema[exclusive], bool):
        bounds.append((schema[exclusive], True))
    return bounds


def _whole(value: object) -> bool:
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
