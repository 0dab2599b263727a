"""Errors the user caused (bad file, bad input): one clear line, exit code 2."""


def describe(exc: BaseException) -> str:
    """'TypeName: first line of the message', for one-line reports of someone else's exception."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {first_line(text)}" if text else type(exc).__name__


def first_line(text: str) -> str:
    """The first non-blank line of `text` (torch's errors carry graphs, guards and C++ frames after it)."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


class UsageError(ValueError):
    """A problem with what the user gave us. `str(err)` is the whole message, one line.

    A ValueError, so that the Python API (`check(..., select="HC1O1")`) raises what callers expect
    for a bad argument; the CLI turns it into one line on stderr and exit code 2.
    """

    exit_code = 2
