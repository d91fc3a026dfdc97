"""The pydantic base of rayrag's typed configs, and the one-line ValueError that names the bad key."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import ErrorDetails
from typing_extensions import Self

BOUNDS = {
    "greater_than_equal": (">=", "ge"),
    "greater_than": (">", "gt"),  # error type: (operator, ctx key)
    "less_than_equal": ("<=", "le"),
    "less_than": ("<", "lt"),
}
MAPPING_ERRORS = ("model_type", "model_attributes_type", "dict_type")


class Config(BaseModel):
    """A typed config: pydantic refuses unknown keys, wrong types and values out of range."""

    model_config = ConfigDict(extra="forbid")

    @classmethod
    def parse(cls, raw: Any, prefix: str = "") -> Self:
        """`raw` validated; a ValueError naming the first bad key (`prefix` + its dotted path)."""
        try:
            return cls.model_validate(raw)
        except ValidationError as error:
            raise ValueError(describe(error, prefix)) from error


def describe(error: ValidationError, prefix: str = "") -> str:
    """One line for the first error, e.g. "config key 'schedule.steps' must be >= 1, got 0"."""
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return _message(error.errors()[0], prefix) + more


def _message(error: ErrorDetails, prefix: str) -> str:
    key = (prefix + ".".join(str(part) for part in error["loc"])).strip(".")
    kind, ctx, value = error["type"], error.get("ctx", {}), error.get("input")
    if kind == "value_error":  # a validator's own message; without a key it names its keys itself
        return f"config key '{key}': {ctx['error']}" if error["loc"] else str(ctx["error"])
    if kind == "missing":
        return f"missing config key '{key}'"
    if kind == "extra_forbidden":
        return f"unknown config key '{key}'"
    if kind in BOUNDS:
        operator, bound = BOUNDS[kind]
        return f"config key '{key}' must be {operator} {ctx[bound]}, got {value!r}"
    if kind == "literal_error":
        return f"config key '{key}' must be {ctx['expected']}, got {value!r}"
    if kind in MAPPING_ERRORS:
        return (
            f"config key '{key}' must be a mapping, got {value!r}"
            if key
            else f"a config must be a mapping, got {type(value).__name__}"
        )
    return f"config key '{key}' has a bad value {value!r} ({error['msg']})"
