"""A batch of integration events as AMQP frames, marshalled at once and written to a channel in one go.

A publication sends one message per event (consumers bind to one type), so what aiormq's ``basic_publish``
costs per message is the publication's ceiling: a coroutine, a lock, a timeout, a drain future and a socket
write per message, and pamqp's general encoder for the ``ce-`` header table (bench/publish.py measured about
440 us of the worker's CPU per event with it). Here a batch's frames are marshalled by hand (a message's
method, content header and body frames, as pamqp writes them: ``tests/unit/test_publication_frames.py`` holds
the bytes equal), its confirmations registered on the channel as ``basic_publish`` registers them, and the
whole batch queued as one write.

This reaches into aiormq's channel (its lock, delivery tags, confirmations and write queue: the state
``basic_publish`` keeps). ``supported`` says whether the installed aiormq has them; where it does not, the
outlet publishes message by message with ``basic_publish``, as before.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import aiormq.abc
from pamqp import encode

from projections.publication import Outgoing

_FRAME_METHOD, _FRAME_HEADER, _FRAME_BODY, _FRAME_END = 1, 2, 3, b"\xce"
_BASIC = 60
_PUBLISH = struct.pack(">HHH", _BASIC, 40, 0)  # Basic.Publish, reserved short
_FRAME_HEAD = struct.Struct(">BHI")
_HEADER_HEAD = struct.Struct(">HHQH")
#: Property flags (AMQP 0-9-1, Basic's content header), in the order the properties are written.
_CONTENT_TYPE, _HEADERS, _DELIVERY_MODE, _CORRELATION_ID = 0x8000, 0x2000, 0x1000, 0x0400
_MESSAGE_ID, _TIMESTAMP, _TYPE, _APP_ID = 0x0080, 0x0040, 0x0020, 0x0008
_APP = b"\x0aeventfleet"
_PERSISTENT = b"\x02"
#: The channel state ``publish_batch`` uses (aiormq 7's).
_NEEDED = ("lock", "delivery_tag", "confirmations", "write_queue", "number", "max_content_size", "create_future")


def supported(channel: Any) -> bool:
    """Whether this aiormq channel keeps the state ``publish_batch`` needs (aiormq 7 does)."""
    return all(hasattr(channel, name) for name in _NEEDED) and hasattr(aiormq.abc, "ChannelFrame")


def _short(text: str) -> bytes:
    raw = text.encode()
    if len(raw) > 255:
        raise ValueError(f"an AMQP short string is at most 255 bytes: {text[:40]!r}...")
    return bytes((len(raw),)) + raw


def _name(text: str) -> bytes:
    """``_short`` of a name met again and again (an exchange, a routing key or type, a content type, a header's
    key), remembered."""
    found = _names.get(text)
    if found is None:
        found = _short(text)
        if len(_names) < 4096:
            _names[text] = found
    return found


_names: dict[str, bytes] = {}


def _table(headers: Mapping[str, Any]) -> bytes:
    """A field table as pamqp encodes it (keys sorted; text values as long strings); pamqp itself for any
    value that is not text."""
    if not headers:
        return b"\x00\x00\x00\x00"
    parts: list[bytes] = []
    for key in sorted(headers):
        value = headers[key]
        if type(value) is not str or (len(key) > 64 and len(key.encode()) > 128):
            return encode.field_table(dict(headers))
        raw = value.encode()
        parts += (_name(key), b"S", len(raw).to_bytes(4, "big"), raw)
    body = b"".join(parts)
    return len(body).to_bytes(4, "big") + body


def _timestamp(value: dt.datetime) -> bytes:
    if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
        value = value.replace(tzinfo=dt.UTC)
    return int(value.timestamp()).to_bytes(8, "big")


def _properties(message: Outgoing) -> tuple[int, bytes]:
    """The property flags and properties of ``properties_of(message)`` (workers/publication/outlet.py)."""
    flags, parts = _DELIVERY_MODE | _APP_ID, []
    if message.content_type:
        flags |= _CONTENT_TYPE
        parts.append(_name(message.content_type))
    flags |= _HEADERS  # an empty table too, as pamqp writes properties_of's
    parts.append(_table(message.headers))
    parts.append(_PERSISTENT)
    if message.correlation_id:
        flags |= _CORRELATION_ID
        parts.append(_short(message.correlation_id))
    if message.message_id:
        flags |= _MESSAGE_ID
        parts.append(_short(message.message_id))
    if message.timestamp is not None:
        flags |= _TIMESTAMP
        parts.append(_timestamp(message.timestamp))
    if message.type:
        flags |= _TYPE
        parts.append(_name(message.type))
    parts.append(_APP)
    return flags, b"".join(parts)


def _frame(kind: int, channel: int, payload: bytes) -> bytes:
    return _FRAME_HEAD.pack(kind, channel, len(payload)) + payload + _FRAME_END


def marshal(channel: int, exchange: str, message: Outgoing, max_content: int) -> bytes:
    """One message's frames: Basic.Publish (not mandatory, not immediate), its content header, its body in
    frames of at most ``max_content`` bytes."""
    method = b"%s%s%s\x00" % (_PUBLISH, _name(exchange), _name(message.routing_key))
    flags, properties = _properties(message)
    body = message.body
    frames = [_frame(_FRAME_METHOD, channel, method),
              _frame(_FRAME_HEADER, channel, _HEADER_HEAD.pack(_BASIC, 0, len(body), flags) + properties)]
    frames += [_frame(_FRAME_BODY, channel, body[at:at + max_content]) for at in range(0, len(body), max_content)]
    return b"".join(frames)


async def publish_batch(channel: Any, exchange: str, messages: Sequence[Outgoing]) -> list[asyncio.Future[Any]]:
    """Queue the messages' frames on ``channel`` (confirming: ``publisher_confirms``) as one write, in order;
    return the futures of their confirmations (a ``Basic.Ack`` each, or an error when the channel closes).
    Holds the channel's lock, so no other publish interleaves; nothing is queued if this fails."""
    payload = b"".join(marshal(channel.number, exchange, m, channel.max_content_size) for m in messages)
    async with channel.lock:
        first = channel.delivery_tag + 1
        futures: list[asyncio.Future[Any]] = []
        try:
            for tag in range(first, first + len(messages)):
                future = channel.create_future()
                channel.confirmations[tag] = future
                futures.append(future)
            channel.delivery_tag = first + len(messages) - 1
            await channel.write_queue.put(aiormq.abc.ChannelFrame(payload=payload, should_close=False))
        except BaseException:
            # Not queued: the broker has not seen these tags; the next publish reuses them.
            channel.delivery_tag = first - 1
            for tag, future in zip(range(first, first + len(futures)), futures, strict=True):
                channel.confirmations.pop(tag, None)
                future.cancel()
            raise
    return futures
