"""Errors the user caused (bad file, bad input): one clear line, exit code 2."""


def describe(exc: BaseException) -> str:
    """'TypeName: first line of the message', for one-line reports of someone else's exception."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


class UsageError(Exception):
    """A problem with what the user gave us. `str(err)` is the whole message, one line."""

    exit_code = 2
