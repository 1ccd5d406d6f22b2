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
from typing import Optional

import pyte
import pytest
from harness import ROOT, WAIT, home
from p2pchat import new_invite_code

COLS, ROWS = 100, 24


class Terminal:
    """A process on a pty whose output is rendered on an emulated screen."""

    def __init__(self, argv, colour: bool = False, env: Optional[dict] = None):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
        env = dict(os.environ, TERM="xterm", PYTHONUNBUFFERED="1", **(env or {}))
        env.pop("NO_COLOR", None)
        if not colour:
            env["NO_COLOR"] = "1"
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


def start_client(tracker, colour: bool = False) -> Terminal:
    term = Terminal([sys.executable, "client.py", "--port", str(tracker.port), "--name", "ana"], colour=colour)
    term.wait_for(r"joined as 'ana'")
    return term


@pytest.fixture
def terminal_client(room):
    tracker = room.p2pchat_tracker()
    term = start_client(tracker)
    try:
        yield tracker, term
    finally:
        term.close()


TIME = r"\d\d:\d\d"  # every line at a terminal starts with the time


def test_typing_is_not_garbled_by_incoming_messages(room, terminal_client):
    tracker, term = terminal_client
    bob = room.p2pchat_peer("bob", tracker.port)
    term.wait_for(rf"^{TIME} \* bob \(127\.0\.0\.1:\d+\) joined \(p2pchat\)$")
    term.wait_for(r"^>$")
    term.type("hello wor")
    term.wait_for(r"^> hello wor$")
    bob.say("incoming while you type")

    def message_above_intact_prompt(screen: str) -> bool:
        lines = [line for line in screen.splitlines() if line]
        above = [re.sub(rf"^{TIME} ", "", line) for line in lines[:-2]]
        return "<bob> :: incoming while you type" in above and lines[-2] == "> hello wor"

    term.wait_until(message_above_intact_prompt, "the message above the intact half-typed line")
    term.type("ld\r")
    bob.saw_line(r"^<ana> :: hello world$")
    term.wait_for(rf"^{TIME} <Eu> :: hello world$")


def test_the_status_bar_and_the_commands(room, terminal_client):
    tracker, term = terminal_client
    term.wait_for(r"default room · ana on port \d+ · 0 other member\(s\) · tracker: registered")
    bob = room.p2pchat_peer("bob", tracker.port)
    term.wait_for(r"default room · ana on port \d+ · 1 other member\(s\) · tracker: registered")
    term.type("/help\r")
    for command in ("/who", "/nick NEW", "/ignore NAME", "/unignore NAME", "/help", "/quit"):
        term.wait_for(rf"^{TIME} \* {re.escape(command)} ")
    term.type("/who\r")
    term.wait_for(rf"^{TIME} \*   bob \(127\.0\.0\.1:\d+\) p2pchat$")
    term.type("/nick anabel\r")
    term.wait_for(rf"^{TIME} \* you are now known as anabel$")
    bob.proc.err.saw(r"is now known as anabel$")


def test_a_paste_of_several_lines_sends_several_messages(room, terminal_client):
    tracker, term = terminal_client
    bob = room.p2pchat_peer("bob", tracker.port)
    term.wait_for(rf"^{TIME} \* bob .* joined \(p2pchat\)$")
    term.type("\x1b[200~first pasted line\nsecond pasted line\x1b[201~")
    term.type("\r")
    bob.saw_line(r"^<ana> :: first pasted line$")
    bob.saw_line(r"^<ana> :: second pasted line$")


def test_names_have_stable_distinct_colours_unless_no_color(room):
    tracker = room.p2pchat_tracker()
    term = start_client(tracker, colour=True)
    try:
        bob = room.p2pchat_peer("bob", tracker.port)
        term.wait_for(r"bob .* joined \(p2pchat\)$")
        bob.say("in colour")
        term.wait_for(r"<bob> :: in colour$")
        term.type("mine\r")
        term.wait_for(r"<Eu> :: mine$")

        def colour_at(text: str) -> str:
            for y, line in enumerate(term.lines()):
                x = line.find(text)
                if x >= 0:
                    return term.screen.buffer[y][x + 1].fg
            raise AssertionError(text)

        assert colour_at("<bob>") not in ("default", colour_at("in colour"))
        assert colour_at("<Eu>") not in ("default", colour_at("<bob>")), "two names, two colours"
    finally:
        term.close()


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


def test_a_private_room_marks_each_signed_message_and_says_so_in_the_status_bar(room):
    tracker = room.p2pchat_tracker()
    secret = {"P2PCHAT_SECRET": "correct horse battery staple"}
    term = Terminal([sys.executable, "client.py", "--port", str(tracker.port), "--name", "ana", "--room", "plans"], env=secret)
    try:
        term.wait_for(r"joined as 'ana' in private room 'plans'")
        term.wait_for(r"private room 'plans' \(encrypted\) · ana on port \d+ · 0 other member\(s\)")
        bob = room.p2pchat_peer("bob", tracker.port, "--room", "plans", env=secret)
        bob.say("sealed and signed")
        term.wait_for(rf"^{TIME} <bob> ✓ :: sealed and signed$")
        term.type("in the clear? no\r")
        bob.saw_line(r"^<ana> :: in the clear\? no$")
    finally:
        term.close()


def test_enter_at_the_private_prompt_makes_a_new_room_whose_invite_code_lets_others_in(room):
    tracker = room.p2pchat_tracker()
    term = Terminal([sys.executable, "client.py", "--port", str(tracker.port), "--name", "ana", "--room", "plans",
                     "--private", "--data-dir", str(home("ana"))])
    try:
        term.wait_for(r"invite code or secret for room 'plans' \(Enter: a new room with a random key\):")
        term.type("\r")
        term.wait_for(r"joined as 'ana' in private room 'plans'")
        term.wait_for(r"^new private room 'plans'; to invite someone, give them this code")
        # The code wraps on the emulated screen: join the lines before reading it.
        code = re.search(r"(p2pc1-[0-9a-f]{64}-" + b"plans".hex() + ")", "".join(term.lines())).group(1)
        bob = room.p2pchat_peer("bob", tracker.port, env={"P2PCHAT_SECRET": code})
        bob.proc.err.saw(r"joined as 'bob' in private room 'plans'")
        bob.say("the code worked")
        term.wait_for(rf"^{TIME} <bob> ✓ :: the code worked$")
        # A second new room under the same name is another room: its key is new.
        other = new_invite_code("plans")
        assert other != code and other.endswith("-" + b"plans".hex())
    finally:
        term.close()
