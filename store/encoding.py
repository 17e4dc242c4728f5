"""What every event store does with its input before storing it: check it, and encode it with the registry.

``EventStore`` (PostgreSQL) and ``InMemoryEventStore`` both derive from ``Encoding``, so an event, version
or limit that the one refuses the other refuses the same way, and both store exactly the same bytes. Both
merge the same metadata into every event of an append (``append_context``): the correlation and causation
ids (``store.correlation_ids``) and the current trace context (``store.tracing``), under the keys of a
``NewEvent``'s own metadata, which win.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from store import codec, correlation_ids, errors, names, subject_keys, tracing
from store.records import NO_STREAM, AppendResult, NewEvent

DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024
_EMPTY_METADATA = codec.packb({})


class Encoded(NamedTuple):
    event_id: uuid.UUID | None  # None: the store draws one (nothing to recognise on a retry anyway)
    event_type: str
    data: bytes
    metadata: bytes
    #: The event given, when it has personal fields: a retry is recognised by its values, not its bytes
    #: (every append seals them with fresh nonces).
    personal: Any = None


class AppendContext(NamedTuple):
    """The metadata every event of one append gets, and its encoding (events without metadata of their own
    share it)."""

    values: dict[str, Any]
    packed: bytes


NO_CONTEXT = AppendContext({}, _EMPTY_METADATA)


def append_context(correlation_id: str | None = None, causation_id: str | None = None) -> AppendContext:
    """The metadata of an append's events: its correlation and causation ids (the arguments, else the
    ``correlation`` scope's) and the current span's trace context. Worked out once per append call."""
    values = correlation_ids.ids(correlation_id, causation_id)
    tracing.inject(values)
    return AppendContext(values, codec.packb(values)) if values else NO_CONTEXT


class Encoding:
    """The encoding of events and snapshots with ``registry``, within ``max_payload_bytes``; personal fields
    sealed with the data keys of ``keys`` (``registry`` is a view of the registry given, sealing with them)."""

    registry: codec.Registry
    max_payload_bytes: int
    keys: subject_keys.SubjectKeys

    def _use_keys(self, registry: codec.Registry, keys: subject_keys.SubjectKeys) -> None:
        self.keys = keys
        self.registry = registry.with_cipher(codec.Cipher(keys))

    def _encode_batch(self, batch: Sequence[tuple[str, Sequence[Any], int]],
                      context: AppendContext) -> list[list[Encoded]]:
        """Each stream's events of an append_batch, checked and encoded."""
        encoded = []
        for stream_id, events, expected in batch:
            names.stream_id(stream_id)
            check_expected(expected)
            encoded.append(self._encode_all(events, context, stream_id))
        return encoded

    def _encode_all(self, events: Sequence[Any], context: AppendContext = NO_CONTEXT,
                    stream_id: str | None = None) -> list[Encoded]:
        if isinstance(events, (str, bytes)) or not isinstance(events, Sequence) or not events:
            raise errors.InvalidInput("append needs a non-empty sequence of events")
        encoded = [self._encode(e, context, stream_id) for e in events]
        if len(encoded) > 1:
            check_unique_ids([e.event_id for e in encoded])
        return encoded

    def _encode(self, event: Any, context: AppendContext = NO_CONTEXT, stream_id: str | None = None) -> Encoded:
        if isinstance(event, NewEvent):
            payload, event_id, meta = event.payload, event.event_id, event.metadata
        else:
            payload, event_id, meta = event, None, None
        origin: codec.Origin | None = None
        if stream_id is not None and self.registry.personal(type(payload)):
            if event_id is None:
                event_id = uuid.uuid4()  # its sealed values are bound to it: drawn here, not by the database
            origin = (event_id, stream_id)
            if meta or context.values:
                check_personal_metadata(payload, self.registry.personal(type(payload)), {**context.values, **(meta or {})})
        # The log is immutable: an event that would not decode back is refused, not stored as poison.
        event_type, data = self.registry.encode_checked(payload, origin)
        metadata = codec.encode_metadata({**context.values, **meta}) if meta else context.packed
        if len(data) + len(metadata) > self.max_payload_bytes:
            raise errors.PayloadTooLarge(
                f"{event_type} encodes to {len(data) + len(metadata)} bytes, over the {self.max_payload_bytes} limit")
        return Encoded(event_id, event_type, data, metadata, payload if origin is not None else None)

    def _encode_snapshot(self, stream_id: str, state: Any) -> tuple[str, bytes]:
        snapshot_type, data = self.registry.encode(state, (None, stream_id))
        if len(data) > self.max_payload_bytes:
            raise errors.PayloadTooLarge(f"snapshot of {stream_id!r} encodes to {len(data)} bytes")
        return snapshot_type, data


