"""The one exception type a user of decalign sees for bad input."""


class DecalignError(Exception):
    """A problem with the user's input or set-up, stated in one line.

    The CLI and the server print its message as it is, never a traceback, so every
    message names what is wrong and, where it helps, what would be right.
    """


def first_line(exc: BaseException) -> str:
    """The first line of a third-party exception's message, to quote it in a one-line error (its
    type's name when it has no message)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
