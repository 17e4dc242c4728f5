"""What each broker topology costs RabbitMQ for M read models ("subscribers") and P partitions (issue 25, item 2).

    python -m bench.topology [--messages 2000] [--cases 2x4,10x4,34x4,2x16,10x16] [--topologies 1,2,3,4]
                             [--match 0.25] [--stream-prefetch N] [--idle 10] [--max-queues 120]
                             [--node-max-queues 250] [--node NODE] [--quick]

Standalone: plain aio-pika against ``EVENTFLEET_AMQP_URL`` (no Postgres, no eventfleet processes). The
messages are the relay's (``workers.broker.batch_message``: ``--events`` events of ``--event-bytes`` bytes of
payload each, persistent), published round-robin over the P partitions with publisher confirms, pipelined
``--window`` at a time (``workers.relay.publish.publish_confirmed``), and consumed on one connection (one
worker process) with one channel per consumer, the workers' prefetch (``Settings().prefetch_messages``) and
an ack per message after the body is decoded (once per message id per process, as the worker's decode cache).

  (1) today: M x P quorum queues (``partition_queue_arguments``: single active consumer, delivery limit), each
      bound to its partition's routing key, so every message is copied into M queues; one consumer each.
  (2) a shared quorum queue per partition for the worker group: P queues, one consumer per partition that
      decodes once and dispatches to the M subscribers in-process (the broker delivers each message once).
  (3) a stream per partition (``x-queue-type=stream``): P streams, M consumers on each (``x-stream-offset``
      ``first``, a prefetch, acks as credit): the broker stores each message once, every subscriber reads it.
  (4) relay-side filtering: the M x P queues of (1), but bound by ``<subscriber>.<partition>`` and each
      message carries a ``BCC`` header naming only the subscribers it holds a handled type for (one publish,
      routed by the broker; a message nobody handles is not published). Each subscriber wants each message
      with probability ``--match`` (seeded).

Per case (topology, M, P), each on a fresh prefix whose queues and exchange are deleted in ``finally``:
wall time from the first publish to the last ack; RabbitMQ CPU (the node's beam.smp, utime + stime from
/proc: the whole node, so other agents' load is in it); Erlang reductions of this case's processes only
(its queues' processes: the quorum queues' Ra servers, the streams' writers; and the processes of its two
connections: readers, channels (where a stream consumer reads the log), writers), of the node's shared
quorum-queue WAL and segment writer (``ra_log_wal``, ``ra_log_segment_writer``: others' writes too) and of
the whole node; "RabbitMQ CPU, ours" = node CPU x our reductions / the node's (the isolation: reductions are
per process, CPU is not; work in NIFs and the kernel, the WAL's fsyncs, a reader's file reads, weighs little
in reductions); the publisher's and the consumers' CPU (each runs in a thread of its own:
``time.thread_time``); after the run the queues' memory (``list_queues memory``), the node's memory, file
handles (``file_handle_cache:info()``) and beam's open descriptors against the case's start; then, over
``--idle`` seconds with the consumers still attached, the queues' processes' reductions at rest.

The broker is shared with other agents' tests: ``--node`` points rabbitmqctl at a private node of the bench's
(with ``EVENTFLEET_AMQP_URL`` at its port; bench/TOPOLOGY-NOTES.md says how to start one), whose beam CPU is then
the cases' alone; on the shared node the reductions are the isolation.

Ratios are against topology (1) at M=2 with the same P, measured in the same run (measured first and, as a
drift check, again last). The machine is shared: absolute figures are noisy, ratios less so.
A case whose queues would exceed ``--max-queues``, or bring the node's above ``--node-max-queues``, is
skipped and said so (this RabbitMQ 3.10 node wedges at ~300 quorum queues, for everybody). Exit 2 when a
case could not be measured; 0 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import aio_pika
import msgpack
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from store import codec
from workers import broker
from workers.config import Settings
from workers.relay.publish import publish_confirmed

TOPOLOGIES = {1: "P x M quorum queues", 2: "P shared quorum queues", 3: "P streams, M readers",
              4: "P x M queues, relay filters"}
DEFAULT_CASES = ((2, 4), (10, 4), (34, 4), (2, 16), (10, 16))
EVENT_TYPES = ("OrderPlaced.v1", "OrderPaid.v1", "OrderShipped.v1", "OrderCancelled.v1")
CONFIRM_TIMEOUT = 60.0
DECODE_CACHE = 4096


class BenchError(Exception):
    """A case that could not be measured (not a slow one)."""


class Skipped(Exception):
    """A case this node cannot hold now (too many queues): reported, the others still run."""


# --- the broker's side: rabbitmqctl, /proc --------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_fds(pid: int) -> int | None:
    """A process's open descriptors (None if /proc does not let us read them)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


