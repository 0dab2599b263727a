"""Run the user's model code (import, construction, forward) where it cannot take the CLI down with it.

A model file is trusted Python: it runs with the user's permissions, and nothing here is a security
boundary. What isolation buys is robustness. On Linux each model file is analysed in a forked child
process (cheap: torch is already imported in the parent, so a fork costs milliseconds): a model
that hangs is killed after `--timeout`, and one that calls `os._exit(0)`, segfaults or is killed
leaves no result, which the parent reports as an error instead of a passing gate. Elsewhere, or
when CUDA is already initialized in this process (a forked child could not use it), the analysis
runs in-process, with a watchdog thread that ends the process with exit code 2 at the timeout.

In both cases the user's own output is kept away from the report: Python-level prints and C-level
writes to stdout go to stderr (so `--format json` on stdout is only the report), warnings are
recorded and passed back, and what torch's loggers and C++ code write to stderr (export guards,
graph dumps) is kept in a file that `-v` shows.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import signal
import sys
import sysconfig
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from healthcheck.errors import UsageError, describe, first_line


@dataclass(frozen=True)
class CaughtWarning:
    category: str
    message: str
    filename: str
    lineno: int


@dataclass
class Outcome:
    """What running the user's code gave: a value, or an error line with its details."""

    value: Any = None
    error: str | None = None  # one line, without the "healthcheck: error:" prefix
    details: str = ""  # the traceback, for --debug
    messages: str = ""  # every message of the exception chain in full, for -v
    warnings: list[CaughtWarning] = field(default_factory=list)
    noise: str = ""  # what torch and C++ code wrote to stderr meanwhile


# True when the healthcheck command itself started this process (the console script, `python -m
# healthcheck`): then no torch op has run here before the first fork. Otherwise (CliRunner, a sweep
# worker, a notebook) the caller may already have used OpenMP's thread pool, which a forked child
# cannot use (libgomp's workers do not survive fork, and the child's first parallel op hangs), so the
# child computes on one thread, as torch's DataLoader workers do.
_ENTRY_POINT = False


def mark_entry_point() -> None:
    """Called by the command-line entry points before anything runs torch."""
    global _ENTRY_POINT
    _ENTRY_POINT = True


def can_fork() -> bool:
    """Fork where it is safe for torch: Linux, and CUDA not yet initialized in this process."""
    if sys.platform != "linux" or not hasattr(os, "fork"):
        return False
    torch = sys.modules.get("torch")
    return not (torch is not None and torch.cuda.is_initialized())


def preload() -> None:
    """Import what every check imports (torch, and torch._dynamo, which fx and export tracing pull in: about
    2.5 s) before the first fork, so that each model file's child starts warm instead of paying it again."""
    import healthcheck.api  # noqa: F401

    with contextlib.suppress(Exception):
        import torch._dynamo  # noqa: F401


def run_user_code(function: Callable[..., Any], *args: Any, timeout: float | None, label: str) -> Outcome:
    """`function(*args)` in a forked child (else in-process); never raises except KeyboardInterrupt.

    `label` names the work in error lines ("model.py"); `timeout` is in seconds (None or 0: none).
    """
    with tempfile.TemporaryDirectory(prefix="healthcheck-") as scratch:
        noise_path = Path(scratch) / "stderr.txt"
        if can_fork():
            outcome = _in_child(function, args, timeout or None, label, Path(scratch) / "result.pickle", noise_path)
        else:
            outcome = _in_process(function, args, timeout or None, label, noise_path)
        with contextlib.suppress(OSError):
            outcome.noise = noise_path.read_text(errors="replace")
    return outcome


def _call(function: Callable[..., Any], args: tuple, noise_path: Path) -> Outcome:
    caught: list[CaughtWarning] = []
    try:
        with _user_output(noise_path), warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("default")
            try:
                value = function(*args)
            finally:
                caught = [CaughtWarning(r.category.__name__, str(r.message), str(r.filename), r.lineno or 0)
                          for r in records]
        return Outcome(value=value, warnings=caught)
    except KeyboardInterrupt:
        raise
    except UsageError as exc:
        return Outcome(error=first_line(str(exc)), details=_details(exc), messages=_messages(exc), warnings=caught)
    except SystemExit as exc:
        return Outcome(error=f"the model's code called sys.exit({exc.code!r}) before the analysis finished; "
                             "remove the exit from the code the check runs", details=_details(exc), warnings=caught)
    except BaseException as exc:  # noqa: BLE001 - anything else is a bug to report in one line
        return Outcome(error=f"{describe(exc)} (run with --debug for the traceback)", details=_details(exc),
                       messages=_messages(exc), warnings=caught)


