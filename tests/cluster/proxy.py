"""The fault-injecting TCP proxy of the cluster tests: the RabbitMQ nodes' forwarders (tests/cluster/rabbit.py)
and the replication link held behind (tests/cluster/postgres.py) are both this one class.

``Proxy(listen, target)`` moves bytes between 127.0.0.1:``listen`` and 127.0.0.1:``target`` in threads of its
own. ``delay=S`` holds the target's bytes S seconds before passing them on (the client's go through at once):
a standby whose replication stream runs behind. Faults, each undone by ``restore()``:

- ``blackhole()``: no byte moves, either way, on any connection, and every socket stays open; connections
  accepted meanwhile get no byte either (a silent node);
- ``cut()``: every connection closed, new ones refused (a node that is gone); ``cut(reset=True)`` closes with
  a RST and drops whatever ``delay`` still holds, so nothing undelivered arrives (a host that vanished).
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
from collections import deque

#: SO_LINGER on, 0 s: close() sends a RST, not a goodbye.
_RESET = b"\x01\x00\x00\x00\x00\x00\x00\x00"


@dataclasses.dataclass(eq=False)
class _Link:
    """One proxied connection: the client's socket and the one to the target."""

    client: socket.socket
    upstream: socket.socket
    closed: threading.Event = dataclasses.field(default_factory=threading.Event)

    def close(self, *, reset: bool = False) -> None:
        self.closed.set()
        for sock in (self.client, self.upstream):
            if reset:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            else:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


class Proxy:
    """A TCP proxy from ``listen`` to ``target`` with faults on demand (see the module docstring)."""

    def __init__(self, listen: int, target: int, *, delay: float = 0.0) -> None:
        self.listen, self.target, self.delay = listen, target, delay
        self._flowing = threading.Event()
        self._flowing.set()
        self._closing = threading.Event()
        self._refusing = False
        self._links: set[_Link] = set()
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", listen), reuse_port=False)
        self._server.settimeout(0.2)
        self._threads = [threading.Thread(target=self._accept, name=f"proxy {listen}->{target}", daemon=True)]
        self._threads[0].start()

    # --- faults ---------------------------------------------------------------------------------------------

    def blackhole(self) -> None:
        self._flowing.clear()

    def cut(self, *, reset: bool = False) -> None:
        self._refusing = True
        with self._lock:
            links, self._links = self._links, set()
        for link in links:
            link.close(reset=reset)

    def restore(self) -> None:
        self._refusing = False
        self._flowing.set()

    @property
    def blackholed(self) -> bool:
        return not self._flowing.is_set()

    def close(self) -> None:
        self._closing.set()
        self._flowing.set()
        self.cut(reset=True)
        for thread in self._threads:
            thread.join(timeout=2)
        self._server.close()

    # --- the threads ----------------------------------------------------------------------------------------

    def _start(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._refusing:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()  # the target is down: refuse as it would
                continue
            link = _Link(client, upstream)
            with self._lock:
                self._links.add(link)
            self._start(self._pipe, link, client, upstream)
            if self.delay:
                held: deque[tuple[float, bytes]] = deque()
                ready = threading.Condition()
                self._start(self._hold, link, held, ready)
                self._start(self._release, link, held, ready)
            else:
                self._start(self._pipe, link, upstream, client)

    def _pipe(self, link: _Link, source: socket.socket, sink: socket.socket) -> None:
        source.settimeout(0.2)
        try:
            while not link.closed.is_set() and not self._closing.is_set():
                if not self._flowing.is_set():
                    self._flowing.wait(0.2)  # hold the bytes in the kernel buffers: nothing read, nothing sent
                    continue
                try:
                    data = source.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                while not self._flowing.is_set() and not link.closed.is_set():
                    self._flowing.wait(0.2)  # blackholed mid-chunk: this chunk waits too
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)
            self._forget(link)

    def _hold(self, link: _Link, held: deque[tuple[float, bytes]], ready: threading.Condition) -> None:
        """The target's bytes, each stamped with when it may pass on."""
        with contextlib.suppress(OSError):
            while not link.closed.is_set():
                chunk = link.upstream.recv(65536)
                if not chunk:
                    break
                with ready:
                    held.append((time.monotonic() + self.delay, chunk))
                    ready.notify()
        with ready:
            held.append((0.0, b""))  # end of stream, after what is held
            ready.notify()

    def _release(self, link: _Link, held: deque[tuple[float, bytes]], ready: threading.Condition) -> None:
        """Pass the held bytes on to the client when they are due (a cut link drops what it holds)."""
        with contextlib.suppress(OSError):
            while not link.closed.is_set():
                with ready:
                    while not held and not link.closed.is_set():
                        ready.wait(0.1)
                    if link.closed.is_set():
                        break
                    due, chunk = held[0]
                    wait = due - time.monotonic()
                    if wait > 0:
                        ready.wait(min(wait, 0.1))
                        continue
                    held.popleft()
                if not chunk:
                    break
                link.client.sendall(chunk)
        with contextlib.suppress(OSError):
            link.client.close()
        self._forget(link)

    def _forget(self, link: _Link) -> None:
        if link.client.fileno() == -1 or link.upstream.fileno() == -1:
            with self._lock:
                self._links.discard(link)
