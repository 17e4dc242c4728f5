"""Deployment-wide operations: migrate (schema, read models, roles), status and teardown."""

from __future__ import annotations

from workers.admin.migrate import read_model_ddl, run_migrate, run_roles

__all__ = ["read_model_ddl", "run_migrate", "run_roles"]
