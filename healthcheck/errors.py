"""Errors the user caused (bad file, bad input): one clear line, exit code 2."""


class UsageError(Exception):
    """A problem with what the user gave us. `str(err)` is the whole message, one line."""

    exit_code = 2
