"""Pieces shared by the ``server`` and ``client`` command lines."""

import argparse
import logging
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from . import _logbridge


# Whole lines only: the receiver thread, the input loop and log records all write to the terminal.
_output = threading.Lock()


class Leave(Exception):
    """Raised by the SIGTERM handler so the command leaves the way Ctrl-C does."""


class _SignalState:
    deferring = False
    pending: Optional[int] = None


def _exception_for(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Leave()


def _on_signal(signum: int, frame: Any) -> None:
    if _SignalState.deferring:
        _SignalState.pending = signum
        return
    raise _exception_for(signum)


def handle_signals() -> None:
    """Ctrl-C raises KeyboardInterrupt and SIGTERM raises Leave, except inside `signals_deferred`."""
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """A section a signal must not cut in half (an exception raised inside `Thread.start()` breaks the
    threading module); a signal that arrives meanwhile takes effect when the section ends."""
    _SignalState.deferring = True
    try:
        yield
    finally:
        _SignalState.deferring = False
        if _SignalState.pending is not None:
            signum, _SignalState.pending = _SignalState.pending, None
            raise _exception_for(signum)


def port(text: str) -> int:
    """argparse type for a TCP port: 0..65535 (0 = let the system choose)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (0 to 65535)")
    return value


class _CurrentStderr(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time, so prompt_toolkit's patched stderr is used."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            with _output:
                sys.stderr.write(line)
                sys.stderr.flush()
        except Exception:
            self.handleError(record)


def setup_logging(debug: bool) -> None:
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s" if debug else "%(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
    _logbridge.sync_level()


def say(line: str) -> None:
    """A chat line on stdout, written whole: the receiver thread and the input loop both print."""
    with _output:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def status(text: str) -> None:
    """A system line: on stderr (written whole), so stdout carries only chat lines."""
    with _output:
        sys.stderr.write(f"* {text}\n")
        sys.stderr.flush()
