"""The orders example: events, the Order aggregate and its commands, two projections, a writer load."""
