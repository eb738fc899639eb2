"""A module whose own code fails on import."""

RATIO = 1 / 0
