"""Real processes for the tests: start scripts, feed stdin, wait (bounded) for lines they print."""

import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from re import Pattern
from typing import Optional, Union

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "tests" / "reference"
REFERENCE_PROMPT = "Escreva um nome: "  # printed by the original client, without a newline
WAIT = 15.0  # seconds any single expectation may take; generous for a loaded 2-core CI machine

Regex = Union[str, Pattern[str]]

MAGIC = b"\xffp2pchat"  # how every p2pchat connection starts

# A chat line as p2pchat's client prints it: `<name> :: text`, or, for a line it got as history (its
# own log, or a catch-up from the room), `[history DATE TIME] <name> :: text`.
CHAT_LINE = re.compile(r"^(\[history [^\]]*\] )?<([^>]*)> :: (.*)$")
# The original client prints each chunk it reads as it comes: lines carry no terminator on the wire, so
# two that arrive together are printed as one (`<a> :: x<b> :: y`), and its first follows its prompt.
ORIGINAL_CHUNK_LINE = re.compile(r"<([^>]*)> :: (.*?)(?=<[^>]*> :: |$)")


def frame(obj) -> bytes:
    """One p2pchat frame: a 4-byte big-endian length, then JSON."""
    body = json.dumps(obj).encode()
    return struct.pack(">I", len(body)) + body


def read_frame(sock: socket.socket) -> dict:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            assert chunk, f"closed after {len(data)} of {n} bytes"
            data += chunk
        return data

    (length,) = struct.unpack(">I", exactly(4))
    return json.loads(exactly(length))


class Stream:
    """The lines a process printed on one stream, with a cursor for `expect`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lines: list[str] = []
        self.closed = False
        self.cond = threading.Condition()
        self.cursor = 0
        # The same process's other stream, shown beside this one when an expectation fails.
        self.other: Optional[Stream] = None

    def pump(self, pipe) -> None:
        for raw in iter(pipe.readline, b""):
            with self.cond:
                self.lines.append(raw.decode("utf-8", errors="replace").rstrip("\r\n"))
                self.cond.notify_all()
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def expect(self, pattern: Regex, timeout: float = WAIT) -> "re.Match[str]":
        """Wait for the next line (after the cursor) matching `pattern`; moves the cursor past it."""
        return self._wait_for(pattern, timeout, ordered=True)

    def saw(self, pattern: Regex, timeout: float = WAIT) -> "re.Match[str]":
        """Wait until any line printed so far (or later) matches `pattern`; order-independent."""
        return self._wait_for(pattern, timeout, ordered=False)

    def _wait_for(self, pattern: Regex, timeout: float, ordered: bool) -> "re.Match[str]":
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            checked = self.cursor if ordered else 0
            while True:
                for i in range(checked, len(self.lines)):
                    found = regex.search(self.lines[i])
                    if found:
                        if ordered:
                            self.cursor = i + 1
                        return found
                checked = len(self.lines)
                remaining = deadline - time.monotonic()
                if self.closed or remaining <= 0:
                    why = "stream closed" if self.closed else f"no match within {timeout}s"
                    lines = list(self.lines)
                    break
                self.cond.wait(remaining)
        # Raised outside this stream's lock: the other stream's is taken to show its lines.
        raise AssertionError(f"{self.name}: {why} for {regex.pattern!r}; lines:\n" + "\n".join(lines) + self._other_lines())

    def _other_lines(self) -> str:
        if self.other is None:
            return ""
        return f"\n{self.other.name}:\n" + "\n".join(self.other.snapshot())

    def count(self, pattern: Regex) -> int:
        regex = re.compile(pattern)
        with self.cond:
            return sum(1 for line in self.lines if regex.search(line))

    def wait_closed(self, timeout: float = WAIT) -> list[str]:
        """Wait (bounded) until the process closed this stream; returns every line it printed."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.closed, timeout):
                raise AssertionError(f"{self.name}: still open after {timeout}s; lines:\n" + "\n".join(self.lines))
            return list(self.lines)

    def snapshot(self) -> list[str]:
        with self.cond:
            return list(self.lines)


