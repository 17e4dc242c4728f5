"""The outbox relay: committed outbox rows to RabbitMQ, at least once (see ``session`` for the guarantees).

``publish``: one batch in one transaction (``publish_batch``, its bounded twin ``relay_until_idle``).
``session``: the process around it (connect, LISTEN, reconnect, finish the batch on stop: ``run_relay``).
"""

from __future__ import annotations

from workers.relay.publish import (
           encode_rows,
           publish_batch,
           publish_confirmed,
           refresh_backlog,
           relay_until_idle,
)
from workers.relay.session import RelayConfig, application_name, open_pool, run_relay

__all__ = ["RelayConfig", "application_name", "encode_rows", "open_pool", "publish_batch", "publish_confirmed",
           "refresh_backlog", "relay_until_idle", "run_relay"]
