"""What a projection is: a name, the DDL of its read-model tables and one handler per event class.

Handlers only run SQL on the connection they are given, inside the worker's transaction, with unqualified
table names (the search_path points at the deployment's schema, or at a shadow schema during a rebuild).
They never commit, ack, retry or log at INFO; the worker does all of that around them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal, LiteralString, Protocol, TypeVar

from projections import erasure
from store import db
from store.codec.personal import SubjectForgotten
from store.codec.registry import EVENT_NAME_ATTRIBUTE
from store.event_store import EventStore, RecordedEvent

if TYPE_CHECKING:
    from projections.publication import Outlet, Publication

Policy = Literal["halt", "skip"]
Handler = Callable[[Any, db.Conn, RecordedEvent], Awaitable[None]]
# A reactor's handlers take Effects, not a connection; a publication's map an event to a message.
H = TypeVar("H", bound=Callable[..., Any])


class Runtime(Protocol):
    """What a worker hands the subscribers it runs (``Projection.attach``): the deployment's name and the
    outlets to the broker a publication publishes through."""

    @property
    def deployment(self) -> str: ...

    async def outlet(self, publication: Publication) -> Outlet: ...


def handles(*event_classes: type[Any]) -> Callable[[H], H]:
    """Mark a method of a Projection as the handler of these event classes."""

    def mark(fn: H) -> H:
        fn._eventfleet_handles = event_classes  # type: ignore[attr-defined]
        return fn

    return mark


class Projection:
    """Base class of read models. Subclasses set name, tables, ddl and decorate handlers with @handles."""

    name: ClassVar[str]
    #: The read-model tables this projection owns (rebuild swaps exactly these).
    tables: ClassVar[tuple[str, ...]]
    #: Idempotent DDL (CREATE TABLE IF NOT EXISTS ...) for those tables, with unqualified names.
    ddl: ClassVar[LiteralString]
    #: What happens to a stream whose event keeps failing: stop it there (halt) or move past it (skip).
    policy: ClassVar[Policy] = "halt"
    #: Whether it takes every event, whatever its type: a projection without ``@handles`` handlers that
    #: overrides ``apply`` does (a generic audit log); set it to say so explicitly.
    all_events: ClassVar[bool] = False
    #: Where its tables hold personal values: ``{table: (subject_column, (column, ...))}``. On
    #: ``SubjectForgotten`` the default handler (``forget_subject``) sets those columns of the subject's rows
    #: to their erased values (projections/erasure.py); a ``@handles(SubjectForgotten)`` of its own replaces it.
    personal: ClassVar[Mapping[str, tuple[str, tuple[str, ...]]]] = {}
    _handlers: ClassVar[dict[type[Any], Handler]]

    # --- the runtime's hooks: what sets a kind of subscriber apart (reactors and publications override them) --
    #: What kind of subscriber it is (``status`` shows it): ``projection`` (a read model), ``reactor``,
    #: ``publication``.
    kind: ClassVar[str] = "projection"
    #: Whether its effects are its tables alone, so a rebuild or a verify may replay the store into fresh ones.
    #: A subscriber whose effects go elsewhere (a reactor's follow-ups, a publication's messages) is not: a
    #: replay would act again. Such a one is also live at once when first seen over a non-empty store: it
    #: works the history off through its queues and catch-up, never by a backfill.
    replayable: ClassVar[bool] = True
    #: Whether its handlers append events (follow-ups): after each commit the worker counts what they did and
    #: wakes the relay for them.
    appends: ClassVar[bool] = False
    #: Whether it has deadlines to fire: the worker runs a firing task per partition beside its deliveries.
    fires_deadlines: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        found: dict[type[Any], Handler] = {}
        for klass in reversed(cls.__mro__):
            for attr in vars(klass).values():
                for event_class in getattr(attr, "_eventfleet_handles", ()):
                    found[event_class] = attr
        if cls.personal:
            erasure.validate(cls.__name__, cls.personal, getattr(cls, "tables", None))
            found.setdefault(SubjectForgotten, Projection.forget_subject)
        cls._handlers = found

    async def attach(self, store: EventStore, runtime: Runtime | None) -> None:
        """Before its first batch in a process (each consumer calls it; the first call does the work): connect
        it to what its effects need besides the batch's connection. ``runtime`` is None outside a worker (a
        command's re-drive). A read model needs nothing."""

    async def detach(self) -> None:
        """When the worker's consumers of it have stopped: release what ``attach`` took."""

    def begin(self, conn: db.Conn) -> None:
        """A batch's transaction on ``conn`` is about to run its handlers (forget what an earlier one on the same
        connection left half done)."""

    async def before_commit(self, conn: db.Conn) -> None:
        """Last in a batch's transaction on ``conn``, once its handlers all succeeded: effects that leave the
        database happen here (a publication publishes its messages), so a commit that fails repeats them (at
        least once) rather than loses them, and a handler that fails has done none of them."""

    async def forget_subject(self, conn: db.Conn, event: RecordedEvent) -> None:
        """The default handler of ``SubjectForgotten`` for a projection that declares ``personal`` columns:
        they are set to their erased values in the subject's rows (projections/erasure.py)."""
        await erasure.erase_declared(conn, self.personal, event.event.subject)

    def handles_event(self, event: RecordedEvent) -> bool:
        """Whether this projection has a handler for the event's class."""
        return type(event.event) in self._handlers

    @classmethod
    def handled_names(cls) -> frozenset[str] | None:
        """The event names (``OrderPaid``, any version) its handlers take, inherited ones included; None when
        it takes every event (``all_events``, or ``apply`` or ``apply_batch`` overridden without handlers)."""
        overridden = cls.apply is not Projection.apply or cls.apply_batch is not Projection.apply_batch
        if cls.all_events or (not cls._handlers and overridden):
            return None
        return frozenset(n for n in (getattr(c, EVENT_NAME_ATTRIBUTE, None) for c in cls._handlers) if n is not None)

    def handles_type(self, event_type: str) -> bool:
        """Whether an event of this type (``Name.vN``, known to this code or not) may concern this projection."""
        handled = self.handled_names()
        return handled is None or event_type.rpartition(".v")[0] in handled

    async def apply(self, conn: db.Conn, event: RecordedEvent) -> None:
        """Apply one event with its handler; events without a handler change nothing."""
        handler = self._handlers.get(type(event.event))
        if handler is not None:
            await handler(self, conn, event)

    async def apply_batch(self, conn: db.Conn, events: Sequence[RecordedEvent]) -> None:
        """Apply events (grouped by stream, each stream in version order) with the effect of ``apply`` on each.

        Override with set-based SQL (one statement for the whole batch) as a fast path; it must leave the
        same rows as applying the events one by one, and take row locks in a fixed order (sorted keys) so
        that concurrent workers never deadlock. When it raises, the worker re-runs the batch event by event
        to find the failing event.
        """
        for event in events:
            await self.apply(conn, event)