class Proc:
    """A child process with captured stdout/stderr and a writable stdin."""

    def __init__(self, argv: Sequence[str], name: str, env: Optional[dict] = None) -> None:
        self.name = name
        # PYTHONFAULTHANDLER: a process that outstays a bounded wait is sent SIGABRT, on which Python
        # prints every thread's stack (see `wait`).
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", NO_COLOR="1", PYTHONFAULTHANDLER="1")
        # The client's settings come from its flags, and from what a test passes: never from the
        # environment or the config file of whoever runs the tests.
        for variable in ("P2PCHAT_SERVER", "P2PCHAT_PORT", "P2PCHAT_NAME", "P2PCHAT_ROOM", "P2PCHAT_CONFIG"):
            full_env.pop(variable, None)
        if "P2PCHAT_DATA_DIR" in os.environ:
            # Every process keeps its own message log, as on separate machines; one started again
            # under the same name finds its log again. Its config file is there too (none unless the
            # test writes one).
            full_env["P2PCHAT_DATA_DIR"] = os.path.join(os.environ["P2PCHAT_DATA_DIR"], name)
            full_env["P2PCHAT_CONFIG"] = os.path.join(full_env["P2PCHAT_DATA_DIR"], "client.ini")
        full_env.update(env or {})
        self.popen = subprocess.Popen(
            list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env, cwd=ROOT
        )
        self.out = Stream(f"{name} stdout")
        self.err = Stream(f"{name} stderr")
        self.out.other, self.err.other = self.err, self.out
        for stream, pipe in ((self.out, self.popen.stdout), (self.err, self.popen.stderr)):
            threading.Thread(target=stream.pump, args=(pipe,), daemon=True).start()

    def write(self, data: Union[str, bytes]) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(data.encode("utf-8") if isinstance(data, str) else data)
        self.popen.stdin.flush()

    def line(self, text: str) -> None:
        self.write(text + "\n")

    def close_stdin(self) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.close()

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signum)

    def wait(self, timeout: float = WAIT) -> int:
        """Its exit code, once it exits within `timeout`. If it does not, it is aborted so that the
        failure shows where each of its Python threads was stuck, with all it printed."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.send_signal(signal.SIGABRT)
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
            try:
                self.err.wait_closed(timeout=5)
            except AssertionError:
                pass  # a child of its own holds the pipe: show what came so far
            raise AssertionError(
                f"{self.name} did not exit within {timeout}s; stdout:\n" + "\n".join(self.out.snapshot())
                + "\nstderr (with its threads' stacks when it was aborted):\n" + "\n".join(self.err.snapshot())
            ) from None

    def stop(self) -> Optional[int]:
        """SIGTERM, then SIGKILL if it does not go within the bound."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)
        if self.popen.stdin and not self.popen.stdin.closed:
            try:
                self.popen.stdin.close()
            except BrokenPipeError:
                pass
        return self.popen.returncode


def assert_clean_stderr(proc: "Proc") -> None:
    """No traceback and no Rust panic: what a user must never see."""
    lines = proc.err.snapshot()
    bad = [line for line in lines if "Traceback" in line or "panicked" in line or "Exception ignored" in line]
    assert not bad, f"{proc.name} printed an error a user should never see:\n" + "\n".join(lines)


def original_exchange(port: int, host: str = "127.0.0.1", payload: bytes = b"", hold: bool = True) -> bytes:
    """Talk to a tracker as an original client (optionally sending `payload` first, which no original
    does); returns its answer (empty if it reset us, or if `hold` is False and we left at once)."""
    import socket

    with socket.create_connection((host, port), timeout=WAIT) as s:
        if payload:
            s.sendall(payload)
        if not hold:
            return b""
        answer = b""
        try:
            while chunk := s.recv(4096):
                answer += chunk
        except ConnectionResetError:
            pass
        return answer


