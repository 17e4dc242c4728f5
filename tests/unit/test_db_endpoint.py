"""How errors name a PostgreSQL server: host and port of its DSN, never any part of the user info."""

from __future__ import annotations

import pytest

from store import db


@pytest.mark.parametrize(("dsn", "named"), [
    ("postgresql://app:S3cret@db.example:6432/prod", "db.example:6432"),
    ("postgresql://app:S3cret@db.example/prod", "db.example:5432"),
    ("postgresql://app@db1:5432,db2:5433/prod?target_session_attrs=read-write", "db1:5432,db2:5433"),
    ("postgresql://app@[::1]:6432/prod", "[::1]:6432"),
    ("postgresql:///prod?host=/run/postgresql&port=5433", "/run/postgresql:5433"),
])
def test_endpoint_names_the_hosts_and_ports(dsn: str, named: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGHOST", raising=False)
    monkeypatch.delenv("PGPORT", raising=False)
    assert db.endpoint(dsn) == named
    assert "S3cret" not in db.endpoint(dsn)
