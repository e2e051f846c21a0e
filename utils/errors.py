class InputError(Exception):
    """Bad user input (a flag, a file): the message names it, what was expected and what was found."""


def one_line(text: str, limit: int = 200) -> str:
    """A library's (often multi-line) message as one line, cut to `limit` characters: errors stay one line."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
