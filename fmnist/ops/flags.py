"""Command-line flags made from a pydantic model's fields, so that an option is defined once: each field's
name (as `--dashed-name`), type, default, bounds (ge/le) and description become its flag.

A field's `json_schema_extra` may say `{"flag": False}` (set another way, never by its own flag), or
`{"off_flag": "--no-x", "off_help": ...}` (an optional field that one more flag turns off: None).
"""

from __future__ import annotations

import argparse
import math
import typing
from collections.abc import Callable

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

M = typing.TypeVar("M", bound=BaseModel)


def bounded(kind: type, low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a finite number of `kind` from `low` to `high`, or a usage error that says so."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not low <= value <= high:  # also refuses nan, and inf beyond `high`
            raise argparse.ArgumentTypeError(f"{text} is not between {low:g} and {high:g}")
        return value

    return parse


def add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """A flag for each of `model`'s fields that is one, in the fields' order."""
    for name, field in flag_fields(model):
        flag, kind, extra = "--" + name.replace("_", "-"), value_type(name, field), field.json_schema_extra or {}
        described = (field.description or "").replace("%", "%%")  # argparse formats help with %
        if kind is bool:
            if field.default is not False:
                raise TypeError(f"{model.__name__}.{name}: a bool flag turns an option on, so it defaults to False")
            parser.add_argument(flag, action="store_true", help=described)
            continue
        low = next((m.ge for m in field.metadata if isinstance(m, annotated_types.Ge)), -math.inf)
        high = next((m.le for m in field.metadata if isinstance(m, annotated_types.Le)), math.inf)
        parsed = bounded(kind, low, high) if kind in (int, float) else kind
        parser.add_argument(flag, type=parsed, default=field.default, help=described)
        if off := extra.get("off_flag"):
            parser.add_argument(off, action="store_true", help=extra["off_help"])


def model_from_flags(model: type[M], args: argparse.Namespace, **others: object) -> M:
    """`model` from the flags `add_model_flags` added, and the fields that are no flags from `others`."""
    values = dict(others)
    for name, field in flag_fields(model):
        off = (field.json_schema_extra or {}).get("off_flag")
        values[name] = None if off and getattr(args, off.removeprefix("--").replace("-", "_")) else getattr(args, name)
    return model(**values)


def flag_fields(model: type[BaseModel]) -> list[tuple[str, FieldInfo]]:
    return [(n, f) for n, f in model.model_fields.items() if (f.json_schema_extra or {}).get("flag", True)]


def value_type(name: str, field: FieldInfo) -> type:
    """The type a flag parses: the field's, or X of an `X | None` field."""
    kinds = [k for k in typing.get_args(field.annotation) or (field.annotation,) if k is not type(None)]
    if len(kinds) != 1 or not isinstance(kinds[0], type):
        raise TypeError(f"{name}: a flag holds one type, not {field.annotation}")
    return kinds[0]
