"""Strict value types for pydantic, and its ValidationError as the project's one-line message.

Shared by the workflow (:mod:`wsiseg.config`) and the model card (:mod:`wsiseg.nets.card`),
which declare their keys, types and ranges as pydantic dataclasses; this module words what
pydantic found, first error only, e.g. ``guidenet.patch_px: expected a positive integer, got -3``.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import ConfigDict, Field, Strict, ValidationError

#: Dataclass config: unknown keys refused, NaN and ±inf refused in every float.
STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)

# Leaf types. Strict: no "3" → 3, 3.7 → 3 or 1 → True (an int is a number, though).
Count = Annotated[int, Strict(), Field(ge=0)]
PositiveInt = Annotated[int, Strict(), Field(gt=0)]
Number = Annotated[float, Strict()]
Positive = Annotated[float, Strict(), Field(gt=0)]
Fraction = Annotated[float, Strict(), Field(ge=0, le=1)]
Name = Annotated[str, Strict(), Field(min_length=1)]
Flag = Annotated[bool, Strict()]


def one_line(exc: ValidationError, root: type) -> str:
    """``"<dotted key>: <what is wrong>"`` for the first error pydantic found.

    Parameters
    ----------
    exc : ValidationError
        Raised while validating ``root``.
    root : type
        The pydantic dataclass validated; its fields name the keys an unknown key could be.
    """
    err = exc.errors(include_url=False)[0]
    loc: tuple[Any, ...] = err["loc"]
    key = ".".join(str(part) for part in loc if isinstance(part, str))
    if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        known = ", ".join(keys(root, [p for p in loc[:-1] if isinstance(p, str)]))
        what = f"unknown key (expected one of {known})"
    elif err["type"] == "missing":
        missing_item = isinstance(loc[-1], int)  # a short list for a fixed-length tuple
        what = f"too few values, got {err['input']!r}" if missing_item else "missing key"
    else:
        what = _what(err["type"], err.get("ctx") or {}, err["input"], err["msg"])
    return f"{key}: {what}" if key else what


def _what(kind: str, ctx: dict[str, Any], value: Any, msg: str) -> str:
    if kind in ("value_error", "assertion_error"):
        return str(ctx["error"])  # our own validators word their message in full
    bound = next(iter(ctx.values()), None)  # gt, le, ...: an int for int fields
    number, zero = ("integer" if isinstance(bound, int) else "number"), bound == 0
    bound = f"{bound:g}" if isinstance(bound, float) else bound
    expected = {
        "int_type": "an integer",
        "float_type": "a number",
        "finite_number": "a finite number",
        "bool_type": "true or false",
        "string_type": "a non-empty string",
        "string_too_short": "a non-empty string",
        "dict_type": "a mapping",
        "dataclass_type": "a mapping",
        "tuple_type": "a list",
        "list_type": "a list",
        "literal_error": f"one of {ctx.get('expected')}",
        "greater_than": f"a positive {number}" if zero else f"more than {bound}",
        "greater_than_equal": f"a non-negative {number}" if zero else f"at least {bound}",
        "less_than_equal": f"at most {bound}",
        "too_long": f"at most {ctx.get('max_length')} values",
        "too_short": f"at least {ctx.get('min_length')} values",
    }.get(kind)
    if expected is None:  # a check this table does not word: pydantic's own words
        return f"{msg[:1].lower()}{msg[1:]}, got {value!r}"
    return f"expected {expected}, got {value!r}"


def keys(root: type, path: list[str] | None = None) -> list[str]:
    """The keys the mapping at ``path`` below ``root`` takes: its serialised fields."""
    cls = root
    for name in path or []:
        cls = cls.__pydantic_fields__[name].annotation
    fields = getattr(cls, "__pydantic_fields__", None)
    if fields is None:  # a TypedDict
        return list(cls.__annotations__)
    return [name for name, info in fields.items() if not info.exclude]
