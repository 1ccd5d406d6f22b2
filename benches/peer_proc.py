"""One chat peer for the benchmark, as its own process, driven by `run.py` over stdin/stdout (JSON lines).

`--impl p2pchat` is an application on the `p2pchat.Peer` API (`p2pchat-asyncio`: the same on its
asyncio API); `--impl baseline` is the asyncio reference peer of the interop tests
(tests/reference/original_client.py): its own functions run the tracker
exchange, the listener and every connection; this file only replaces its `print` (so nothing is
written to a terminal) and hooks its `capture` to see each received chunk as it arrives. `--impl floor`
and `--impl floor-rust` are the latency scenario's floors: the baseline's bytes over plain sockets, no
protocol, no event loop, read by Python and by Rust.

Every benchmark message is the text `SENDER:SEQ:T.` where T is `time.monotonic_ns()` at the send call;
CLOCK_MONOTONIC is one clock for every process on the machine, so the receiver's latency is
`monotonic_ns() - T` at the moment the application gets the message. The final `.` lets the baseline,
whose wire has no message boundaries, tell a whole message from a cut one.

It says `started` once up and joins when told `join` (answering `ready`). Then commands (one JSON
object per line): `links` (how many peers this one is connected to), `send` (`count` messages at
`rate` per second; the answer says how long that took, to tell whether the peer kept up), `report`
(what was received since the last report), `cpu` (the process's CPU seconds so far), `quit`. Each
gets one JSON line back.
"""

import argparse
import importlib.util
import json
import os
import re
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MESSAGE = re.compile(rb"<n\d+> :: (\d+):(\d+):(\d+)\.")


class Inbox:
    """What this peer received: per sender, the count and the latencies (ns)."""

    def __init__(self, keep_latencies: bool) -> None:
        self.lock = threading.Lock()
        self.counts = defaultdict(int)
        self.latencies = []
        self.keep_latencies = keep_latencies
        self.partial = {}  # link -> the start of a message cut by a read (`record_chunk`)

    def record(self, sender: int, sent_ns: int, now_ns: int) -> None:
        with self.lock:
            self.counts[sender] += 1
            if self.keep_latencies:
                self.latencies.append(now_ns - sent_ns)

    def record_message(self, message) -> None:
        """A `p2pchat.Message` the application got: live ones count; history (what the room said
        before this peer came) does not."""
        if message.history:
            return
        now = time.monotonic_ns()
        sender, _, sent = message.text.rstrip(".").split(":")
        self.record(int(sender), int(sent), now)

    def record_chunk(self, link, data: bytes) -> None:
        """A chunk read from `link` on a wire with no message boundaries (the original's): each whole
        message in it counts, a cut one waits for the rest."""
        now = time.monotonic_ns()
        pending = self.partial.pop(link, b"") + data
        end = 0
        for found in MESSAGE.finditer(pending):
            self.record(int(found.group(1)), int(found.group(3)), now)
            end = found.end()
        if end < len(pending):
            self.partial[link] = pending[end:]

    def take(self) -> dict:
        with self.lock:
            out = {"counts": dict(self.counts), "latencies_ns": self.latencies}
            self.counts, self.latencies = defaultdict(int), []
        return out


class Texts:
    """This peer's benchmark messages, numbered in the order sent."""

    def __init__(self, index: int) -> None:
        self.index, self.seq = index, 0

    def next(self) -> str:
        seq, self.seq = self.seq, self.seq + 1
        return f"{self.index}:{seq}:{time.monotonic_ns()}."


def reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def paced(count: int, rate: float):
    """Yield 0..count-1, each no earlier than its turn at `rate` per second."""
    start = time.monotonic()
    for seq in range(count):
        due = start + seq / rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        yield seq


async def paced_async(count: int, rate: float):
    """`paced` for an asyncio program."""
    import asyncio

    start = time.monotonic()
    for seq in range(count):
        delay = start + seq / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        yield seq


async def commands_async():
    """The commands on stdin, for an asyncio program (stdin is read on the loop's executor)."""
    import asyncio

    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        yield json.loads(line)


