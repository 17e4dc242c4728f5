"""Example write models built on the event store."""