def home(name: str) -> Path:
    """The data directory of the simulated user `name` in this test (under the test's own, which
    tests/conftest.py sets): two users never share a message log or an identity, so no delivery check
    can pass on another user's history. The programs a test starts get the same, by name."""
    return Path(os.environ["P2PCHAT_DATA_DIR"]) / name


@contextlib.contextmanager
def reserved_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A port held for the test while the block runs: bound but not listening, so connecting to it is
    refused, and nothing else (another test's process, an outgoing connection's ephemeral port) can
    take it. A tracker or a peer told to use it can still bind it and listen, since they set the
    same options (SO_REUSEADDR, and SO_REUSEPORT for a peer). A port picked, freed and passed on
    instead is free for anyone until the program under test binds it."""
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind((host, 0))
        yield holder.getsockname()[1]


def wait_until(predicate, what: str, timeout: float = WAIT) -> None:
    """Poll a cheap local query (bounded) until it holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def python(*args: str) -> list[str]:
    return [sys.executable, "-u", *args]


class Room:
    """Processes started by one test, all stopped at the end."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []
        self.peers: list[Peer] = []

    def start(self, argv: Sequence[str], name: str, env: Optional[dict] = None) -> Proc:
        proc = Proc(argv, name, env)
        self.procs.append(proc)
        return proc

    # -- trackers ---------------------------------------------------------------------------------
    def p2pchat_tracker(self, *extra: str) -> "Tracker":
        proc = self.start(python("server.py", "--host", "127.0.0.1", "--port", "0", *extra), "tracker")
        port = int(proc.err.expect(r"listening on [\d.]+:(\d+)").group(1))
        return Tracker(proc, port)

    def reference_tracker(self) -> "Tracker":
        proc = self.start(python(str(REFERENCE / "original_server.py"), "--host", "127.0.0.1", "--port", "0"), "ref-tracker")
        port = int(proc.out.expect(r"listening on (\d+)").group(1))
        return Tracker(proc, port)

    # -- peers --------------------------------------------------------------------------------------
    def p2pchat_peer(self, name: str, tracker_port: int, *extra: str, env: Optional[dict] = None) -> "Peer":
        proc = self.start(python("client.py", "--port", str(tracker_port), "--name", name, *extra), name, env)
        found = proc.err.expect(r"joined as .*listening on port (\d+); connected to (\d+) of (\d+)")
        peer = Peer(proc, name, "p2pchat", int(found.group(1)), int(found.group(2)))
        self.peers.append(peer)
        return peer

    def reference_peer(self, name: str, tracker_port: int, *extra: str) -> "Peer":
        proc = self.start(python(str(REFERENCE / "original_client.py"), "--port", str(tracker_port), "-d", *extra), name)
        proc.line(name)
        port = int(proc.err.expect(r"listening on (\d+)").group(1))
        peer = Peer(proc, name, "reference", port, 0)
        self.peers.append(peer)
        return peer

    def stop_all(self) -> None:
        """Stop every process; then every line a peer was checked to get (`Peer.got`) must have been
        shown exactly once over its whole run, duplicates arriving after the check included."""
        for proc in reversed(self.procs):
            proc.stop()
        for peer in self.peers:
            try:
                peer.proc.out.wait_closed(timeout=5)
            except AssertionError:
                pass  # a child of its own holds the pipe: count what came
        problems = [problem for peer in self.peers for problem in peer.shown_once_problems()]
        assert not problems, "lines not shown exactly once:\n" + "\n".join(problems)


class Tracker:
    def __init__(self, proc: Proc, port: int) -> None:
        self.proc, self.port = proc, port


class Peer:
    """A chat process of either kind, with kind-specific readiness patterns."""

    OPENED = {"p2pchat": r"^\* .+ joined \((p2pchat|original)\)$", "reference": r"connection (opened to|accepted from) "}
    CLOSED = {"p2pchat": r"^\* .+ left (the room|\()", "reference": r"connection closed "}

    def __init__(self, proc: Proc, name: str, kind: str, listen_port: int, connected_at_join: int) -> None:
        self.proc, self.name, self.kind, self.listen_port = proc, name, kind, listen_port
        self.connected_at_join = connected_at_join
        # What `got` waited for, as (sender, text, from history): each must be shown exactly once.
        self.expected_once: set[tuple[str, str, bool]] = set()

    def live_connections(self) -> int:
        return self.proc.err.count(self.OPENED[self.kind]) - self.proc.err.count(self.CLOSED[self.kind])

    def wait_connections(self, count: int, timeout: float = WAIT) -> None:
        """Wait until this peer has `count` open connections (opened minus closed, as it reported)."""
        deadline = time.monotonic() + timeout
        while self.live_connections() < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: fewer than {count} connections:\n" + "\n".join(self.proc.err.snapshot()))
            with self.proc.err.cond:
                self.proc.err.cond.wait(0.2)

    def say(self, text: str) -> None:
        self.proc.line(text)

    def chat_lines(self) -> list[tuple[str, str, bool]]:
        """Every chat line shown so far, as (sender, text, from history)."""
        shown = []
        for line in self.proc.out.snapshot():
            if self.kind == "reference":
                chunk = line.removeprefix(REFERENCE_PROMPT)
                shown += [(m.group(1), m.group(2), False) for m in ORIGINAL_CHUNK_LINE.finditer(chunk)]
            elif found := CHAT_LINE.match(line):
                shown.append((found.group(2), found.group(3), found.group(1) is not None))
        return shown

    def got(self, sender: str, text: str, history: bool = False, timeout: float = WAIT) -> None:
        """Wait until `<sender> :: text` is shown, live (default: not as a `[history …]` line) or as
        history. From then on it must be shown exactly once, that way and never the other: checked
        when the room stops (`Room.stop_all`), so that a duplicate that comes later fails the test too."""
        self.got_all([(sender, text)], history=history, timeout=timeout)

    def got_all(self, lines: Sequence[tuple[str, str]], history: bool = False, timeout: float = WAIT) -> None:
        """`got` for each (sender, text) in `lines`, within one bound."""
        wanted = [(sender, text, history) for sender, text in lines]
        self.expected_once.update(wanted)
        deadline = time.monotonic() + timeout
        with self.proc.out.cond:
            while True:
                shown = set(self.chat_lines())
                missing = [line for line in wanted if line not in shown]
                if not missing:
                    return
                remaining = deadline - time.monotonic()
                if self.proc.out.closed or remaining <= 0:
                    break
                self.proc.out.cond.wait(remaining)
        how = "as history" if history else "live"
        examples = ", ".join(f"<{sender}> :: {text}" for sender, text, _ in missing[:3])
        raise AssertionError(
            f"{self.name} was not shown {len(missing)} line(s) {how} within {timeout}s, e.g. {examples}; "
            "its stdout:\n" + "\n".join(self.proc.out.snapshot())
        )

    def shown_once_problems(self) -> list[str]:
        """For each line `got` waited for: what is wrong if it was not shown exactly once, and only
        the way it was expected (live or as history)."""
        counts: dict[tuple[str, str, bool], int] = {}
        for line in self.chat_lines():
            counts[line] = counts.get(line, 0) + 1
        problems = []
        for sender, text, history in sorted(self.expected_once):
            right, wrong = counts.get((sender, text, history), 0), counts.get((sender, text, not history), 0)
            if right != 1 or wrong:
                how = ("as history", "live") if history else ("live", "as history")
                problems.append(f"{self.name}: <{sender}> :: {text} shown {right}x {how[0]}, {wrong}x {how[1]}")
        return problems

    def saw_line(self, pattern: Regex, timeout: float = WAIT) -> "re.Match[str]":
        """Wait until this peer printed a chat line matching `pattern` (in any order).

        The original client prints its name prompt without a newline, so its first chat line arrives
        glued to `Escreva um nome: `; an anchored pattern allows that prefix for reference peers."""
        if self.kind == "reference":
            text = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
            if text.startswith("^"):
                pattern = "^(?:" + re.escape(REFERENCE_PROMPT) + ")?" + text[1:]
        return self.proc.out.saw(pattern, timeout)
