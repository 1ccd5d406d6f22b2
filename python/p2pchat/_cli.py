"""Pieces shared by the ``server`` and ``client`` command lines."""

import argparse
import logging
import signal
import sys
from typing import Any


class Leave(Exception):
    """Raised by the SIGTERM handler so the command leaves the way Ctrl-C does."""


def _raise_leave(signum: int, frame: Any) -> None:
    raise Leave()


def leave_on_sigterm() -> None:
    signal.signal(signal.SIGTERM, _raise_leave)


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
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def setup_logging(debug: bool) -> None:
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s" if debug else "%(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.WARNING)


def status(text: str) -> None:
    """A system line: on stderr, so stdout carries only chat lines."""
    print(f"* {text}", file=sys.stderr, flush=True)
