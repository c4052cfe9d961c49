"""Command-line flags made from the Settings fields, and the settings a command line gives."""

from __future__ import annotations

import argparse
import json
import types
from collections.abc import Collection
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BeforeValidator

from vllm_obtain.settings import Settings, choices_of, default_of, flag_of, shown_as

# The settings of the `pull` command besides the folders: what a URL pull may reach and write.
PULL_SETTINGS = ("pull_allow_http", "pull_allow_hosts", "pull_max_size")


def add_settings_flags(
    parser: argparse.ArgumentParser, only: Collection[str] | None = None
) -> None:
    """One flag per Settings field (the model is positional), or per field named in `only`.
    An unset flag stays None, which leaves env vars and the .env file in charge."""
    for name, field in Settings.model_fields.items():
        if only is not None and name not in only:
            continue
        help_text = f"{field.description} (default: {default_of(name) or 'none'})"
        help_text = help_text.replace("%", "%%")  # argparse %-formats help texts
        if name == "model":
            parser.add_argument("model", nargs="*", default=None, help=help_text)
            continue
        options: dict[str, Any] = {"dest": name, "default": None, "help": help_text}
        shown = shown_as(name)
        kind = _plain_type(field.annotation)
        if choices := choices_of(name):
            options["choices"] = list(choices)
        elif kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif get_origin(kind) is dict:
            options |= {"action": "append", "type": parse_engine_arg}
        elif get_origin(kind) is list:
            options["action"] = "append"
        elif kind in (int, float) and not _parses_text(field.metadata):
            options["type"] = kind
        if "metavar" in shown:
            options["metavar"] = shown["metavar"]
        if "const" in shown:  # a value of its own when given alone (`--ray`)
            options |= {"nargs": "?", "const": shown["const"]}
        parser.add_argument(flag_of(name), **options)


def _parses_text(metadata: list[Any]) -> bool:
    """Whether the field reads its own text (a duration such as 30d) before its type's rules."""
    return any(isinstance(item, BeforeValidator) for item in metadata)


def _plain_type(annotation: Any) -> Any:
    """`int | None` -> int; `Annotated[list[str], ...]` -> list[str]."""
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if isinstance(annotation, types.UnionType) or get_origin(annotation) is Union:
        members = [arg for arg in get_args(annotation) if arg is not type(None)]
        annotation = members[0] if len(members) == 1 else annotation
    return annotation


def settings_from(args: argparse.Namespace) -> Settings:
    """The settings a command line gives: its flags over env vars, the .env file, defaults."""
    return Settings(**overrides_from(args))


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the command line sets (a repeated KEY=VALUE flag becomes a dict)."""
    overrides = {}
    for name, field in Settings.model_fields.items():
        value = getattr(args, name, None)
        if value is not None and value != []:  # no positional MODEL: leave it to the env
            is_dict = get_origin(_plain_type(field.annotation)) is dict
            overrides[name] = dict(value) if is_dict else value
    return overrides


def parse_engine_arg(text: str) -> tuple[str, Any]:
    """`key=value` -> (key, value), the value read as JSON when it is JSON (2, true, "auto")."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip().replace("-", "_"), json.loads(raw)
    except json.JSONDecodeError:
        return key.strip().replace("-", "_"), raw


def add_storage_flags(parser: argparse.ArgumentParser) -> None:
    """--models-dir and --cache-dir, as serve has them (unset: env vars, .env, defaults)."""
    for name in ("models_dir", "cache_dir"):
        field = Settings.model_fields[name]
        parser.add_argument(
            flag_of(name),
            dest=name,
            default=None,
            help=f"{field.description} (default: {default_of(name) or 'none'})",
        )