def _details(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


def _messages(exc: BaseException) -> str:
    """Every message of the exception chain in full (torch's guards, C++ frames), causes first, no traceback."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return "\n".join(f"{type(e).__name__}: {e}" for e in reversed(chain))


@contextlib.contextmanager
def _user_output(noise_path: Path) -> Iterator[None]:
    """While user code runs: what the model file prints goes to stderr, what torch and libraries print goes to
    the noise file. Python writes are routed by who wrote them; C-level writes to fd 1 go to stderr, to fd 2
    (torch's C++ warnings) to the noise file."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        saved_out, saved_err = os.dup(1), os.dup(2)
    except OSError:  # no standard streams to redirect (a daemon): just run
        yield
        return
    visible = os.fdopen(os.dup(saved_err), "w", buffering=1, encoding="utf-8", errors="replace")
    python_streams = sys.stdout, sys.stderr
    with open(noise_path, "a", buffering=1, encoding="utf-8", errors="replace") as noise:
        os.dup2(saved_err, 1)
        os.dup2(noise.fileno(), 2)
        sys.stdout = sys.stderr = _Routed(visible, noise)
        try:
            yield
        finally:
            for stream in (visible, noise):
                with contextlib.suppress(Exception):
                    stream.flush()
            sys.stdout, sys.stderr = python_streams
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)
            visible.close()


_STDLIB = sysconfig.get_paths()["stdlib"]


def users_file(filename: str) -> bool:
    """A file of the user's (the model file, their project), not the standard library, an installed package
    (torch, transformers) or healthcheck itself."""
    from healthcheck.graph.taxonomy import is_own_frame

    parts = Path(filename).parts
    return not (filename.startswith("<") or "site-packages" in parts or "dist-packages" in parts
                or filename.startswith(_STDLIB) or is_own_frame(filename))


class _Routed(io.TextIOBase):
    """sys.stdout / sys.stderr while user code runs: a write from the user's code (found by walking up past
    the standard library: print, logging) goes to `visible`, any other (torch's logs and graph dumps) to
    `noise`."""

    def __init__(self, visible: TextIO, noise: TextIO):
        self.visible, self.noise = visible, noise

    def _target(self) -> TextIO:
        frame = sys._getframe(2)
        while frame is not None:
            filename = frame.f_code.co_filename
            if filename.startswith(_STDLIB) and "site-packages" not in filename or filename.startswith("<frozen"):
                frame = frame.f_back
                continue
            return self.visible if users_file(filename) else self.noise
        return self.visible

    def write(self, text: str) -> int:
        return self._target().write(text)

    def writelines(self, lines: Any) -> None:
        target = self._target()
        for line in lines:
            target.write(line)

    def flush(self) -> None:
        self.visible.flush()
        self.noise.flush()

    def fileno(self) -> int:
        return self.visible.fileno()

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    @property
    def buffer(self) -> Any:
        return self.visible.buffer


def _in_child(function: Callable[..., Any], args: tuple, timeout: float | None, label: str, result_path: Path,
              noise_path: Path) -> Outcome:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        pid = os.fork()
    except OSError:  # no memory or process slots for a child: run here instead
        return _in_process(function, args, timeout, label, noise_path)
    if pid == 0:  # the child: never returns, never runs the parent's atexit handlers
        code = 0
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
            torch = sys.modules.get("torch")
            if torch is not None and not _ENTRY_POINT:
                torch.set_num_threads(1)  # see _ENTRY_POINT
            _die_with_parent()
            outcome = _call(function, args, noise_path)
            try:
                payload = pickle.dumps(outcome)
            except Exception as exc:  # noqa: BLE001 - a report holding an unpicklable object
                payload = pickle.dumps(Outcome(error=f"could not pass the report back: {describe(exc)}",
                                               warnings=outcome.warnings))
            result_path.write_bytes(payload)
        except BaseException:  # noqa: BLE001
            code = 70
        finally:
            os._exit(code)
    status = _wait_terminable(pid, timeout)
    if status is None:
        return Outcome(error=f"{label}: timed out after {timeout:g} s (importing the file or running the model); "
                             "raise --timeout if the model is just slow")
    payload = result_path.read_bytes() if result_path.exists() else b""
    if not payload:
        return Outcome(error=f"{label}: {_died(status)} before the analysis finished")
    try:
        return pickle.loads(payload)
    except Exception as exc:  # noqa: BLE001 - the report refers to something only the child had
        return Outcome(error=f"{label}: could not read the report back from the analysis process: {describe(exc)}")


def _died(status: int) -> str:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        return f"the analysis process was killed by {name} (a crash in the model's code or in torch, or out of memory)"
    return (f"the model's code ended the process (exit code {os.WEXITSTATUS(status)}, e.g. os._exit) — "
            "nothing was checked; remove the exit from the code the check runs")


def _die_with_parent() -> None:
    """Linux: the child gets SIGKILL when the CLI process dies (killed by CI), so a hung model never lingers."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _wait_terminable(pid: int, timeout: float | None) -> int | None:
    """`_wait`, with SIGTERM (a cancelled CI job) ending the wait, and so the child, as an exit."""
    if threading.current_thread() is not threading.main_thread():
        return _wait(pid, timeout)

    def terminated(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        return _wait(pid, timeout)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _wait(pid: int, timeout: float | None) -> int | None:
    """The child's wait status, or None after killing it at the timeout. Ctrl-C kills it too."""
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.001
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            if deadline is not None and time.monotonic() >= deadline:
                _kill(pid)
                return None
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
    except BaseException:
        _kill(pid)
        raise


def _kill(pid: int) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.waitpid(pid, 0)


def _in_process(function: Callable[..., Any], args: tuple, timeout: float | None, label: str,
                noise_path: Path) -> Outcome:
    watchdog = None
    if timeout is not None:
        stderr_fd = os.dup(2)  # fd 2 itself points at the noise file while the model runs

        def expire() -> None:  # nothing can interrupt a hung forward in this process: end it
            os.write(stderr_fd, f"healthcheck: error: {label}: timed out after {timeout:g} s (importing the file "
                                "or running the model); raise --timeout if the model is just slow\n".encode())
            os._exit(UsageError.exit_code)

        watchdog = threading.Timer(timeout, expire)
        watchdog.daemon = True
        watchdog.start()
    try:
        return _call(function, args, noise_path)
    finally:
        if watchdog is not None:
            watchdog.cancel()
            os.close(stderr_fd)
