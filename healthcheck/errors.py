"""Errors the user caused (bad file, bad input): one clear line, exit code 2."""

from __future__ import annotations

from pathlib import Path


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


def read_utf8(path: Path, label: str, why_utf8: str) -> str:
    """The text of a file the user named (a config, a baseline): one that cannot be read or is not UTF-8
    is a UsageError that starts with `label` and ends with `why_utf8` (what the file should be)."""
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise UsageError(f"{label}: cannot read it: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{label}: not UTF-8 text; {why_utf8}") from None
