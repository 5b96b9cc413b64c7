"""Typed payloads: a handler annotated ``event: Event[Model]`` gets a validated `Model`."""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from typing import Any

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
    """A function that validates a payload against `payload_type` (pydantic does the work),
    passing through values that are already instances of it."""
    from pydantic import PydanticSchemaGenerationError, TypeAdapter, ValidationError

    type_name = getattr(payload_type, "__name__", repr(payload_type))
    try:
        adapter: TypeAdapter[Any] = TypeAdapter(payload_type)
    except PydanticSchemaGenerationError as exc:
        # Not something pydantic validates (e.g. Event[Event[Any]] for dead letters): check
        # the payload's class instead of converting it.
        cls = _isinstance_target(payload_type)
        if cls is None:
            raise TypeError(
                f"handler of {subscription!r} is annotated with payload type {payload_type!r}, "
                "which eventwire cannot validate; annotate it with a pydantic model, a "
                "dataclass, a plain type, or Event[Any]"
            ) from exc
        return _instance_check(cls, subscription)
    exact = payload_type if isinstance(payload_type, type) else None

    def convert(payload: Any) -> Any:
        if exact is not None and type(payload) is exact:
            return payload
        try:
            return adapter.validate_python(payload)
        except ValidationError as exc:
            raise PayloadValidationError(
                f"payload for {subscription!r} is not a valid {type_name}: {exc}"
            ) from exc
        except Exception as exc:  # a validator or __post_init__ that raised outright
            raise PayloadValidationError(
                f"payload for {subscription!r} could not be made a {type_name}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    return convert


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
