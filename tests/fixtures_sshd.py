"""Fixtures: sshd (filled in by its owner)."""
