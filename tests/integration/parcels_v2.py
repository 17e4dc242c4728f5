"""The newer release of ``parcels`` (tests/integration/test_read_model_types.py), registered: a projection module
for the commands run as processes (``--projection-module tests.integration.parcels_v2``)."""

from __future__ import annotations

from projections.registry import register
from tests.integration.test_read_model_types import ParcelsV2

register(ParcelsV2)
