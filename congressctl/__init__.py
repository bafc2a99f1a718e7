"""congressctl: deploy, run, watch and failure-test an HA Congress-style policy service."""

__version__ = "0.1.0"
