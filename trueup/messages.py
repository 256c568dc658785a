"""Turn pydantic validation errors into trueup's one-line messages.

pydantic reports a location tuple and a message meant for programmers; users of the config file
want the dotted field path (``reconciliations.orders.source.key[0]``) and what is expected.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import ErrorDetails

_EXPECTED = {
    "string_type": "expected a string",
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "date_type": "expected a date such as 2026-01-01",
    "date_parsing": "expected a date such as 2026-01-01",
    "date_from_datetime_parsing": "expected a date such as 2026-01-01",
    "missing": "missing required field",
}


#: The longest message one config error prints: a value echoed back (a YAML alias expanded a
#: thousandfold, a pasted document) would otherwise fill the screen for one line.
MAX_MESSAGE = 300


def describe_pydantic_error(error: ErrorDetails, root: type[BaseModel]) -> tuple[str, str]:
    """Return ``(field path, message)`` for one pydantic error against the ``root`` model."""
    path, message = _describe(error, root)
    if len(message) > MAX_MESSAGE:
        message = f"{message[:MAX_MESSAGE - 30]}... ({len(message):,} characters in all)"
    return path, message


def _describe(error: ErrorDetails, root: type[BaseModel]) -> tuple[str, str]:
    loc = _clean_location(error["loc"])
    path = _format_path(loc)
    kind = error["type"]
    value = error.get("input")
    if kind == "extra_forbidden":
        fields = _fields_at(root, loc[:-1])
        known = f" (expected one of: {', '.join(fields)})" if fields else ""
        return path, f"unknown field{known}"
    if kind == "value_error":
        message = str(error["ctx"]["error"]) if "ctx" in error else error["msg"]
        return path, message
    if kind in ("literal_error", "enum"):
        expected = error.get("ctx", {}).get("expected", "")
        return path, f"expected one of {expected.replace(chr(39), '')} (got {value!r})"
    if kind in ("too_short", "too_long"):
        ctx = error.get("ctx", {})
        limit = ctx.get("min_length") if kind == "too_short" else ctx.get("max_length")
        noun = "character" if isinstance(value, str) else "item"
        bound = "at least" if kind == "too_short" else "at most"
        return path, f"expected {bound} {limit} {noun}{'s' if limit != 1 else ''}"
    if kind in ("greater_than", "greater_than_equal"):
        ctx = error.get("ctx", {})
        limit = ctx.get("gt", ctx.get("ge"))
        relation = "greater than" if kind == "greater_than" else "at least"
        return path, f"expected a number {relation} {limit} (got {value!r})"
    message = _EXPECTED.get(kind, error["msg"][:1].lower() + error["msg"][1:])
    if kind != "missing" and not isinstance(value, dict | list):
        message += f" (got {value!r})"
    return path, message


def _clean_location(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    # pydantic adds the validator or union member ("function-after[...]", "str") to a location,
    # and "[key]" for a bad mapping key; neither is a field a user wrote.
    return tuple(
        part for part in loc
        if not (isinstance(part, str) and (part.startswith("function-") or part == "[key]"
                                           or part in {"str", "int", "float", "bool"}))
    )


def _format_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def _fields_at(root: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The field names a user may write at ``loc``, found by walking the model's annotations."""
    annotation: Any = root
    for part in loc:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(str(part))
            if field is None:
                return []
            annotation = field.annotation
        elif typing.get_origin(annotation) in (dict, list):
            annotation = typing.get_args(annotation)[-1]
        else:
            return []
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [name for name, f in annotation.model_fields.items() if not f.exclude]
    return []


def _unwrap(annotation: Any) -> Any:
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(annotation) if a is not type(None)]
            models = [a for a in members if isinstance(a, type) and issubclass(a, BaseModel)]
            annotation = models[0] if models else members[0]
        else:
            return annotation
