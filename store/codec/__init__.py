"""msgpack encoding of events, the registry of event classes and upcasting of old versions.

Values round-trip exactly: timezone-aware ``datetime`` (with its zone), ``date``, ``Decimal`` and
``UUID`` are msgpack ext types. Event classes are frozen dataclasses registered under ``Name.vN``;
decoding builds the current class of that name, upcasting older versions field mapping by field mapping.
``Registry.encode_checked``, which the store appends with, refuses an event that the decoder would not
give back equal (see ``check``).

The package, one module per job, from the bytes up:

- ``wire``: msgpack with the exact ext types (``packb``, ``unpackb``, ``ext_hook``);
- ``builders``: dataclasses built from decoded maps, every value checked against its annotation (``build``,
  ``constructor``);
- ``checking``: an event refused before it is stored unless it decodes back equal (``check``,
  ``encode_metadata``);
- ``personal``: the ``Personal`` marker of personal fields and their erased values;
- ``cipher``: the seat between a packed field and the column, sealing personal values with their
  subject's data key;
- ``registry``: event classes by name and version, upcasters, and ``Registry.encode``/``decode``, which
  compose the others.

Every name stays importable from ``store.codec``, as it was when this was one module.
"""

from __future__ import annotations

from store.codec.builders import (
    Builder,
    Convert,
    _build_general,
    _converter,
    _plain_class,
    build,
    constructor,
)
from store.codec.checking import _failure, _fitting, _same, check, encode_metadata
from store.codec.cipher import Cipher, Keyring, Sealed
from store.codec.personal import ERASED, ERASED_BYTES, Erased, ErasedBytes, Personal, SubjectForgotten
from store.codec.registry import REGISTRY, Fields, Origin, Registry, Upcaster
from store.codec.wire import _default, _ext_hook, ext_hook, packb, unpackb

__all__ = [
    "ERASED",
    "ERASED_BYTES",
    "REGISTRY",
    "Builder",
    "Cipher",
    "Convert",
    "Erased",
    "ErasedBytes",
    "Fields",
    "Keyring",
    "Origin",
    "Personal",
    "Registry",
    "Sealed",
    "SubjectForgotten",
    "Upcaster",
    "_build_general",
    "_converter",
    "_default",
    "_ext_hook",
    "_failure",
    "_fitting",
    "_plain_class",
    "_same",
    "build",
    "check",
    "constructor",
    "encode_metadata",
    "ext_hook",
    "packb",
    "unpackb",
]
