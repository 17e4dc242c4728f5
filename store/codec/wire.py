"""msgpack with exact ext types: timezone-aware ``datetime`` (with its zone), ``date``, ``Decimal`` and
``UUID`` round-trip exactly; anything else msgpack does not know is refused (``CodecError``)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import threading
import uuid
import zoneinfo
from collections.abc import Callable
from typing import Any, TypeVar

import msgpack

from store import errors

_EXT_DATETIME = 1
_EXT_DECIMAL = 2
_EXT_UUID = 3
_EXT_DATE = 4
_MICROSECOND = dt.timedelta(microseconds=1)
T = TypeVar("T")



def _default(value: object) -> msgpack.ExtType:
    if isinstance(value, dt.datetime):
        offset = value.utcoffset()
        if offset is None:
            raise errors.CodecError(f"naive datetime {value.isoformat()} cannot be encoded: make it timezone-aware")
        tz = value.tzinfo
        key = tz.key if isinstance(tz, zoneinfo.ZoneInfo) else None
        # A named zone keeps its rules; anything else (or a ZoneInfo read from a file, without a key) keeps
        # its offset, in whole microseconds (timedelta division is exact, float seconds are not).
        zone: str | int = key if key is not None else offset // _MICROSECOND
        body = [value.toordinal(), value.hour * 3600 + value.minute * 60 + value.second, value.microsecond,
                value.fold, zone]
        return msgpack.ExtType(_EXT_DATETIME, _PACKERS.body.pack(body))
    if isinstance(value, dt.date):
        return msgpack.ExtType(_EXT_DATE, _PACKERS.body.pack(value.toordinal()))
    if isinstance(value, decimal.Decimal):
        return msgpack.ExtType(_EXT_DECIMAL, str(value).encode("ascii"))
    if isinstance(value, uuid.UUID):
        return msgpack.ExtType(_EXT_UUID, value.bytes)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}  # type: ignore[return-value]
    if isinstance(value, (set, frozenset)):
        return sorted(value)  # type: ignore[return-value]
    raise errors.CodecError(f"cannot encode a value of type {type(value).__name__}")


def _ext_hook(code: int, data: bytes) -> object:
    # Decoding is a hot path: zones, days and decimals repeat across events, so each is worked out once.
    if code == _EXT_DATETIME:
        ordinal, seconds, micros, fold, zone = msgpack.unpackb(data)
        tz = _zones.get(zone)
        if tz is None:
            tz = _zone(zone)
        day = _days.get(ordinal) if type(ordinal) is int else None  # 1.0 and True are no days
        if day is None:
            day = _day(ordinal)
        return dt.datetime(day.year, day.month, day.day, seconds // 3600, seconds // 60 % 60, seconds % 60,
                           micros, tz, fold=fold)
    if code == _EXT_DECIMAL:
        value = _decimals.get(data)
        if value is None:
            value = _decimal(data)
        return value
    if code == _EXT_DATE:
        return dt.date.fromordinal(msgpack.unpackb(data))
    if code == _EXT_UUID:
        return uuid.UUID(bytes=data)
    hook = EXT_HOOKS.get(code)
    if hook is not None:
        return hook(data)
    raise errors.CorruptEvent(f"unknown msgpack ext type {code}")


#: Decoders of the ext types other modules add (``cipher.EXT_SEALED``), by code.
EXT_HOOKS: dict[int, Callable[[bytes], object]] = {}


# Bounded caches of the ext hook (values are immutable; the bound keeps hostile input from growing them).
_CACHE_SIZE = 4096
_zones: dict[object, dt.tzinfo] = {}
_days: dict[object, dt.date] = {}
_decimals: dict[bytes, decimal.Decimal] = {}


def _remember(cache: dict[Any, Any], key: object, value: T) -> T:
    if len(cache) >= _CACHE_SIZE:
        cache.clear()
    cache[key] = value
    return value


def _zone(zone: Any) -> dt.tzinfo:
    if isinstance(zone, str):
        return _remember(_zones, zone, zoneinfo.ZoneInfo(zone))
    return _remember(_zones, zone, dt.timezone(dt.timedelta(microseconds=zone)))


def _day(ordinal: object) -> dt.date:
    if type(ordinal) is not int:  # a bool is no day
        raise TypeError(f"a datetime's day is an ordinal, not {type(ordinal).__name__}")
    return _remember(_days, ordinal, dt.date.fromordinal(ordinal))


def _decimal(data: bytes) -> decimal.Decimal:
    return _remember(_decimals, data, decimal.Decimal(data.decode("ascii")))


class _Packers(threading.local):
    """Reusable packers, one set per thread: ``msgpack.packb`` allocates a 256 KiB buffer per call."""

    def __init__(self) -> None:
        self.main = msgpack.Packer(default=_default, use_bin_type=True, datetime=False)
        # Ext bodies are packed while ``main`` is mid-pack, so they need a packer of their own.
        self.body = msgpack.Packer(use_bin_type=True)


_PACKERS = _Packers()


def packb(value: object) -> bytes:
    """Encode a value (maps, lists, scalars, dataclasses and the ext types) to msgpack."""
    try:
        return _PACKERS.main.pack(value)
    except errors.CodecError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise errors.CodecError(f"cannot encode: {exc}") from exc


def unpackb(data: bytes) -> Any:
    """Decode msgpack bytes written by packb; raise CorruptEvent on anything else."""
    try:
        return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=True,
                               timestamp=0)
    except errors.CodecError:
        raise
    except Exception as exc:  # msgpack raises many unrelated types for corrupt input
        raise errors.CorruptEvent(f"corrupt msgpack: {type(exc).__name__}: {exc}") from exc


#: The msgpack ext hook of stored bytes (``datetime``, ``Decimal``, ``UUID``...), for readers of whole
#: message bodies that decode with ``msgpack.unpackb`` themselves (``workers.broker.from_body``).
ext_hook = _ext_hook
