"""Examples built on eventfleet."""
