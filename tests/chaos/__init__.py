"""Fault injection: a real fleet (writers, 2 relays, 3 workers) under load while faults are injected."""