#: The node ``rabbitmqctl`` asks (``--node``; None: its default, the machine's node).
NODE: list[str] = []


async def rabbitmqctl(*args: str) -> str:
    if shutil.which("rabbitmqctl") is None:
        raise BenchError("rabbitmqctl is not on PATH: the broker's pid, reductions and memory come from it")
    proc = await asyncio.create_subprocess_exec("rabbitmqctl", "-q", *NODE, *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise BenchError(f"rabbitmqctl {' '.join(args[:1])} did not answer within 60 s") from None
    if proc.returncode != 0:
        raise BenchError(f"rabbitmqctl {' '.join(args[:1])} failed: {err.decode().strip()}")
    return out.decode()


async def broker_pid() -> int:
    pid = int((await rabbitmqctl("eval", "list_to_integer(os:getpid()).")).strip())
    try:
        cpu_seconds(pid)
    except OSError as exc:
        raise BenchError(f"the RabbitMQ node's pid {pid} is not readable in /proc: is the broker here?") from exc
    return pid


#: One Erlang expression: the node's reductions, the shared Ra WAL's and segment writer's, each queue of the
#: prefix's (its process: a quorum queue's Ra server, a stream's writer) and the processes of every connection
#: named with the tag (its reader, and every process whose ``process_name`` names the connection: its channels,
#: where a quorum queue's client state lives and a stream consumer reads the log, and their writers).
SNAPSHOT = r"""
Prefix = <<"%(prefix)s">>, Tag = <<"%(tag)s">>,
Red = fun(P) when is_pid(P) -> case erlang:process_info(P, reductions) of {reductions, R} -> R; _ -> 0 end;
         (_) -> 0 end,
Starts = fun(B, Pre) -> is_binary(B) andalso binary:longest_common_prefix([B, Pre]) =:= byte_size(Pre) end,
Ours = fun(R) -> try [{client_properties, CP}] = rabbit_reader:info(R, [client_properties]),
                     case lists:keyfind(<<"connection_name">>, 1, CP) of {_, _, N} -> Starts(N, Tag); _ -> false end
                 catch _:_ -> false end end,
Conns = [R || R <- rabbit_networking:connections_local(), Ours(R)],
Names = [proplists:get_value(name, rabbit_reader:info(R, [name])) || R <- Conns],
Mine = fun(P) -> case erlang:process_info(P, dictionary) of
                     {dictionary, D} -> case proplists:get_value(process_name, D) of
                                            {_, {N, _}} -> lists:member(N, Names); {_, N} -> lists:member(N, Names);
                                            _ -> false end;
                     _ -> false end end,
Procs = lists:usort(Conns ++ [P || P <- erlang:processes(), Mine(P)]),
QPid = fun({N, _Node}) when is_atom(N) -> whereis(N); (P) when is_pid(P) -> P; (_) -> undefined end,
Qs = [{element(4, amqqueue:get_name(Q)), Red(QPid(amqqueue:get_pid(Q)))}
      || Q <- rabbit_amqqueue:list(<<"/">>), Starts(element(4, amqqueue:get_name(Q)), Prefix)],
io:format("node ~b~n", [element(1, erlang:statistics(exact_reductions))]),
io:format("wal ~b~n", [Red(whereis(ra_log_wal)) + Red(whereis(ra_log_segment_writer))]),
io:format("connections ~b ~b ~b~n", [length(Conns), lists:sum([Red(P) || P <- Procs]), length(Procs)]),
[io:format("queue ~s ~b~n", [N, R]) || {N, R} <- Qs],
io:format("memory ~b~n", [erlang:memory(total)]),
io:format("handles ~b~n", [proplists:get_value(total_used, file_handle_cache:info([total_used]))]),
ok.
"""


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    at: float  # perf_counter
    beam_cpu: float
    beam_fds: int | None
    node: int  # reductions, the whole node
    wal: int  # the shared Ra WAL + segment writer
    connections: int  # how many of ours the node sees
    connection_reductions: int
    queues: dict[str, int]  # reductions of each of our queues' process
    memory: int  # the node's, bytes
    handles: int  # file_handle_cache total_used

    @property
    def queue_reductions(self) -> int:
        return sum(self.queues.values())


async def snapshot(beam: int, prefix: str, tag: str, cpu_first: bool) -> Snapshot:
    """The broker's counters; ``cpu_first`` reads beam's CPU before the rabbitmqctl call (a window's end),
    otherwise after it (a window's start), so the call's own work stays out of the window."""
    before = (cpu_seconds(beam), time.perf_counter()) if cpu_first else None
    out = await rabbitmqctl("eval", SNAPSHOT % {"prefix": prefix + ".", "tag": tag})
    cpu, at = before if before is not None else (cpu_seconds(beam), time.perf_counter())
    values: dict[str, list[str]] = {}
    queues: dict[str, int] = {}
    for line in out.splitlines():
        key, *rest = line.split()
        if key == "queue":
            queues[rest[0]] = int(rest[1])
        elif rest:
            values[key] = rest
    try:
        return Snapshot(at, cpu, open_fds(beam), int(values["node"][0]), int(values["wal"][0]),
                        int(values["connections"][0]), int(values["connections"][1]), queues,
                        int(values["memory"][0]), int(values["handles"][0]))
    except (KeyError, ValueError, IndexError) as exc:
        raise BenchError(f"cannot read the broker's snapshot: {out[:500]!r}") from exc


async def node_queue_count() -> int:
    return sum(1 for line in (await rabbitmqctl("list_queues", "name", "--no-table-headers")).splitlines()
               if line.strip())


async def queue_memory(prefix: str) -> dict[str, int]:
    out = await rabbitmqctl("list_queues", "name", "memory", "--no-table-headers")
    found = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].startswith(prefix + ".") and parts[1].isdigit():
            found[parts[0]] = int(parts[1])
    return found


