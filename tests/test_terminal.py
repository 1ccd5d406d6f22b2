"""The interactive client in a real pseudo-terminal, rendered by a terminal emulator (pyte)."""

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pyte
import pytest

from harness import ROOT, WAIT

COLS, ROWS = 100, 24


class Terminal:
    """A process on a pty whose output is rendered on an emulated screen."""

    def __init__(self, argv):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
        env = dict(os.environ, TERM="xterm", NO_COLOR="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=env,
                                     start_new_session=True)
        os.close(slave)
        self.master = master
        self.screen = pyte.Screen(COLS, ROWS)
        self.stream = pyte.ByteStream(self.screen)

    def _read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return
        try:
            data = os.read(self.master, 65536)
        except OSError:  # the process ended and the pty closed
            data = b""
        if not data:
            raise EOFError
        self.stream.feed(data)
        # Answer cursor-position requests as a real terminal does (prompt_toolkit asks).
        for _ in range(data.count(b"\x1b[6n")):
            os.write(self.master, f"\x1b[{self.screen.cursor.y + 1};{self.screen.cursor.x + 1}R".encode())

    def lines(self):
        return [line.rstrip() for line in self.screen.display]

    def wait_for(self, pattern: str, timeout: float = WAIT) -> None:
        regex = re.compile(pattern, re.M)
        self.wait_until(lambda screen: bool(regex.search(screen)), pattern, timeout)

    def wait_until(self, holds, what: str, timeout: float = WAIT) -> None:
        """Read output until `holds(screen text)` is true (the screen is redrawn in several writes)."""
        deadline = time.monotonic() + timeout
        while not holds("\n".join(self.lines())):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"screen never showed {what}:\n" + "\n".join(self.lines()))
            try:
                self._read(min(remaining, 0.2))
            except EOFError:
                raise AssertionError(f"process ended before the screen showed {what}:\n" + "\n".join(self.lines())) from None

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def wait_exit(self) -> int:
        deadline = time.monotonic() + WAIT
        while self.proc.poll() is None and time.monotonic() < deadline:
            try:
                self._read(0.1)
            except EOFError:
                break
        return self.proc.wait(timeout=5)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        os.close(self.master)


@pytest.fixture
def terminal_client(room):
    tracker = room.p2pchat_tracker()
    term = Terminal([sys.executable, "client.py", "--port", str(tracker.port), "--name", "ana"])
    try:
        term.wait_for(r"joined as 'ana'")
        yield tracker, term
    finally:
        term.close()


def test_typing_is_not_garbled_by_incoming_messages(room, terminal_client):
    tracker, term = terminal_client
    bob = room.p2pchat_peer("bob", tracker.port)
    term.wait_for(r"^\* bob \(127\.0\.0\.1:\d+\) joined \(p2pchat\)$")
    term.wait_for(r"^>$")
    term.type("hello wor")
    term.wait_for(r"^> hello wor$")
    bob.say("incoming while you type")

    def message_above_intact_prompt(screen: str) -> bool:
        lines = [line for line in screen.splitlines() if line]
        return "<bob> :: incoming while you type" in lines[:-1] and lines[-1] == "> hello wor"

    term.wait_until(message_above_intact_prompt, "the message above the intact half-typed line")
    term.type("ld\r")
    bob.saw_line(r"^<ana> :: hello world$")
    term.wait_for(r"^<Eu> :: hello world$")


@pytest.mark.parametrize("key", ["\x04", "\x03"], ids=["ctrl-d", "ctrl-c"])
def test_ctrl_d_and_ctrl_c_leave_cleanly(terminal_client, key):
    _, term = terminal_client
    term.wait_for(r"^>$")
    term.type(key)
    assert term.wait_exit() == 0
    screen = "\n".join(term.lines())
    assert "left the room" in screen and "Traceback" not in screen


def test_quit_command_leaves(terminal_client):
    _, term = terminal_client
    term.wait_for(r"^>$")
    term.type("/quit\r")
    assert term.wait_exit() == 0
