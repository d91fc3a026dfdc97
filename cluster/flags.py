"""Command-line flags made from typed config fields: each flag's default, help, type and choices."""

from __future__ import annotations

import argparse
import types
from collections.abc import Iterable
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo


def add_config_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    model: type[BaseModel],
    names: Iterable[str],
    defaults: BaseModel | None = None,
    overriding: str | None = None,
) -> None:
    """One `--kebab-name` flag per field `names` of `model`, its default taken from `defaults` (an
    instance, for a context that overrides the model's default) or from the field; or, for flags
    `overriding` a config file's section (named so in the help), None: the file's value."""
    for name in names:
        field = model.model_fields[name]
        default = (
            field.get_default(call_default_factory=True) if defaults is None else getattr(defaults, name)
        )
        options = _options(field, None if overriding else default)
        if overriding:
            options["help"] = f"{field.description}; overrides {overriding}.{name}"
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, **options)


def flag_values(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The values of the flags `add_config_flags` made for `names`, as config keys."""
    return {name: getattr(args, name) for name in names}


def _options(field: FieldInfo, default: Any) -> dict[str, Any]:
    kind = _without_none(field.annotation)
    options: dict[str, Any] = {"default": list(default) if isinstance(default, tuple) else default}
    described = field.description or ""
    options["help"] = described if "default" in described else f"{described} (default: %(default)s)".lstrip()
    if get_origin(kind) is tuple:
        kind, options["nargs"] = _without_none(get_args(kind)[0]), "+"
    if kind is bool:
        return options | {"action": argparse.BooleanOptionalAction}
    if get_origin(kind) is Literal:
        choices = get_args(kind)
        return options | {"choices": choices, "type": type(choices[0])}
    return options | {"type": kind if kind in (int, float) else str}


def _without_none(kind: Any) -> Any:
    """`X` of `X | None` or of `Annotated[X, ...]`; other annotations as they are."""
    if get_origin(kind) is Annotated:
        return _without_none(get_args(kind)[0])
    if get_origin(kind) in (Union, types.UnionType):
        rest = [arg for arg in get_args(kind) if arg is not type(None)]
        return rest[0] if len(rest) == 1 else kind
    return kind