# --- one case's plan: queues, messages, who receives what -------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Consumer:
    queue: str
    expected: int
    subscribers: int  # the in-process dispatch fan-out (2: M; otherwise 1)
    arguments: dict[str, Any] | None = None  # basic.consume's


@dataclasses.dataclass(slots=True)
class Plan:
    topology: int
    m: int
    p: int
    prefix: str
    exchange: str
    queues: list[tuple[str, dict[str, Any], str]]  # name, arguments, binding key
    messages: list[tuple[str, aio_pika.Message]]  # routing key, message
    consumers: list[Consumer]
    published_events: int = 0


def make_messages(count: int, partitions: int, events: int, event_bytes: int,
                  seed: int) -> list[tuple[int, aio_pika.Message, frozenset[str]]]:
    """``count`` relay batch messages, round-robin over the partitions: (partition, message, its event types)."""
    rng = random.Random(seed)
    now = dt.datetime.now(dt.UTC)
    out = []
    position = 0
    metadata = codec.packb({"correlation_id": str(uuid.UUID(int=rng.getrandbits(128)))})
    for i in range(count):
        rows: list[dict[str, Any]] = []
        for _ in range(events):
            position += 1
            rows.append({"event_id": uuid.UUID(int=rng.getrandbits(128)), "stream_id": f"order-{rng.randrange(10**6)}",
                         "version": rng.randrange(4), "global_position": position, "transaction_id": position,
                         "event_type": rng.choice(EVENT_TYPES), "data": rng.randbytes(event_bytes),
                         "metadata": metadata, "recorded_at": now})
        partition = i % partitions
        out.append((partition, broker.batch_message(partition, rows, [broker.event_map(r) for r in rows]),
                    frozenset(r["event_type"] for r in rows)))
    return out


