"""The projector: deliveries and store reads applied to read models exactly once.

``consumer``: one projection's deliveries on one channel, acked after commit. ``checkpoints``: one batch, its
read-model writes and checkpoints in one transaction. ``handlers``: the only caller of a projection's
handlers. ``parking``: retries, poison parked per policy, re-drive. ``catchup``: a projection far behind
reads the store instead of the broker. ``lag``: watermarks and lag. ``worker``: a process's session of
all of them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers.projector.checkpoints import BatchResult, apply_batch
    from workers.projector.consumer import Consumer, Stats
    from workers.projector.worker import consume_until_idle, resolve, run_consumer, run_worker

# Loaded on first use, not with the package: the rebuild applies events through ``handlers`` and the worker
# runs backfills through the rebuild, so importing every module here would make the two packages import
# each other.
_LAZY = {"BatchResult": "checkpoints", "apply_batch": "checkpoints", "Consumer": "consumer", "Stats": "consumer",
         "consume_until_idle": "worker", "resolve": "worker", "run_consumer": "worker", "run_worker": "worker"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = ["BatchResult", "Consumer", "Stats", "apply_batch", "consume_until_idle", "resolve", "run_consumer",
           "run_worker"]
