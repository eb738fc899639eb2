"""Benchmark of the agent server (issue #6): `scripts/bench` or `python -m bench`."""