def reply_common(cmd: dict, inbox, links) -> bool:
    """Answer `links`, `report` (what `inbox.take()` gives: an `Inbox`, or a floor's links) and `cpu`
    alike for every implementation; False for `quit`. (`send` differs, and is the caller's.)"""
    if cmd["cmd"] == "links":
        reply({"links": links()})
    elif cmd["cmd"] == "report":
        reply(inbox.take())
    elif cmd["cmd"] == "cpu":
        reply({"cpu_s": time.process_time()})  # every thread's, the dead ones' too
    return cmd["cmd"] != "quit"


def new_peer(args):
    """The p2pchat peer of this process, not joined yet. Each keeps its log on disk, as users run it,
    in its room's directory (run.py)."""
    import p2pchat

    data_dir = os.path.join(args.data_dir, f"n{args.index}")
    return p2pchat.Peer(f"n{args.index}", "127.0.0.1", args.tracker_port, max_message_rate=args.max_rate, data_dir=data_dir)


def run_p2pchat(args, inbox: Inbox) -> None:
    import p2pchat

    peer = new_peer(args).join()

    def receive() -> None:
        try:
            for message in peer:
                inbox.record_message(message)
        except p2pchat.PeerClosed:
            pass

    threading.Thread(target=receive, daemon=True).start()
    reply({"ready": True, "pid": os.getpid()})
    texts = Texts(args.index)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "send":
            started = time.monotonic()
            for _ in paced(cmd["count"], cmd["rate"]):
                # As a program that sends many lines does (docs/python-api.md): it needs no count
                # of peers reached, so it does not wait for one per line.
                peer.post(texts.next())
            reply({"sent": cmd["count"], "seconds": time.monotonic() - started})
        elif not reply_common(cmd, inbox, lambda: len(peer.peers())):
            break
    peer.close()
    reply({"bye": True})


def run_p2pchat_asyncio(args, inbox: Inbox) -> None:
    """The same application on p2pchat's asyncio API (the scale scenario's memory row for programs
    that run p2pchat under asyncio, which then load asyncio as the baseline does)."""
    import asyncio

    async def main() -> None:
        async with new_peer(args) as peer:

            async def receive() -> None:
                async for message in peer:
                    inbox.record_message(message)

            receiving = asyncio.ensure_future(receive())
            reply({"ready": True, "pid": os.getpid()})
            texts = Texts(args.index)
            async for cmd in commands_async():
                if cmd["cmd"] == "send":
                    started = time.monotonic()
                    async for _ in paced_async(cmd["count"], cmd["rate"]):
                        peer.post(texts.next())
                    reply({"sent": cmd["count"], "seconds": time.monotonic() - started})
                elif not reply_common(cmd, inbox, lambda: len(peer.peers())):
                    break
            receiving.cancel()
        reply({"bye": True})

    asyncio.run(main())