def plan(topology: int, m: int, p: int, args: argparse.Namespace, tag: str) -> Plan:
    prefix = f"{tag}.t{topology}m{m}p{p}"
    n = broker.Names(prefix)
    built = make_messages(args.messages, p, args.events, args.event_bytes, args.seed)
    per_partition = [sum(1 for part, _, _ in built if part == k) for k in range(p)]
    subscribers = [f"s{s:02d}" for s in range(m)]
    queues: list[tuple[str, dict[str, Any], str]] = []
    consumers: list[Consumer] = []
    messages: list[tuple[str, aio_pika.Message]] = []
    if topology in (1, 4):
        for s in subscribers:
            for k in range(p):
                name = n.partition_queue(s, k)
                queues.append((name, broker.partition_queue_arguments(n, s), str(k) if topology == 1 else f"{s}.{k}"))
        if topology == 1:
            messages = [(str(part), msg) for part, msg, _ in built]
            consumers = [Consumer(n.partition_queue(s, k), per_partition[k], 1) for s in subscribers for k in range(p)]
        else:
            rng = random.Random(args.seed + 1)
            counts = {(s, k): 0 for s in subscribers for k in range(p)}
            for part, msg, _types in built:
                wanted = [s for s in subscribers if rng.random() < args.match]
                if not wanted:
                    continue  # nobody handles a type of it: the relay does not publish it
                for s in wanted:
                    counts[(s, part)] += 1
                assert msg.headers is not None
                msg.headers["BCC"] = [f"{s}.{part}" for s in wanted]
                messages.append((f"{prefix}.nobody", msg))
            consumers = [Consumer(n.partition_queue(s, k), counts[(s, k)], 1) for s in subscribers for k in range(p)]
    elif topology == 2:
        for k in range(p):
            queues.append((n.partition_queue("group", k), broker.partition_queue_arguments(n, "group"), str(k)))
        messages = [(str(part), msg) for part, msg, _ in built]
        consumers = [Consumer(n.partition_queue("group", k), per_partition[k], m) for k in range(p)]
    elif topology == 3:
        for k in range(p):
            queues.append((n.partition_queue("stream", k), {"x-queue-type": "stream"}, str(k)))
        messages = [(str(part), msg) for part, msg, _ in built]
        consumers = [Consumer(n.partition_queue("stream", k), per_partition[k], 1, {"x-stream-offset": "first"})
                     for _s in subscribers for k in range(p)]
    else:
        raise ValueError(f"no topology {topology}")
    return Plan(topology, m, p, prefix, n.partitions_exchange, queues, messages, consumers,
                published_events=args.events * len(messages))


# --- the consumers: one connection, a thread of their own ---------------------------------------------


