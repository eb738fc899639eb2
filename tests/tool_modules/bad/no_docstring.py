from server.tools import tool


@tool
def mystery(x: int) -> int:
    return x
