"""Fixtures: lab (filled in by its owner)."""
