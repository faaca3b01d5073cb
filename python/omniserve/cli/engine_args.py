"""Command-line options for every engine setting, derived from `EngineConfig` so the two never drift.

Each field becomes `--field-name`, its help the first sentence of the field's docstring in
config.py (read from the source, the one place it is written) and its default.
"""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
import textwrap
import typing
from typing import Any

import msgspec

from omniserve.config import EngineConfig

_SKIP = frozenset({"model"})


def _parse_optional_int(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def _option_type(annotation: Any) -> tuple[Any, dict[str, Any]]:
    """argparse `type`/`choices` for a field annotation of EngineConfig."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return str, {"choices": list(args)}
    non_none = [a for a in args if a is not type(None)]
    if annotation is bool or non_none == [bool]:
        # --x / --no-x; a field that may be None stays None (its own default) when neither is given.
        return None, {"action": argparse.BooleanOptionalAction}
    if annotation in (int, float, str):
        return annotation, {}
    if len(non_none) == 1 and non_none[0] is int:
        return _parse_optional_int, {}
    if len(non_none) == 1:
        return non_none[0], {}
    raise TypeError(f"EngineConfig field of unsupported type {annotation!r}")


@functools.cache
def field_docs() -> dict[str, str]:
    """Each EngineConfig field's docstring (the string literal after its annotation), by name;
    empty where the source is not shipped."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(EngineConfig)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _help(name: str, default: Any) -> str:
    doc = field_docs().get(name, "")
    first = doc.split(". ")[0].rstrip(".")
    text = f"{first} (default: {default!r})" if first else f"default: {default!r}"
    return text.replace("%", "%%")  # argparse formats help with %


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Add `--model` and one option per EngineConfig field."""
    parser.add_argument(
        "--model",
        default=None,
        help="checkpoint directory (HF config.json + safetensors + tokenizer); "
        "default: the bundled small model",
    )
    group = parser.add_argument_group("engine options")
    hints = typing.get_type_hints(EngineConfig)
    for field in msgspec.structs.fields(EngineConfig):
        if field.name in _SKIP:
            continue
        kind, extra = _option_type(hints[field.name])
        flag = "--" + field.name.replace("_", "-")
        kwargs: dict[str, Any] = {
            "default": None,
            "help": _help(field.name, field.default),
            **extra,
        }
        if kind is not None:
            kwargs["type"] = kind
        group.add_argument(flag, dest=field.name, **kwargs)


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The engine options the user actually set (unset ones keep EngineConfig's defaults)."""
    out: dict[str, Any] = {}
    for field in msgspec.structs.fields(EngineConfig):
        if field.name in _SKIP:
            continue
        value = getattr(args, field.name, None)
        if value is not None:
            out[field.name] = value
    return out
