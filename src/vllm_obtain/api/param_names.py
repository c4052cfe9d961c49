"""A validation error's location as OpenAI names the param: `messages.[0].content`,
`text.format.schema`, `input`.

pydantic's locations also hold the union member each error came from: a discriminator's value
(`json_schema`), a model's name (`MessageItem`), a type's label (`constrained-str`,
`list[int]`). Those are not fields; telling them apart needs the model itself, so the location
is walked down the request model: a part that names a field (or indexes a list, or keys a
dict) is kept, any other part picks the union member it names and is dropped.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel


def param_name(loc: Sequence[int | str], model: Any = None) -> str | None:
    """`("body", "messages", 0, "role")` -> "messages.[0].role" (None for the body itself)."""
    parts = _in_request(loc)
    kept = _fields_in(parts, model)[0] if model is not None else parts
    return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in kept) or None


def most_telling(errors: Sequence[dict[str, Any]], model: Any = None) -> dict[str, Any]:
    """Of the errors pydantic found, the one to tell the client. A value matching none of a
    union's members gets an error from each: the member with the fewest is the one the client
    meant (a list of texts with one empty text), and of its errors the deepest names the spot."""
    if model is None or len(errors) == 1:
        return errors[0]
    located = [(_fields_in(_in_request(e.get("loc", ())), model), e) for e in errors]
    per_branch: dict[tuple[int | str, ...], int] = {}
    for (_, branch), _error in located:
        per_branch[branch] = per_branch.get(branch, 0) + 1
    best = min(located, key=lambda item: (per_branch[item[0][1]], -len(item[0][0])))
    return best[1]


def _in_request(loc: Sequence[int | str]) -> list[int | str]:
    """The location inside the request's body (or query, or path)."""
    return list(loc[1:]) if loc and loc[0] in ("body", "query", "path") else list(loc)


def _fields_in(
    parts: Sequence[int | str], model: Any
) -> tuple[list[int | str], tuple[int | str, ...]]:
    """The parts that name fields, and the location up to the first union tag (the branch
    of the union the error came from)."""
    kept: list[int | str] = []
    branch: tuple[int | str, ...] | None = None
    current: Any = model
    for position, part in enumerate(parts):
        current = _bare(current)
        members = _members(current)
        tagged = _member_named(members, part)
        if tagged is not None:  # a union's tag: which member the rest is about
            current = tagged
            branch = branch or tuple(parts[: position + 1])
            continue
        if not _leads_to(current, part):  # a type's label (constrained-str, list[int])
            lists = [m for m in members if get_origin(m) in (list, tuple)]
            current = lists[0] if len(lists) == 1 else current
            branch = branch or tuple(parts[: position + 1])
            continue
        if members:
            current = _bare(next(m for m in members if _leads_to(m, part)))
        kept.append(part)
        current = _step(current, part)
    return kept, branch or tuple(parts)


def _bare(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def _members(annotation: Any) -> list[Any]:
    if isinstance(annotation, types.UnionType) or get_origin(annotation) is Union:
        return [_bare(m) for m in get_args(annotation) if m is not type(None)]
    return []


def _leads_to(annotation: Any, part: int | str) -> bool:
    """Whether `part` is a step into a value of this type (a field, an index, a key)."""
    if annotation is Any:
        return True
    members = _members(annotation)
    if members:
        return any(_leads_to(m, part) for m in members)
    if isinstance(part, int):
        return get_origin(annotation) in (list, tuple)
    if get_origin(annotation) is dict:
        return True
    return _is_model(annotation) and _field(annotation, part) is not None


def _step(annotation: Any, part: int | str) -> Any:
    if isinstance(part, int) or get_origin(annotation) is dict:
        args = get_args(annotation)
        return args[-1] if args else Any
    field = _field(annotation, part) if _is_model(annotation) else None
    return field.annotation if field is not None else Any


def _member_named(members: list[Any], tag: int | str) -> Any:
    """The union member an error's tag names, by class name or by the value of a Literal
    field (a discriminator); None when the part is no such tag."""
    for member in members:
        if not _is_model(member):
            continue
        if member.__name__ == tag:
            return member
        for field in member.model_fields.values():
            annotation = _bare(field.annotation)
            if get_origin(annotation) is Literal and tag in get_args(annotation):
                return member
    return None


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _field(model: type[BaseModel], name: int | str) -> Any:
    for field_name, field in model.model_fields.items():
        if name in (field_name, field.alias):
            return field
    return None