class Consumers(threading.Thread):
    """The worker's side: one connection, a channel per consumer with the workers' prefetch, ack per message.
    ``ready`` once every consumer is attached, ``done`` once every expected message was acked; closes the
    connection when ``stop`` is set. ``cpu`` is this thread's CPU seconds between ready and done."""

    def __init__(self, url: str, name: str, consumers: Sequence[Consumer], prefetch: int, timeout: float) -> None:
        super().__init__(daemon=True)
        self.url, self.name, self.consumers, self.prefetch, self.timeout = url, name, consumers, prefetch, timeout
        self.ready, self.done, self.stop = threading.Event(), threading.Event(), threading.Event()
        self.error: BaseException | None = None
        self.cpu = 0.0
        self.deliveries = 0
        self.dispatched = 0
        self.finished_at = 0.0

    def run(self) -> None:
        try:
            asyncio.run(self._run())
        except Exception as exc:  # noqa: BLE001 - reported to the main thread, which raises it
            self.error = exc
            self.ready.set()
            self.done.set()

    async def _run(self) -> None:
        connection = await aio_pika.connect(self.url, client_properties={"connection_name": self.name})
        cache: dict[str, list[Any]] = {}
        remaining = len([c for c in self.consumers if c.expected > 0])
        all_done = asyncio.Event()
        if remaining == 0:
            all_done.set()
        try:
            for consumer in self.consumers:
                channel = await connection.channel()
                await channel.set_qos(prefetch_count=self.prefetch)
                queue = await channel.get_queue(consumer.queue, ensure=False)
                left = [consumer.expected]

                async def on_message(message: AbstractIncomingMessage, left: list[int] = left,
                                     fanout: int = consumer.subscribers) -> None:
                    nonlocal remaining
                    key = message.message_id or ""
                    entries = cache.get(key)
                    if entries is None:  # the worker's decode cache: one decode per message per process
                        entries = msgpack.unpackb(message.body, ext_hook=codec.ext_hook, raw=False, timestamp=3)
                        cache[key] = entries
                        if len(cache) > DECODE_CACHE:
                            cache.pop(next(iter(cache)))
                    for _ in range(fanout):  # each subscriber looks at each event's type
                        self.dispatched += sum(1 for e in entries if e["event_type"] == EVENT_TYPES[2])
                    await message.ack()
                    self.deliveries += 1
                    left[0] -= 1
                    if left[0] == 0:
                        remaining -= 1
                        if remaining == 0:
                            self.finished_at = time.perf_counter()
                            all_done.set()

                await queue.consume(on_message, arguments=consumer.arguments)
            start = time.thread_time()
            self.ready.set()
            deadline = time.monotonic() + self.timeout
            while not all_done.is_set():
                if self.stop.is_set():
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.deliveries} deliveries, {remaining} consumers short, after "
                                       f"{self.timeout} s")
                await asyncio.sleep(0.02)
            self.cpu = time.thread_time() - start
            self.done.set()
            while not self.stop.is_set():  # noqa: ASYNC110 - a threading.Event, set by the main thread
                await asyncio.sleep(0.05)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), 10)


# --- one case ----------------------------------------------------------------------------------------


async def wait_for_event(event: threading.Event) -> None:
    """Until another thread sets ``event`` (polled: a cancelled wait leaves no thread behind)."""
    while not event.is_set():  # noqa: ASYNC110 - a threading.Event, set by the consumers' thread
        await asyncio.sleep(0.01)


@dataclasses.dataclass(frozen=True, slots=True)
class Result:
    topology: int
    m: int
    p: int
    queues: int
    published: int  # messages (4: those someone handles)
    deliveries: int
    wall: float
    beam_cpu: float
    ours_reductions: int  # our queues' processes + our connections' processes
    queue_reductions: int
    connection_reductions: int
    node_reductions: int
    wal_reductions: int
    publisher_cpu: float
    consumer_cpu: float
    queue_memory: int  # bytes, our queues (list_queues memory)
    node_memory_delta: int
    handles_delta: int
    fds_delta: int | None
    idle_reductions_per_s: float  # our queues' processes, consumers attached, nothing flowing

    @property
    def ours_cpu(self) -> float:
        """The node's CPU apportioned by reductions to this case's processes."""
        return self.beam_cpu * self.ours_reductions / self.node_reductions if self.node_reductions else 0.0

    @property
    def ours_wal_cpu(self) -> float:
        """``ours_cpu`` with the shared WAL's and segment writer's reductions (an upper bound: others' writes)."""
        reductions = self.ours_reductions + self.wal_reductions
        return self.beam_cpu * reductions / self.node_reductions if self.node_reductions else 0.0


