"""bench.fanout's scenario c: with bench.fanout_models, 32 one-type read models (``fanout_shipped_09`` ..
``_32`` here)."""

from __future__ import annotations

from bench.fanout_models import COUNT, FIRST, MORE, shipped_model

MODELS = [shipped_model(n) for n in range(FIRST + COUNT, FIRST + MORE)]
