"""The projector: deliveries and store reads applied to read models exactly once.

``consumer``: one partition's deliveries on one channel, decoded, handed over, acked after commit.
``batcher``: the apply step (span, retry, apply or park, counting, DLQ copies), shared by a worker's
consumers of a projection. ``checkpoints``: one batch, its read-model writes and checkpoints in one
transaction. ``parking``: retries, poison parked per policy, re-drive. ``catchup``: a partition far behind
reads the store instead of the broker. ``deadlines``: a reactor's deadlines fired. ``lag``: watermarks and
lag. ``fleet`` and ``leases``: the partitions a worker holds. ``worker``: a process's session of all of them.
"""

from __future__ import annotations

from workers.projector.batcher import Stats
from workers.projector.checkpoints import BatchResult, apply_batch
from workers.projector.consumer import Consumer
from workers.projector.worker import consume_until_idle, resolve, run_consumer, run_worker

__all__ = ["BatchResult", "Consumer", "Stats", "apply_batch", "consume_until_idle", "resolve", "run_consumer",
           "run_worker"]
