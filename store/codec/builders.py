"""Type-directed construction of dataclasses from decoded values: one generated builder per class, one
converter per annotation, checking every value against its field's type."""

from __future__ import annotations

import dataclasses
import datetime as dt
import inspect
import keyword
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from store import errors

T = TypeVar("T")

def build(cls: type[T], fields: Mapping[str, Any]) -> T:
    """Construct dataclass cls from a decoded mapping, checking every field against its annotation."""
    builder = _builders.get(cls)
    if builder is None:
        builder = _builders[cls] = _compile(cls)
    return builder(fields)  # type: ignore[no-any-return]


Convert = Callable[[Any, str], Any]
Builder = Callable[[Mapping[str, Any]], Any]
_builders: dict[type[Any], Builder] = {}
_converters: dict[Any, Convert] = {}
_exact: dict[Convert, type[Any]] = {}  # scalar converters, by the one class they pass through unchanged


def _compile(cls: type[Any]) -> Builder:
    """The function building cls from a decoded map, generated once per class as dataclasses generates
    ``__init__`` (decoding is the hot path of catch-ups and deliveries).

    A map with exactly the init fields goes straight through: each value of its field's exact scalar class
    is taken as is, any other goes through the field's converter, and cls is called positionally. Any
    other map (an unknown field, a missing one that may have a default) takes ``_build_general``, which
    says what is wrong. Both give the same result or the same error for every map.
    """
    hints = typing.get_type_hints(cls)
    fields = [(f.name, f"{cls.__name__}.{f.name}", _converter(hints[f.name]))
              for f in dataclasses.fields(cls) if f.init]
    names = frozenset(name for name, _, _ in fields)

    def general(values: Mapping[str, Any]) -> Any:
        return _build_general(cls, fields, names, values)

    if not _plain(names):
        return general
    make = constructor(cls)
    # Positional while __init__'s parameters follow the fields (an InitVar or a hand-written __init__
    # may not), by keyword from there.
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    namespace: dict[str, Any] = {"make": make, "names": names, "general": general,
                                 "Mismatch": errors.EventSchemaMismatch, "name": cls.__name__}
    body = ["    if values.keys() != names:", "        return general(values)"]
    arguments: list[str] = []
    for i, (name, where, convert) in enumerate(fields):
        namespace[f"convert{i}"], namespace[f"where{i}"] = convert, where
        body.append(f"    v{i} = values[{name!r}]")
        exact = _exact.get(convert)
        if exact is not None:
            namespace[f"exact{i}"] = exact
            body += [f"    if type(v{i}) is not exact{i}:", f"        v{i} = convert{i}(v{i}, where{i})"]
        else:
            body.append(f"    v{i} = convert{i}(v{i}, where{i})")
        positional = make is not cls or (
            len(arguments) == i and i < len(parameters) and parameters[i].name == name
            and parameters[i].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD)
        arguments.append(f"v{i}" if positional else f"{name}=v{i}")
    body += ["    try:", f"        return make({', '.join(arguments)})", "    except TypeError as exc:",
             "        raise Mismatch(f'{name}: {exc}') from exc"]
    exec("\n".join(["def build(values):", *body]), namespace)  # noqa: S102 - names checked, values bound
    built: Builder = namespace["build"]
    built.__qualname__ = f"build_{cls.__qualname__}"
    return built


_constructors: dict[type[Any], Callable[..., Any]] = {}
#: The code of the ``__init__`` that dataclasses generates (Python 3.11 to 3.13).
_GENERATED_INIT = "__create_fn__.<locals>.__init__"


def constructor(cls: type[T]) -> Callable[..., T]:
    """A positional constructor of dataclass cls: the same as calling cls with every field in order.

    For a frozen slots dataclass whose ``__init__`` dataclasses generated (no ``__post_init__``, no
    InitVar, every field in ``__init__``) it is a function that fills the slots directly: that ``__init__``
    goes through ``object.__setattr__`` once per field, which is most of the cost of decoding an event.
    Any other class gets cls itself, so the shortcut is only ever taken where it cannot differ.
    """
    found = _constructors.get(cls)
    if found is None:
        found = _constructors[cls] = _make_constructor(cls)
    return found


def _make_constructor(cls: type[Any]) -> Callable[..., Any]:
    names = [f.name for f in dataclasses.fields(cls)]
    if not (_plain_class(cls) and all(isinstance(cls.__dict__.get(n), types.MemberDescriptorType) for n in names)):
        return cls
    namespace: dict[str, Any] = {"new": object.__new__, "cls": cls}
    lines = [f"def make({', '.join(f'v{i}' for i in range(len(names)))}):", "    o = new(cls)"]
    for i, name in enumerate(names):
        namespace[f"set{i}"] = cls.__dict__[name].__set__
        lines.append(f"    set{i}(o, v{i})")
    lines.append("    return o")
    exec("\n".join(lines), namespace)  # noqa: S102 - names checked, values bound
    make: Callable[..., Any] = namespace["make"]
    make.__qualname__ = f"make_{cls.__qualname__}"
    return make


