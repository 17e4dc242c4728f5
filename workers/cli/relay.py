"""``eventfleet relay``: publish the outbox until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging

from workers.config import Settings
from workers.relay import RelayConfig, open_pool, run_relay
from workers.runtime import health, http, lifecycle

logger = logging.getLogger(__name__)


async def cmd_relay(settings: Settings, args: argparse.Namespace) -> int:
    """``eventfleet relay``: publish the outbox until SIGTERM/SIGINT; exit 0 on a clean stop."""
    config = RelayConfig.from_settings(settings)
    status = health.Health()
    async with http.serve(settings.port("relay"), status.ready, reason=status.reason, next_free=settings.free_ports), open_pool(config) as pool:
        if not config.projections:
            logger.warning("no projections configured: no queue is bound, and the broker returns what is "
                           "published unless other consumers bound their own queues (set "
                           "EVENTFLEET_PROJECTION_MODULES or --projection-module)")
        logger.info("relay started", extra={"schema": config.schema, "prefix": config.prefix,
                                            "batch_size": config.batch_size})
        await lifecycle.run_until_stopped(run_relay(pool, config, status))
    logger.info("relay stopped")
    return 0