def original_result(stream_id: str, expected: int, encoded: list[Encoded],
                    found: Iterable[Mapping[str, Any]], registry: codec.Registry = codec.REGISTRY,
                    ) -> AppendResult | None:
    """The original result if these exact events already sit at these versions (a retried append).

    ``found`` are the stored rows of the append's event ids (event_id, stream_id, version, global_position,
    event_type, data, metadata). None when there are none; DuplicateEventId when any event is stored
    elsewhere, with other content, or not at all while others are.
    """
    rows = {r["event_id"]: r for r in found}
    if not rows:
        return None
    positions = []
    for step, e in enumerate(encoded, start=1):
        row = rows.get(e.event_id)
        if row is None or row["stream_id"] != stream_id or row["version"] != expected + step:
            raise errors.DuplicateEventId(
                f"event {e.event_id or '(without id)'} of a retried append is not where it was appended")
        if (row["event_type"] != e.event_type or not _same_data(row, e, registry)
                or not _same_metadata(row["metadata"], e.metadata)):
            raise errors.DuplicateEventId(f"event {e.event_id} was appended before with other content")
        positions.append(row["global_position"])
    return AppendResult(stream_id, expected + 1, expected + len(encoded), tuple(positions))


def _same_data(row: Mapping[str, Any], given: Encoded, registry: codec.Registry) -> bool:
    """The same bytes, or, for an event with personal fields (sealed with other nonces each time), the same
    event decoded."""
    if row["data"] == given.data:
        return True
    if given.personal is None:
        return False
    try:
        stored = registry.decode(row["event_type"], row["data"], (row["event_id"], row["stream_id"]))
    except errors.CodecError:
        return False
    return bool(stored == given.personal)


def _same_metadata(stored: bytes, given: bytes) -> bool:
    """Equal, but for the trace context: the same events appended again in another trace (a client retrying
    its request) are a retry all the same, and keep the context of the append that stored them."""
    if stored == given:
        return True
    try:
        old, new = codec.unpackb(stored), codec.unpackb(given)
    except errors.CodecError:
        return False
    if not isinstance(old, dict) or not isinstance(new, dict):
        return False
    return tracing.without_context(old) == tracing.without_context(new)


def check_int(value: object, what: str, low: int, high: int | None = 2**62,
              error: type[errors.InvalidInput] = errors.InvalidInput) -> None:
    """A real int (not a bool) from ``low`` up to below ``high`` (by default well inside Postgres's bigint)."""
    if (not isinstance(value, int) or isinstance(value, bool) or value < low
            or (high is not None and value >= high)):
        raise error(f"{what} must be an int >= {low}, got {value!r}")


def check_time(value: object, what: str) -> None:
    """A timezone-aware datetime (a naive one would mean the database session's zone, or nothing)."""
    if not isinstance(value, dt.datetime) or value.utcoffset() is None:
        raise errors.InvalidInput(f"{what} must be a timezone-aware datetime, got {value!r}")


def check_expected(expected: object) -> None:
    check_int(expected, "expected_version", NO_STREAM, error=errors.InvalidExpectedVersion)


def check_unique_ids(event_ids: list[uuid.UUID | None]) -> None:
    given = [i for i in event_ids if i is not None]
    if len(set(given)) != len(given):
        raise errors.DuplicateEventId("the same event id appears twice in one append")


def check_personal_metadata(payload: Any, fields: tuple[codec.personal.PersonalField, ...],
                            metadata: Mapping[str, Any]) -> None:
    """InvalidEvent when the event's metadata holds one of its own personal values (stored and published in
    the clear, never erased by ``forget``)."""
    field = codec.personal.in_metadata(payload, fields, metadata)
    if field is not None:
        raise errors.InvalidEvent(
            f"{type(payload).__name__}: its metadata holds the value of personal field {field!r}; metadata is "
            f"stored and published in the clear and a forget cannot erase it")