def _plain_class(cls: type[Any]) -> bool:
    """Whether cls is a frozen dataclass whose ``__init__`` dataclasses generated, with every field in it and
    in order, and no ``__post_init__``: constructing it sets the given values and does nothing else."""
    if not dataclasses.is_dataclass(cls):
        return False
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    init: Any = cls.__dict__.get("__init__")
    code = getattr(init, "__code__", None)
    return bool(cls.__dataclass_params__.frozen and code is not None  # type: ignore[attr-defined]
                and code.co_qualname == _GENERATED_INIT and not hasattr(cls, "__post_init__")
                and all(f.init for f in fields) and list(inspect.signature(init).parameters)[1:] == names
                and _plain(names))


def _plain(names: Iterable[str]) -> bool:
    """Whether every field name can stand as a name in generated code (dataclass fields may not, if made
    with make_dataclass and odd strings); the generated functions are only made for such classes."""
    return all(name.isidentifier() and not keyword.iskeyword(name) for name in names)


def _build_general(cls: type[Any], fields: list[tuple[str, str, Convert]], names: frozenset[str],
                   values: Mapping[str, Any]) -> Any:
    if not names.issuperset(values):
        unknown = set(values) - names
        raise errors.EventSchemaMismatch(f"{cls.__name__} has no fields {sorted(unknown)}")
    kwargs = {}
    for name, where, convert in fields:
        if name in values:  # else a default may apply; a missing required field fails below
            kwargs[name] = convert(values[name], where)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise errors.EventSchemaMismatch(f"{cls.__name__}: {exc}") from exc


def _converter(hint: Any) -> Convert:
    """The (cached) function checking and converting a decoded value for a type annotation."""
    try:
        found = _converters.get(hint)
    except TypeError:  # an unhashable annotation: work it out each time
        return _make_converter(hint)
    if found is None:
        found = _converters[hint] = _make_converter(hint)
    return found


def _mismatch(where: str, expected: str, value: Any) -> errors.EventSchemaMismatch:
    return errors.EventSchemaMismatch(f"{where}: expected {expected}, got {type(value).__name__}")


def _make_converter(hint: Any) -> Convert:
    origin = typing.get_origin(hint)
    if hint is Any:
        return lambda value, where: value
    if origin in (typing.Union, types.UnionType):
        options = [_converter(option) for option in typing.get_args(hint)]

        def union(value: Any, where: str) -> Any:
            for option in options:
                try:
                    return option(value, where)
                except errors.EventSchemaMismatch:
                    continue
            raise errors.EventSchemaMismatch(f"{where}: {value!r} fits none of {hint}")

        return union
    if hint is type(None):

        def none(value: Any, where: str) -> Any:
            if value is None:
                return None
            raise _mismatch(where, "None", value)

        return none
    if origin in (list, tuple, frozenset, set) or hint in (list, tuple):
        args = typing.get_args(hint)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            positional = [_converter(a) for a in args]

            def fixed_tuple(value: Any, where: str) -> Any:
                if not isinstance(value, (list, tuple)):
                    raise _mismatch(where, "a sequence", value)
                if len(positional) != len(value):
                    raise errors.EventSchemaMismatch(f"{where}: expected {len(positional)} items")
                return tuple(c(v, where) for c, v in zip(positional, value, strict=True))

            return fixed_tuple
        item = _converter(args[0] if args else Any)
        container = origin or hint

        def sequence(value: Any, where: str) -> Any:
            if not isinstance(value, (list, tuple)):
                raise _mismatch(where, "a sequence", value)
            inner = f"{where}[]"
            return container([item(v, inner) for v in value])

        return sequence
    if origin is dict or hint is dict:
        key_t, val_t = typing.get_args(hint) or (Any, Any)
        key, val = _converter(key_t), _converter(val_t)

        def mapping(value: Any, where: str) -> Any:
            if not isinstance(value, dict):
                raise _mismatch(where, "a map", value)
            return {key(k, where): val(v, where) for k, v in value.items()}

        return mapping
    if dataclasses.is_dataclass(hint):

        def nested(value: Any, where: str) -> Any:
            if not isinstance(value, dict):
                raise errors.EventSchemaMismatch(f"{where}: expected a map for {hint!r}")
            return build(hint, value)  # type: ignore[arg-type]

        return nested
    if isinstance(hint, type):
        return _scalar(hint)
    return lambda value, where: value


def _scalar(hint: type[Any]) -> Convert:
    def scalar(value: Any, where: str) -> Any:
        # type() is checked first: the exact type is the common case and the cheapest test.
        if type(value) is hint:
            return value
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if (hint is int and isinstance(value, bool)) or (hint is dt.date and isinstance(value, dt.datetime)):
            raise _mismatch(where, hint.__name__, value)
        if not isinstance(value, hint):
            raise _mismatch(where, hint.__name__, value)
        return value

    _exact[scalar] = hint
    return scalar

