"""Moved to ``workers.handlers`` (it serves the projector, the rebuild and the deadlines). This name stays only
for ``checkpoints``, whose import follows in its next change; nothing else imports it."""

from __future__ import annotations

from workers.handlers import Failure, apply, passes_by

__all__ = ["Failure", "apply", "passes_by"]
