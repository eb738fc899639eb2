"""A module that defines no tool."""


def helper(x: int) -> int:
    return x
