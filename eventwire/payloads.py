"""Typed payloads: a handler annotated ``event: Event[Model]`` gets a validated `Model`.

The payload is validated from its JSON form, the form a broker delivers, so a handler gets
the same value of the same type on every backend; a payload that already is exactly a
`Model` is passed as it is.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from typing import Any

import msgspec

from eventwire.envelope import encode_payload
from eventwire.errors import PayloadValidationError
from eventwire.event import Event

PayloadConverter = Callable[[Any], Any]


def _handler_name(handler: Callable[..., Any]) -> str:
    return getattr(handler, "__qualname__", None) or repr(handler)


def payload_type_of(handler: Callable[..., Any]) -> Any | None:
    """The `X` of a handler whose first parameter is annotated ``Event[X]``; None otherwise."""
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError):
        return None
    params = [
        p
        for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if not params or params[0].annotation is inspect.Parameter.empty:
        return None
    annotation = params[0].annotation
    if isinstance(annotation, str):
        if "[" not in annotation:
            return None  # a bare `Event` (or anything unsubscripted) asks for no conversion
        target = getattr(handler, "__func__", handler)
        if not inspect.isfunction(target) and callable(target):
            # A callable object: its hints are those of its class's __call__.
            target = getattr(type(target), "__call__", target)  # noqa: B004
        try:
            # Event and Any resolve even when the handler's module imports them only for
            # type checking.
            hints = typing.get_type_hints(target, localns={"Event": Event, "Any": Any})
        except Exception as exc:
            raise TypeError(
                f"cannot resolve the annotation {annotation!r} of handler "
                f"{_handler_name(handler)}: {exc}. Define the payload type at module level "
                "(or import it) so eventwire can validate payloads against it."
            ) from exc
        annotation = hints.get(params[0].name, annotation)
    if typing.get_origin(annotation) is not Event:
        return None
    args = typing.get_args(annotation)
    if not args or args[0] is Any or args[0] is object:
        return None
    return args[0]


def make_converter(payload_type: Any, subscription: str) -> PayloadConverter:
    """A function that validates a payload against `payload_type` from its JSON form
    (pydantic does the work; msgspec for the structs and attrs classes pydantic does not
    know), passing through values that are already exactly of that type."""
    from pydantic import PydanticSchemaGenerationError, TypeAdapter, ValidationError

    try:
        adapter: TypeAdapter[Any] = TypeAdapter(payload_type)
    except PydanticSchemaGenerationError as exc:
        if _msgspec_decodes(payload_type):
            decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(payload_type, strict=False)
            return _from_json_form(
                payload_type, subscription, decoder.decode, msgspec.ValidationError
            )
        # Not something pydantic validates (e.g. Event[Event[Any]] for dead letters): check
        # the payload's class instead of converting it.
        cls = _isinstance_target(payload_type)
        if cls is None:
            raise TypeError(
                f"handler of {subscription!r} is annotated with payload type {payload_type!r}, "
                "which eventwire cannot validate; annotate it with a pydantic model, a "
                "dataclass, a msgspec struct, a plain type, or Event[Any]"
            ) from exc
        return _instance_check(cls, subscription)
    return _from_json_form(payload_type, subscription, adapter.validate_json, ValidationError)


def _from_json_form(
    payload_type: Any,
    subscription: str,
    decode: Callable[[bytes], Any],
    invalid: type[Exception],
) -> PayloadConverter:
    """A converter that makes the payload's JSON form a `payload_type` with `decode` (which
    raises `invalid` for a payload that does not fit), passing through values that are
    already exactly of that type."""
    type_name = getattr(payload_type, "__name__", repr(payload_type))
    exact = payload_type if isinstance(payload_type, type) else None

    def convert(payload: Any) -> Any:
        if exact is not None and type(payload) is exact:
            return payload
        try:
            return decode(encode_payload(payload))
        except invalid as exc:
            raise PayloadValidationError(
                f"payload for {subscription!r} is not a valid {type_name}: {exc}"
            ) from exc
        except Exception as exc:  # a validator or __post_init__ that raised outright
            raise PayloadValidationError(
                f"payload for {subscription!r} could not be made a {type_name}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    return convert


def _msgspec_decodes(payload_type: Any) -> bool:
    """Whether msgspec decodes `payload_type` from JSON on its own (a struct, an attrs class,
    containers of them), events aside."""
    import msgspec.inspect

    try:
        info = msgspec.inspect.type_info(payload_type)
    except Exception:  # e.g. an annotation it cannot resolve
        return False
    pending: list[Any] = [info]
    seen: set[int] = set()
    while pending:
        node = pending.pop()
        if id(node) in seen:
            continue  # a recursive type
        seen.add(id(node))
        if isinstance(node, msgspec.inspect.CustomType) or (
            isinstance(node, msgspec.inspect.StructType) and issubclass(node.cls, Event)
        ):
            return False
        for name in node.__struct_fields__:
            value = getattr(node, name)
            for item in value if isinstance(value, tuple) else (value,):
                if isinstance(item, msgspec.inspect.Field):
                    pending.append(item.type)
                elif isinstance(item, msgspec.inspect.Type):
                    pending.append(item)
    return True


def _isinstance_target(payload_type: Any) -> Any | None:
    """What `isinstance` can check for `payload_type` (itself, or its generic origin)."""
    for candidate in (payload_type, typing.get_origin(payload_type)):
        if candidate is None or candidate is types.UnionType or candidate is typing.Union:
            continue
        try:
            isinstance(None, candidate)
        except TypeError:
            continue
        return candidate
    return None


def _instance_check(target: Any, subscription: str) -> PayloadConverter:
    expected = getattr(target, "__name__", None) or repr(target)

    def check(payload: Any) -> Any:
        if isinstance(payload, target):
            return payload
        raise PayloadValidationError(
            f"payload for {subscription!r} is a {type(payload).__name__}, "
            f"not the {expected} its handler is annotated with"
        )

    return check