async def run_case(topology: int, m: int, p: int, args: argparse.Namespace, beam: int, run_tag: str) -> Result:
    the_plan = plan(topology, m, p, args, run_tag)
    if len(the_plan.queues) > args.max_queues:
        raise Skipped(f"{len(the_plan.queues)} queues > --max-queues {args.max_queues}")
    on_node = await node_queue_count()
    if on_node + len(the_plan.queues) > args.node_max_queues:
        raise Skipped(f"the node holds {on_node} queues; +{len(the_plan.queues)} > --node-max-queues "
                      f"{args.node_max_queues}")
    tag = f"{the_plan.prefix}.conn"
    prefetch = (args.stream_prefetch if topology == 3 and args.stream_prefetch else Settings().prefetch_messages)
    base = await snapshot(beam, the_plan.prefix, tag, cpu_first=False)
    connection = await aio_pika.connect(args.amqp_url, client_properties={"connection_name": f"{tag}.publisher"})
    consumers: Consumers | None = None
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.declare_exchange(the_plan.exchange, aio_pika.ExchangeType.DIRECT, durable=True)
        for name, arguments, key in the_plan.queues:
            queue = await channel.declare_queue(name, durable=True, arguments=arguments)
            await queue.bind(exchange, routing_key=key)
        consumers = Consumers(args.amqp_url, f"{tag}.consumers", the_plan.consumers, prefetch, args.timeout)
        consumers.start()
        await wait_for_event(consumers.ready)
        if consumers.error is not None:
            raise BenchError(f"consumers: {type(consumers.error).__name__}: {consumers.error}")
        start = await snapshot(beam, the_plan.prefix, tag, cpu_first=False)
        publisher_cpu = time.thread_time()
        for i in range(0, len(the_plan.messages), args.window):
            await publish_confirmed(exchange, the_plan.messages[i:i + args.window], CONFIRM_TIMEOUT)
        publisher_cpu = time.thread_time() - publisher_cpu
        await wait_for_event(consumers.done)
        if consumers.error is not None:
            raise BenchError(f"consumers: {type(consumers.error).__name__}: {consumers.error}")
        await asyncio.sleep(0.2)  # the last acks reach the queues
        end = await snapshot(beam, the_plan.prefix, tag, cpu_first=True)
        memory = await queue_memory(the_plan.prefix)
        await asyncio.sleep(args.idle)
        idle = await snapshot(beam, the_plan.prefix, tag, cpu_first=True)
        idle_reductions = (idle.queue_reductions - end.queue_reductions) / (idle.at - end.at)
        if end.connections != 2:
            raise BenchError(f"the node showed {end.connections} of this case's 2 connections: reductions unattributed")
        if set(end.queues) != {name for name, _, _ in the_plan.queues}:
            raise BenchError(f"the node listed {len(end.queues)} of this case's {len(the_plan.queues)} queues")
        return Result(
            topology, m, p, len(the_plan.queues), len(the_plan.messages), consumers.deliveries,
            consumers.finished_at - start.at, end.beam_cpu - start.beam_cpu,
            (end.queue_reductions - start.queue_reductions) + (end.connection_reductions - start.connection_reductions),
            end.queue_reductions - start.queue_reductions, end.connection_reductions - start.connection_reductions,
            end.node - start.node, end.wal - start.wal, publisher_cpu, consumers.cpu, sum(memory.values()),
            end.memory - base.memory, end.handles - base.handles,
            None if end.beam_fds is None or base.beam_fds is None else end.beam_fds - base.beam_fds,
            idle_reductions)
    finally:
        if consumers is not None:
            consumers.stop.set()
            await asyncio.to_thread(consumers.join, 30)
        await cleanup(connection, the_plan, args.amqp_url)


async def cleanup(connection: AbstractConnection, the_plan: Plan, url: str) -> None:
    """Delete every queue and the exchange of a case (a channel of its own: the publisher's may be closed)."""
    try:
        if connection.is_closed:
            connection = await aio_pika.connect(url)
        channel: AbstractChannel = await connection.channel()
        for name, _, _ in the_plan.queues:
            await channel.queue_delete(name)
        await channel.exchange_delete(the_plan.exchange)
    finally:
        with contextlib.suppress(Exception):
            await connection.close()


# --- the run ------------------------------------------------------------------------------------------


