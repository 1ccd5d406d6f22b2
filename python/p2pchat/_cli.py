"""Pieces shared by the ``server`` and ``client`` command lines."""

import argparse
import logging
import os
import signal
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from io import StringIO
from typing import Any, Optional, TextIO

# Whole lines only: the receiver thread, the input loop and log records all write to the terminal.
_output = threading.Lock()


def invoked_as(prog: Optional[str], default: str) -> str:
    """The program's name as the user invoked it, for `usage:` and error lines: `prog` when a launcher
    passes it (`p2pchat client`), else the script's file name (`client.py`, `p2pchat-client`), else
    `default` (under `python -c`, or a launcher's `__main__.py`)."""
    if prog:
        return prog
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name and name not in ("-c", "__main__.py") else default


class Leave(Exception):
    """Raised by the SIGTERM handler so the command leaves the way Ctrl-C does."""


class _SignalState:
    deferring = False
    pending: Optional[int] = None
    # Set once a signal has made the command leave: the way out is bounded, and a second Ctrl-C (a
    # common double tap) must not cut it, or the exit handlers after it, with a traceback.
    leaving = False


def _leave(signum: int) -> BaseException:
    _SignalState.leaving = True
    return KeyboardInterrupt() if signum == signal.SIGINT else Leave()


def _on_signal(signum: int, frame: Any) -> None:
    if _SignalState.leaving:
        return
    if _SignalState.deferring:
        _SignalState.pending = signum
        return
    raise _leave(signum)


def handle_signals() -> None:
    """Ctrl-C raises KeyboardInterrupt and SIGTERM raises Leave, except inside `signals_deferred`; once
    one did, later ones are ignored."""
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
            raise _leave(signum)


def _whole_number(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def port(text: str) -> int:
    """argparse type for a TCP port: 0..65535 (0 = let the system choose)."""
    value = _whole_number(text, "a port number")
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (0 to 65535)")
    return value


def count(text: str) -> int:
    """argparse type for a number of messages: 0 or more."""
    value = _whole_number(text, "a whole number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; use 0 for none")
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
    root.setLevel(logging.DEBUG if debug else logging.WARNING)  # reaches Rust too (_logbridge)


def say(line: str) -> None:
    """A line on stdout, written whole: the receiver thread and the input loop both print."""
    _write(sys.stdout, line)


def _write(stream: TextIO, line: str) -> None:
    with _output:
        stream.write(line + "\n")
        stream.flush()


class _Terminal:
    """How lines look: plain (pipes, scripts; the original's format) or for a person at a terminal."""

    on = False
    colour = False


def use_terminal(colour: bool) -> None:
    """From now on, lines carry the time, and (with `colour`) names in colours and dim system lines."""
    _Terminal.on, _Terminal.colour = True, colour


def colours_wanted() -> bool:
    """Colours unless NO_COLOR is set (https://no-color.org) or stdout is not a terminal."""
    return not os.environ.get("NO_COLOR") and sys.stdout.isatty()


# Distinct, readable on dark and light backgrounds; a name always gets the same one.
NAME_COLOURS = ("ansired", "ansigreen", "ansiyellow", "ansiblue", "ansimagenta", "ansicyan",
                "ansibrightred", "ansibrightgreen", "ansibrightblue", "ansibrightmagenta", "ansibrightcyan")
DIM = "ansibrightblack"


def name_colour(name: str) -> str:
    return NAME_COLOURS[zlib.crc32(name.encode("utf-8")) % len(NAME_COLOURS)]


def _rendered(fragments: list[tuple[str, str]]) -> str:
    """The fragments as one line, with prompt_toolkit's escape sequences when colours are on."""
    if not _Terminal.colour:
        return "".join(text for _, text in fragments)
    from prompt_toolkit.data_structures import Size
    from prompt_toolkit.formatted_text import FormattedText
    from prompt_toolkit.output.color_depth import ColorDepth
    from prompt_toolkit.output.vt100 import Vt100_Output
    from prompt_toolkit.renderer import print_formatted_text
    from prompt_toolkit.styles import Style

    buffer = StringIO()
    output = Vt100_Output(buffer, lambda: Size(rows=24, columns=80), term="xterm")
    print_formatted_text(output, FormattedText(fragments), Style([]), color_depth=ColorDepth.DEPTH_4_BIT)
    output.flush()
    return buffer.getvalue()


def chat(sender: Optional[str], text: str, *, history_at: Optional[float] = None, signed: bool = False) -> None:
    """A chat line on stdout: `<sender> :: text`, as the original prints it; earlier messages marked
    `[history DATE TIME]`; at a terminal, with the time, the sender's colour, and `✓` after the name of
    a message its author signed (private rooms: it came encrypted and its signature was checked)."""
    label = f"[history {time.strftime('%Y-%m-%d %H:%M', time.localtime(history_at))}] " if history_at is not None else ""
    if not _Terminal.on:
        say(label + (f"<{sender}> :: " if sender is not None else "") + text)
        return
    fragments = [(DIM, label or time.strftime("%H:%M ", time.localtime()))]
    if sender is not None:
        fragments += [(name_colour(sender), f"<{sender}>"), ("", " ✓ :: " if signed else " :: ")]
    say(_rendered(fragments + [("", text)]))


def status(text: str) -> None:
    """A system line: on stderr (written whole), so stdout carries only chat lines."""
    if _Terminal.on:
        _write(sys.stderr, _rendered([(DIM, time.strftime("%H:%M * ", time.localtime()) + text)]))
    else:
        _write(sys.stderr, f"* {text}")