def load_reference_client():
    spec = importlib.util.spec_from_file_location("original_client", ROOT / "tests" / "reference" / "original_client.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def ask_original_tracker(original, args):
    """The reference's tracker exchange: the port this peer is to listen on, and every listed peer's
    (host, port)."""
    local_port, answer = await original.ask_tracker("127.0.0.1", args.tracker_port, 0, True)
    return local_port, [(host, int(port)) for host, port in (part.split(":") for part in answer.split("-") if part)]


def run_baseline(args, inbox: Inbox) -> None:
    import asyncio  # only the baseline's process loads it: a p2pchat application on the blocking API does not

    original = load_reference_client()
    original.capture = lambda _path, peer, data: inbox.record_chunk(peer, data)  # every chunk it reads
    original.print = lambda *a, **k: None  # the reference prints each chunk; a benchmark has no terminal

    async def main() -> None:
        local_port, addresses = await ask_original_tracker(original, args)
        await asyncio.start_server(lambda r, w: original.serve_connection(r, w, "bench"), "0.0.0.0", local_port)
        for host, port in addresses:
            try:
                reader, writer = await asyncio.open_connection(host, port)
            except OSError:
                continue
            asyncio.ensure_future(original.serve_connection(reader, writer, "bench"))
        reply({"ready": True, "pid": os.getpid()})
        name, texts = f"n{args.index}", Texts(args.index)
        async for cmd in commands_async():
            if cmd["cmd"] == "send":
                start = time.monotonic()
                async for _ in paced_async(cmd["count"], cmd["rate"]):
                    line_text = texts.next()
                    # Exactly what the reference client does for each typed line.
                    for writer in list(original.CONNECTIONS):
                        writer.write(f"<{name}> :: {line_text}".encode())
                reply({"sent": cmd["count"], "seconds": time.monotonic() - start})
            elif not reply_common(cmd, inbox, lambda: len(original.CONNECTIONS)):
                reply({"bye": True})
                return

    asyncio.run(main())


class SelectLinks:
    """The Python floor's links: one thread blocked in `select` reads them all into `inbox`; `send`
    writes a message to each with `sendall`."""

    def __init__(self, inbox: Inbox) -> None:
        import selectors

        self.inbox, self.links, self.selector = inbox, [], selectors.DefaultSelector()
        threading.Thread(target=self._receive, daemon=True).start()

    def add(self, link) -> None:
        import selectors
        import socket

        link.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as asyncio does for every TCP link
        self.links.append(link)
        self.selector.register(link, selectors.EVENT_READ)

    def send(self, data: bytes) -> None:
        for link in list(self.links):
            link.sendall(data)

    def take(self) -> dict:
        return self.inbox.take()

    def __len__(self) -> int:
        return len(self.links)

    def _receive(self) -> None:
        while True:
            for key, _ in self.selector.select():
                try:
                    data = key.fileobj.recv(65536)
                except OSError:  # reset by a peer that was stopped: the link is gone, as on a clean close
                    data = b""
                if data:
                    self.inbox.record_chunk(key.fileobj, data)
                else:
                    self.selector.unregister(key.fileobj)
                    self.links.remove(key.fileobj)
                    key.fileobj.close()


def run_floor(args, inbox: Inbox) -> None:
    """The latency floors: the baseline's bytes over plain sockets, with no protocol and no event loop,
    meshed as the baseline is (the reference's tracker exchange). `floor`: a Python application, whose
    links one thread blocked in `select` reads (`SelectLinks`); `floor-rust`: the sockets' own, whose
    links a Rust thread reads, timing each message as it reads it (`p2pchat._core._BenchRawLinks`).
    The main thread sends, writing each message to every link."""
    import asyncio
    import socket

    original = load_reference_client()
    local_port, addresses = asyncio.run(ask_original_tracker(original, args))
    listener = socket.create_server(("0.0.0.0", local_port))
    if args.impl == "floor-rust":
        import p2pchat

        links = p2pchat._core._BenchRawLinks()
    else:
        links = SelectLinks(inbox)
    for address in addresses:
        links.add(socket.create_connection(address))

    def accept() -> None:
        while True:
            links.add(listener.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    reply({"ready": True, "pid": os.getpid()})
    name, texts = f"n{args.index}", Texts(args.index)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "send":
            started = time.monotonic()
            for _ in paced(cmd["count"], cmd["rate"]):
                links.send(f"<{name}> :: {texts.next()}".encode())
            reply({"sent": cmd["count"], "seconds": time.monotonic() - started})
        elif not reply_common(cmd, links, lambda: len(links)):
            break
    reply({"bye": True})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--impl", choices=("p2pchat", "p2pchat-asyncio", "baseline", "floor", "floor-rust"), required=True)
    parser.add_argument("--tracker-port", type=int, required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--max-rate", type=int, default=100_000)
    parser.add_argument("--data-dir", help="where p2pchat peers keep their logs (one directory per peer inside)")
    parser.add_argument("--latencies", action="store_true", help="keep every latency for the report")
    options = parser.parse_args()
    inbox = Inbox(options.latencies)
    # Start up (the interpreter, the imports) before joining, so a room's processes can all start at
    # once while they join one at a time.
    if options.impl.startswith("p2pchat"):
        import p2pchat  # noqa: F401
    reply({"started": True})
    if json.loads(sys.stdin.readline() or "{}").get("cmd") == "join":
        {"p2pchat": run_p2pchat, "p2pchat-asyncio": run_p2pchat_asyncio, "baseline": run_baseline,
         "floor": run_floor, "floor-rust": run_floor}[options.impl](options, inbox)