def parse_cases(text: str) -> list[tuple[int, int]]:
    cases = []
    for part in text.split(","):
        found = re.fullmatch(r"\s*(\d+)x(\d+)\s*", part)
        if not found:
            raise argparse.ArgumentTypeError(f"a case is MxP (subscribers x partitions), not {part!r}")
        cases.append((int(found[1]), int(found[2])))
    return cases


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.topology", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000, help="batch messages published per case")
    parser.add_argument("--events", type=int, default=4, help="events per batch message")
    parser.add_argument("--event-bytes", type=int, default=200, help="payload bytes per event")
    parser.add_argument("--window", type=int, default=16, help="publishes in flight per confirm round")
    parser.add_argument("--cases", type=parse_cases, default=list(DEFAULT_CASES), help="MxP,... (default %(default)s)")
    parser.add_argument("--topologies", default="1,2,3,4")
    parser.add_argument("--stream-prefetch", type=int, default=None,
                        help="(3): the consumers' prefetch (default: the workers', as the others)")
    parser.add_argument("--match", type=float, default=0.25, help="(4): the share of messages each subscriber handles")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds at rest measured after each case")
    parser.add_argument("--max-queues", type=int, default=120, help="skip a case that declares more queues")
    parser.add_argument("--node-max-queues", type=int, default=250,
                        help="skip a case that would bring the node's queues above this")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for a case's consumers to finish")
    parser.add_argument("--seed", type=int, default=25)
    parser.add_argument("--quick", action="store_true", help="200 messages, 1 s at rest: checks that it works")
    parser.add_argument("--amqp-url", default=os.environ.get("EVENTFLEET_AMQP_URL", Settings().amqp_url))
    parser.add_argument("--node", help="the RabbitMQ node rabbitmqctl asks (default: its own default), e.g. a "
                                       "private node of the bench's, whose CPU is then the cases' alone")
    args = parser.parse_args(argv)
    NODE[:] = ["-n", args.node] if args.node else []
    args.topologies = [int(t) for t in args.topologies.split(",")]
    if any(t not in TOPOLOGIES for t in args.topologies):
        parser.error(f"--topologies takes some of {sorted(TOPOLOGIES)}")
    if args.quick:
        args.messages, args.idle = 200, 1.0
    return args


def fmt_ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "-"


def report(results: list[Result], baselines: dict[int, list[Result]], skipped: list[str]) -> None:
    print()
    print("Per case (ratios: against (1) at M=2, same P, measured first in this run)")
    head = (f"{'top':>3} {'M':>3} {'P':>3} {'queues':>6} {'deliv':>6} {'wall s':>7} {'x':>6} {'beam s':>7} "
            f"{'ours s':>7} {'x':>6} {'+wal s':>7} {'x':>6} {'Mred':>7} {'x':>6} {'red/deliv':>9} {'pub s':>6} {'cons s':>6} {'x':>6} "
            f"{'q MiB':>6} {'KiB/q':>6} {'node MiB':>8} {'fh':>4} {'fds':>4} {'idle red/s/q':>12}")
    print(head)
    for r in results:
        base = baselines[r.p][0]
        print(f"{r.topology:>3} {r.m:>3} {r.p:>3} {r.queues:>6} {r.deliveries:>6} {r.wall:>7.2f} "
              f"{fmt_ratio(r.wall, base.wall):>6} {r.beam_cpu:>7.2f} {r.ours_cpu:>7.2f} "
              f"{fmt_ratio(r.ours_cpu, base.ours_cpu):>6} {r.ours_wal_cpu:>7.2f} "
              f"{fmt_ratio(r.ours_wal_cpu, base.ours_wal_cpu):>6} {r.ours_reductions / 1e6:>7.1f} "
              f"{fmt_ratio(r.ours_reductions, base.ours_reductions):>6} "
              f"{r.ours_reductions / max(r.deliveries, 1):>9.0f} {r.publisher_cpu:>6.2f} {r.consumer_cpu:>6.2f} "
              f"{fmt_ratio(r.consumer_cpu, base.consumer_cpu):>6} {r.queue_memory / 2**20:>6.2f} "
              f"{r.queue_memory / r.queues / 1024:>6.1f} {r.node_memory_delta / 2**20:>8.1f} {r.handles_delta:>4} "
              f"{'-' if r.fds_delta is None else r.fds_delta:>4} {r.idle_reductions_per_s / r.queues:>12.0f}")
    print()
    print("Reductions split (millions): queues' processes / connections' processes / shared WAL+segment writer "
          "(others' too) / whole node")
    for r in results:
        print(f"  ({r.topology}) M={r.m:<3} P={r.p:<3} {r.queue_reductions / 1e6:7.1f} / "
              f"{r.connection_reductions / 1e6:7.1f} / {r.wal_reductions / 1e6:7.1f} / {r.node_reductions / 1e6:7.1f}"
              f"   ours per published message {r.ours_reductions / max(r.published, 1):8.0f}")
    for p, pair in baselines.items():
        if len(pair) == 2:
            a, b = pair
            print(f"drift: (1) M=2 P={p} first/last: ours CPU {a.ours_cpu:.2f}/{b.ours_cpu:.2f} s, reductions "
                  f"{a.ours_reductions / 1e6:.1f}/{b.ours_reductions / 1e6:.1f} M, wall {a.wall:.2f}/{b.wall:.2f} s")
    for line in skipped:
        print(f"skipped: {line}")


