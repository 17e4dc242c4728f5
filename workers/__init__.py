"""The eventfleet runtime: relay, projection workers and the operator CLI."""