async def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    beam = await broker_pid()
    run_tag = f"topo.{uuid.uuid4().hex[:8]}"
    print(f"bench.topology {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, load {os.getloadavg()[0]:.2f}, "
          f"RabbitMQ {args.node or 'node'} pid {beam}, {args.messages} messages of {args.events} x {args.event_bytes} B, prefetch "
          f"{Settings().prefetch_messages}, window {args.window}, prefix {run_tag}", flush=True)
    results: list[Result] = []
    baselines: dict[int, list[Result]] = {}
    skipped: list[str] = []
    failed = False
    order: list[tuple[int, int, int]] = []
    for p in sorted({p for _, p in args.cases}):
        order.append((1, 2, p))  # the baseline first
    for m, p in args.cases:
        for t in args.topologies:
            if (t, m, p) != (1, 2, p):
                order.append((t, m, p))
    order += [(1, 2, p) for p in sorted({p for _, p in args.cases})]  # and last: the drift
    for t, m, p in order:
        label = f"({t}) {TOPOLOGIES[t]}, M={m}, P={p}"
        try:
            result = await run_case(t, m, p, args, beam, run_tag)
        except Skipped as exc:
            skipped.append(f"{label}: {exc}")
            print(f"{label}: skipped, {exc}", flush=True)
            continue
        except (BenchError, TimeoutError, aio_pika.exceptions.AMQPException, OSError) as exc:
            failed = True
            print(f"{label}: FAILED {type(exc).__name__}: {exc}", flush=True)
            continue
        print(f"{label}: {result.queues} queues, {result.deliveries} deliveries in {result.wall:.2f} s, beam "
              f"{result.beam_cpu:.2f} s (ours {result.ours_cpu:.2f} s), consumers {result.consumer_cpu:.2f} s",
              flush=True)
        if t == 1 and m == 2:
            baselines.setdefault(p, []).append(result)
            if len(baselines[p]) == 2:
                continue  # the drift check: not a row of its own
        results.append(result)
    if not baselines:
        print("no baseline measured: no ratios")
        return 2
    report([r for r in results if r.p in baselines], baselines, skipped)
    return 2 if failed else 0


async def guarded() -> int:
    """``main`` with SIGTERM and SIGINT cancelling it, so every case's ``finally`` deletes what it declared."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await main()
    except asyncio.CancelledError:
        print("interrupted: the case in flight was cleaned up", flush=True)
        return 2


def run(main_: Callable[[], Any] = guarded) -> None:
    sys.exit(asyncio.run(main_()))


if __name__ == "__main__":
    run()
