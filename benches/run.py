"""The p2pchat benchmark: every scenario for p2pchat and for the asyncio baseline, in the same run.

    python benches/run.py            # the full benchmark (a few minutes on 2 cores)
    python benches/run.py --quick    # a small smoke run (what CI runs; figures printed, not asserted)

The baseline is the asyncio reference tracker and peer of the interop tests (tests/reference/), which
behave like the original scripts. Each figure is the median over repeated runs; every row shows the
p2pchat/baseline ratio. Raw results go to benches/results/latest.json (and a PNG chart when matplotlib is
installed). Scenarios:

1. latency: rooms of 5, 20, 50 peers, one process each, one message at a time; one-way latency from the
   send call to the receiving application (CLOCK_MONOTONIC, shared by every process), p50 and p99; and
   two floors: raw peers on plain sockets with no protocol, read by Python and by Rust.
2. throughput: a 20-peer room, every peer sending at an offered rate raised step by step; the highest
   rate at which every message reaches every peer, its deliveries per second and CPU seconds per 1,000
   deliveries; the raw TCP fan-out floor (Rust, no protocol) at the same steps; and what the application's
   thread spends per message received (its own Python, p2pchat's `recv`), against the CPU per delivery
   that 5x the baseline's rate leaves.
3. tracker: joins per second with 10, 1,000 and 10,000 registrations, each join reading the full list,
   from a load generator written in Rust; and the floor for each list: the same joins against a Rust
   server that only sends that many bytes.
4. scale: the largest room (one process per peer, in steps up to 200) where every message reaches every
   peer, and memory per peer process as PSS; and how many peers fit in one process through the API.
5. history (p2pchat only: the original keeps none): the time from a newcomer's join until it has received
   10,000 earlier messages as history, against the same 10,000 messages reaching a connected peer live
   in the same run; and the newcomer's log on disk per message.
6. idle: rooms of 10, 100 and 200 peers (one process each) where nobody types for 30 s: CPU seconds per
   peer per hour, of the peer processes, and of the whole machine; and how often a peer's threads are
   woken (a receive that polled would show here) (which counts the kernel's work too,
   such as TCP keep-alive probes, and whatever else runs).
"""

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

from p2pchat import HistorySynced, Message, P2PChatError, Peer, Tracker

ROOT = Path(__file__).resolve().parent.parent
PEER = Path(__file__).resolve().parent / "peer_proc.py"
REFERENCE = ROOT / "tests" / "reference"
IMPLS = ("p2pchat", "baseline")
FLOORS = {"floor": "raw Python sockets", "floor-rust": "raw Rust sockets"}  # the latency scenario's
LATENCY_ROOMS = IMPLS + tuple(FLOORS)


class BenchFailure(Exception):
    """A scenario could not be set up (not a measured failure of delivery)."""


def log(text: str) -> None:
    print(f"  .. {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes


class Child:
    """A child process speaking JSON lines on stdin/stdout."""

    def __init__(self, argv: list[str], name: str) -> None:
        self.name = name
        self.popen = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT, text=True,
            # Many peer processes share 2 cores here: one runtime worker each costs less CPU per
            # delivery (docs/benchmarks.md, "What was slow"). The baseline's asyncio ignores the variable.
            env=dict(os.environ, PYTHONUNBUFFERED="1", TOKIO_WORKER_THREADS="1"),
        )
        self.lines: list[str] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()
        with self.cond:
            self.lines.append("")  # end of output
            self.cond.notify_all()

    def next_line(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not self.lines:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BenchFailure(f"{self.name}: no answer within {timeout:.0f} s")
                self.cond.wait(remaining)
            line = self.lines.pop(0)
        if not line:
            raise BenchFailure(f"{self.name}: exited (code {self.popen.poll()})")
        return line

    def ask(self, cmd: dict, timeout: float = 60.0) -> dict:
        self.tell(cmd)
        return json.loads(self.next_line(timeout))

    def tell(self, cmd: dict) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(json.dumps(cmd) + "\n")
        self.popen.stdin.flush()

    def pss_kib(self) -> int:
        try:
            text = Path(f"/proc/{self.popen.pid}/smaps_rollup").read_text()
        except OSError:
            return 0
        found = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
        return int(found.group(1)) if found else 0


# The tracker scenario's floor: a process that only answers every connection with a list of ARGV[1]
# bytes (Rust, `_bench_raw_list_server`), on its own as a tracker is.
RAW_LIST_SERVER = ("import sys, p2pchat; "
                   "p2pchat._core._bench_raw_list_server(int(sys.argv[1]), lambda port: print(f'listening on {port}', flush=True))")


def start_tracker(impl: str) -> subprocess.Popen:
    """A tracker on a free loopback port; returns the process with `.port` set."""
    if impl == "p2pchat":
        return start_server("p2pchat tracker", [sys.executable, "server.py", "--host", "127.0.0.1", "--port", "0"],
                            r"listening on [\d.]+:(\d+)", "stderr")
    return start_server("baseline tracker", [sys.executable, str(REFERENCE / "original_server.py"), "--host", "127.0.0.1", "--port", "0"],
                        r"listening on (\d+)", "stdout")


def start_list_server(list_bytes: int) -> subprocess.Popen:
    """The tracker scenario's floor server, sending `list_bytes` to every connection; as `start_tracker`."""
    return start_server("raw list server", [sys.executable, "-c", RAW_LIST_SERVER, str(list_bytes)], r"listening on (\d+)", "stdout")


def start_server(what: str, argv: list[str], pattern: str, stream: str) -> subprocess.Popen:
    """Start `argv`, read its port from its first line on `stream` ("stdout" or "stderr") with
    `pattern`; returns the process with `.port` set."""
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    source = proc.stderr if stream == "stderr" else proc.stdout
    assert source is not None
    first = source.readline()
    found = re.search(pattern, first)
    if not found:
        proc.kill()
        raise BenchFailure(f"the {what} did not start: {first!r}")
    proc.port = int(found.group(1))  # type: ignore[attr-defined]
    # Keep draining the other pipe so the server never blocks on a full one.
    other = proc.stdout if stream == "stderr" else proc.stderr
    threading.Thread(target=lambda: [None for _ in other], daemon=True).start()
    threading.Thread(target=lambda: [None for _ in source], daemon=True).start()
    return proc


def stop(procs: list[subprocess.Popen]) -> None:
    """Ask every process to end at once (a room of 200 ends in one step, not 200), then wait for each,
    killing any that does not end within 5 s."""
    running = [proc for proc in procs if proc.poll() is None]
    for proc in running:
        proc.terminate()
    for proc in running:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


# How long a forming room may go without any peer gaining a link before it counts as stuck.
STALLED = 15.0


class Room:
    """A tracker and `size` peer processes of one implementation, fully meshed."""

    def __init__(self, impl: str, size: int, mesh_timeout: float = 60.0, latencies: bool = False) -> None:
        self.impl, self.size = impl, size
        # The latency floors' raw peers mesh as the baseline's do, through its tracker.
        self.tracker = start_tracker("p2pchat" if impl.startswith("p2pchat") else "baseline")
        self.peers: list[Child] = []
        # The room's own logs: a room starts with no history, as the baseline's has none.
        self.data_dir = tempfile.mkdtemp(prefix=f"{impl}-{size}-", dir=os.environ["P2PCHAT_BENCH_DATA"])
        try:
            # Every process starts (and imports) at once; then they join one at a time, as people
            # arrive in a room: each asks the tracker and dials everyone listed before the next comes.
            for i in range(size):
                argv = [sys.executable, str(PEER), "--impl", impl, "--tracker-port", str(self.tracker.port), "--index", str(i),
                        "--data-dir", self.data_dir]
                argv += ["--latencies"] if latencies else []
                self.peers.append(Child(argv, f"{impl} peer {i}"))
            for child in self.peers:
                child.next_line(timeout=60)  # started
                child.tell({"cmd": "join"})
                child.next_line(timeout=30)  # ready
            self.meshed = self.wait_mesh(mesh_timeout)
        except BaseException:
            self.close()
            raise

    def links(self) -> list[int]:
        for peer in self.peers:
            peer.tell({"cmd": "links"})
        return [json.loads(peer.next_line(30))["links"] for peer in self.peers]

    def wait_mesh(self, timeout: float) -> bool:
        """Wait until every peer holds a link to every other one: at most `timeout`, and at most
        `STALLED` while no peer gains a link (the original client never retries a failed dial, and a
        p2pchat peer retries for 5 s)."""
        deadline = time.monotonic() + timeout
        last, progressed = None, time.monotonic()
        while True:
            links = self.links()
            if min(links) >= self.size - 1:
                return True
            now = time.monotonic()
            if links != last:
                last, progressed = links, now
            if now > deadline or now - progressed > STALLED:
                log(f"{self.impl} room of {self.size}: mesh incomplete after {now - progressed:.0f} s without a new link "
                    f"(links per peer {min(links)}..{max(links)})")
                return False
            time.sleep(0.2)  # polling the peers' own counts; there is no event to wait on across processes

    def reports(self) -> list[dict]:
        for peer in self.peers:
            peer.tell({"cmd": "report"})
        return [json.loads(peer.next_line(60)) for peer in self.peers]

    def signal_all(self, signum: int) -> None:
        for proc in [peer.popen for peer in self.peers] + [self.tracker]:
            proc.send_signal(signum)

    def cpu_seconds(self) -> float:
        """The peers' CPU time so far, all threads, to the nanosecond (`/proc`'s counts are in 10 ms
        ticks: too coarse for a few hundred deliveries)."""
        for peer in self.peers:
            peer.tell({"cmd": "cpu"})
        return sum(json.loads(peer.next_line(30))["cpu_s"] for peer in self.peers)

    def thread_switches(self) -> int:
        """Context switches so far of every thread of every peer process (each one is a wake-up or a
        preemption), read from `/proc` without waking them."""
        total = 0
        for peer in self.peers:
            task = f"/proc/{peer.popen.pid}/task"
            for tid in os.listdir(task):
                try:
                    with open(f"{task}/{tid}/status") as status:
                        total += sum(int(line.split()[1]) for line in status if "ctxt_switches" in line)
                except FileNotFoundError:
                    pass  # a thread that ended meanwhile
        return total

    def close(self) -> None:
        stop([peer.popen for peer in self.peers] + [self.tracker])
        shutil.rmtree(self.data_dir, ignore_errors=True)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------- scenarios


def latency(messages_by_size: dict[int, int], repeats: int) -> list[dict]:
    """For each room size, `messages` sent one at a time per run (a small room gets more of them, so
    that its p99 too rests on a few thousand deliveries).

    The **floors** are rooms of raw peers (`peer_proc.py --impl floor` and `floor-rust`): the baseline's
    bytes over plain sockets, no protocol and no event loop, read by one thread blocked in `select` (the
    least a Python application that gets each message pays here), or by a Rust thread that times each
    message as it reads it (what the sockets allow).

    The rooms of a size are up at once and take turns, the others stopped meanwhile: this VM's speed
    drifts over minutes, and when one room ran all its runs before the other's, the ratio at 50 peers
    moved between 0.46 and 0.79 from one full run to the next. A run's messages are sent in turns of
    about `TURN_SECONDS` and its percentiles taken over all of them."""
    rows = []
    for size, messages in messages_by_size.items():
        rooms: dict[str, Room] = {}
        runs: dict[str, list[dict]] = {impl: [] for impl in LATENCY_ROOMS}
        per_turn = max(1, int(TURN_SECONDS / message_gap(size)))
        try:
            for impl in LATENCY_ROOMS:
                log(f"latency: {impl}, {size} peers")
                rooms[impl] = Room(impl, size, latencies=True)
            for _ in range(repeats):
                turns: dict[str, list[dict]] = {impl: [] for impl in LATENCY_ROOMS}
                for first in range(0, messages, per_turn):
                    for impl in LATENCY_ROOMS:
                        with others_stopped(rooms, impl) as room:
                            if impl == "p2pchat":
                                # Resumed a moment ago, it first does what its timers missed (keep-alives);
                                # the others have no timers.
                                time.sleep(0.5)
                            turns[impl].append(latency_turn(room, first, min(per_turn, messages - first)))
                for impl in LATENCY_ROOMS:
                    runs[impl].append(latency_run(turns[impl]))
        finally:
            for room in rooms.values():
                room.close()
        for impl in LATENCY_ROOMS:
            rows.append({"impl": impl, "peers": size, "meshed": rooms[impl].meshed, "runs": runs[impl],
                         "p50_us": median([r["p50_us"] for r in runs[impl]]), "p99_us": median([r["p99_us"] for r in runs[impl]]),
                         "cpu_us_per_delivery": median([r["cpu_us_per_delivery"] for r in runs[impl]])})
    return rows


@contextmanager
def others_stopped(rooms: dict[str, Room], impl: str) -> Iterator[Room]:
    """`impl`'s room, with every other room's processes stopped (SIGSTOP) meanwhile, so that they take
    no CPU from it. Keep it short: a p2pchat link silent for 8 s, or a registration for 6 s, is dropped."""
    others = [room for other, room in rooms.items() if other != impl]
    for room in others:
        room.signal_all(signal.SIGSTOP)
    try:
        yield rooms[impl]
    finally:
        for room in others:
            room.signal_all(signal.SIGCONT)


# How long one room sends before the next takes its turn. A stopped p2pchat room must be resumed
# within 6 s of its last ping to the tracker (which comes every 2 s), or its registrations are
# dropped: turns of 0.8 s (and ~0.3 s to collect each) keep its pause, while the three other rooms
# take theirs, under 4 s.
TURN_SECONDS = 0.8


def message_gap(size: int) -> float:
    """The pause between two messages in a room of `size`: "one at a time", well above the delivery time."""
    return 0.002 + size * 0.0003


def latency_turn(room: Room, first: int, count: int) -> dict:
    """Messages `first` to `first + count - 1` of a run, one at a time, each from the next peer in turn:
    their latencies (µs) and the CPU seconds the room's processes used meanwhile."""
    room.reports()  # start clean
    cpu_before = room.cpu_seconds()
    for m in range(first, first + count):
        room.peers[m % room.size].ask({"cmd": "send", "count": 1, "rate": 1.0})
        time.sleep(message_gap(room.size))
    reports = wait_deliveries(room, count * (room.size - 1), timeout=10)
    cpu_s = room.cpu_seconds() - cpu_before
    return {"samples_us": [ns / 1e3 for r in reports for ns in r["latencies_ns"]], "expected": count * (room.size - 1), "cpu_s": cpu_s}


def latency_run(turns: list[dict]) -> dict:
    """One run's figures from its turns (`latency_turn`)."""
    samples = [us for turn in turns for us in turn["samples_us"]]
    cpu_s = sum(turn["cpu_s"] for turn in turns)
    # With one message at a time, the peers' CPU is what their deliveries cost (plus keep-alives and
    # the benchmark's own commands): on 2 cores, 49 receivers queue for it, so a big room's latency
    # follows it.
    return {"p50_us": percentile(samples, 50), "p99_us": percentile(samples, 99), "delivered": len(samples),
            "expected": sum(turn["expected"] for turn in turns), "turns": len(turns), "cpu_us_per_delivery": 1e6 * cpu_s / max(len(samples), 1)}


def wait_deliveries(room: Room, expected: int, timeout: float) -> list[dict]:
    """Collect the peers' reports until `expected` deliveries are in, or `timeout` passes."""
    deadline = time.monotonic() + timeout
    merged = [{"counts": {}, "latencies_ns": []} for _ in room.peers]
    while True:
        for mine, new in zip(merged, room.reports()):
            for sender, n in new["counts"].items():
                mine["counts"][sender] = mine["counts"].get(sender, 0) + n
            mine["latencies_ns"].extend(new["latencies_ns"])
        got = sum(sum(m["counts"].values()) for m in merged)
        if got >= expected or time.monotonic() > deadline:
            return merged
        time.sleep(0.05)  # polling peers in other processes


def throughput(size: int, rates: list[int], seconds: float, repeats: int) -> list[dict]:
    """The implementations and the floor take turns, run by run (a fresh room each), so that a drift
    of the machine's speed over minutes hits them alike."""
    runs: dict[str, list[list[dict]]] = {impl: [] for impl in IMPLS + ("floor",)}
    for _ in range(repeats):
        for impl in IMPLS:
            log(f"throughput: {impl}, {size} peers")
            room = Room(impl, size)
            try:
                runs[impl].append(step_rates(room, rates, seconds))
            finally:
                room.close()
        log(f"throughput: raw TCP fan-out floor, {size} nodes")
        # The floor goes on past the chat's steps: it is expected to sustain far more.
        runs["floor"].append(step_floor(size, rates + [rates[-1] * k for k in (2, 3, 4, 6, 8)], seconds))
    return [summarise_steps(impl, impl_runs) for impl, impl_runs in runs.items()]


def application_cost(messages: int, repeats: int) -> dict:
    """Microseconds per message received on the application's thread: what p2pchat's benchmark
    application (`peer_proc.Inbox`) spends of its own, timed on real `p2pchat.Message`s, and the CPU
    that thread spent in p2pchat's `recv` getting them (two peers in this process exchange them)."""
    from peer_proc import Inbox, Texts

    with tempfile.TemporaryDirectory() as data, Tracker(host="127.0.0.1", port=0) as tracker:
        host, port = tracker.address
        with Peer("ana", host, port, data_dir=Path(data) / "ana", history=0) as ana, \
                Peer("bob", host, port, data_dir=Path(data) / "bob", history=0, max_message_rate=1_000_000) as bob:
            wait_linked(ana, bob.name)
            texts = Texts(1)
            for _ in range(messages):
                ana.post(texts.next())
            cpu_started = time.thread_time()
            received = []
            while len(received) < messages:
                message = bob.recv(timeout=30)
                if message is None:
                    raise BenchFailure(f"only {len(received)} of {messages} messages arrived")
                received.append(message)
            library_us = (time.thread_time() - cpu_started) * 1e6 / messages
    per_pass = []
    for _ in range(repeats):
        inbox = Inbox(keep_latencies=False)
        started = time.perf_counter()
        for message in received:
            inbox.record_message(message)
        per_pass.append(time.perf_counter() - started)
    return {"application_us": median(per_pass) * 1e6 / messages, "library_us": library_us}


# A rate is sustained when every message arrives, the senders kept the pace, and the last delivery came
# within this long after the last send was due (no backlog growing with the length of the run).
SLACK = 1.0


def step_rates(room: Room, rates: list[int], seconds: float) -> list[dict]:
    steps = []
    for rate in rates:
        count = int(rate * seconds)
        expected = count * room.size * (room.size - 1)
        room.reports()
        cpu_before, started = room.cpu_seconds(), time.monotonic()
        for peer in room.peers:
            peer.tell({"cmd": "send", "count": count, "rate": rate})
        send_seconds = max(json.loads(peer.next_line(seconds * 4 + 30))["seconds"] for peer in room.peers)
        reports = wait_deliveries(room, expected, timeout=max(0.0, seconds + SLACK - (time.monotonic() - started)))
        elapsed = time.monotonic() - started
        cpu = room.cpu_seconds() - cpu_before
        delivered = sum(sum(r["counts"].values()) for r in reports)
        links = room.links()
        full = delivered == expected and min(links) >= room.size - 1 and send_seconds <= seconds + SLACK
        steps.append({"rate": rate, "delivered": delivered, "expected": expected, "full": full, "send_seconds": send_seconds,
                      "seconds": elapsed, "deliveries_per_s": delivered / elapsed, "cpu_per_1000": 1000 * cpu / max(delivered, 1)})
        log(f"  {room.impl} rate {rate}/s per peer: {delivered}/{expected} delivered in {elapsed:.2f} s "
            f"(sending took {send_seconds:.2f} s), links {min(links)}..{max(links)}")
        if not full:
            break
    return steps


def step_floor(size: int, rates: list[int], seconds: float) -> list[dict]:
    import p2pchat

    message = b"<n10> :: 10:12345:" + str(time.monotonic_ns()).encode() + b"."
    steps = []
    for rate in rates:
        cpu_before = time.process_time()
        r = p2pchat._core._bench_fanout(size, rate, message, duration=seconds, drain=SLACK)
        cpu = time.process_time() - cpu_before
        full = r["delivered"] == r["expected"] and r["seconds"] <= seconds + SLACK
        steps.append({"rate": rate, "delivered": r["delivered"], "expected": r["expected"], "full": full,
                      "deliveries_per_s": r["delivered"] / r["seconds"], "cpu_per_1000": 1000 * cpu / max(r["delivered"], 1)})
        if not full:
            break
    return steps


def summarise_steps(impl: str, runs: list[list[dict]]) -> dict:
    best = []
    for steps in runs:
        passed = [s for s in steps if s["full"]]
        best.append(passed[-1] if passed else {"rate": 0, "deliveries_per_s": 0.0, "cpu_per_1000": float("nan")})
    return {"impl": impl, "runs": runs, "max_rate": median([b["rate"] for b in best]),
            "deliveries_per_s": median([b["deliveries_per_s"] for b in best]),
            "cpu_per_1000": median([b["cpu_per_1000"] for b in best]),
            "capped": all(len([s for s in steps if s["full"]]) == len(steps) for steps in runs)}


def per_join(report: dict, total: str) -> float:
    """A join run's `total` (list bytes, entries) per join."""
    return report[total] / max(report["joins"], 1)


def tracker_joins(sizes: list[int], seconds: float, repeats: int) -> list[dict]:
    """Each run joins one tracker of each implementation, then the floor for each one's list (the same
    joins against a server that only sends that many bytes); runs take turns, as in the other
    scenarios."""
    import p2pchat

    def joins(server: subprocess.Popen, protocol: str, registrations: int, list_bytes: Optional[int] = None) -> dict:
        try:
            return p2pchat._core._bench_tracker_joins("127.0.0.1", server.port, protocol, registrations, list_bytes=list_bytes,
                                                      concurrency=4, duration=seconds)
        finally:
            stop([server])

    rows = []
    for size in sizes:
        runs: dict[str, list[dict]] = {impl: [] for impl in IMPLS}
        floors: dict[str, list[dict]] = {impl: [] for impl in IMPLS}
        for _ in range(repeats):
            for impl in IMPLS:
                log(f"tracker: {impl}, {size} registrations")
                runs[impl].append(joins(start_tracker(impl), "p2pchat" if impl == "p2pchat" else "original", size))
            for impl in IMPLS:
                list_bytes = int(per_join(runs[impl][-1], "list_bytes"))
                log(f"tracker: raw list floor, {list_bytes} bytes ({impl}'s list)")
                floors[impl].append(joins(start_list_server(list_bytes), "raw", 0, list_bytes))
        for impl in IMPLS:
            rows.append({"impl": impl, "registrations": size, "runs": runs[impl],
                         "joins_per_s": median([r["joins_per_second"] for r in runs[impl]]),
                         "bytes_per_join": median([per_join(r, "list_bytes") for r in runs[impl]]),
                         "entries_per_join": median([per_join(r, "entries") for r in runs[impl]]),
                         "min_entries": min(r["min_entries"] for r in runs[impl]),
                         "failures": sum(r["failures"] for r in runs[impl]),
                         "floor_joins_per_s": median([f["joins_per_second"] for f in floors[impl]])})
    return rows


def scale(sizes: list[int], asyncio_sizes: list[int]) -> list[dict]:
    """Rooms of each size until one falls short; then p2pchat again, run by an asyncio program, at
    `asyncio_sizes` (its memory then includes asyncio, as the baseline's does)."""
    rows = []
    for impl, impl_sizes in [(impl, sizes) for impl in IMPLS] + [("p2pchat-asyncio", asyncio_sizes)]:
        for size in impl_sizes:
            log(f"scale: {impl}, {size} peers")
            room = Room(impl, size, mesh_timeout=60 + size / 2)
            try:
                pss = [p.pss_kib() for p in room.peers]
                room.reports()
                for _i, peer in enumerate(room.peers):
                    peer.tell({"cmd": "send", "count": 1, "rate": 1.0})
                for peer in room.peers:
                    json.loads(peer.next_line(30))
                expected = size * (size - 1)
                reports = wait_deliveries(room, expected, timeout=20)
                delivered = sum(sum(r["counts"].values()) for r in reports)
            finally:
                room.close()
            full = delivered == expected
            rows.append({"impl": impl, "peers": size, "meshed": room.meshed, "delivered": delivered, "expected": expected,
                         "full": full, "pss_kib_median": median(pss)})
            log(f"  {delivered}/{expected} delivered; PSS median {median(pss):.0f} KiB")
            if not full:
                break
    return rows


def machine_busy_seconds() -> float:
    """CPU time the whole machine has spent not idle since boot, every core (`/proc/stat`: user, nice,
    system, irq, softirq and steal; the kernel's timers and TCP work included)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = ticks[3] + ticks[4]  # idle and iowait
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def loopback_drops() -> int:
    """Packets the kernel dropped so far because a CPU's input backlog was full (`/proc/net/softnet_stat`,
    second column, every CPU): on loopback, where a one-host room's every packet goes, a burst
    longer than `net.core.netdev_max_backlog` is lost there."""
    try:
        return sum(int(line.split()[1], 16) for line in Path("/proc/net/softnet_stat").read_text().splitlines())
    except (OSError, IndexError, ValueError):
        return 0


def idle(sizes: list[int], seconds: float) -> list[dict]:
    """Rooms of each size where nobody types for `seconds`: CPU per peer per hour, of the peer processes
    and of the whole machine."""
    rows = []
    for size in sizes:
        for impl in IMPLS:
            log(f"idle: {impl}, {size} peers, {seconds:.0f} s")
            room = Room(impl, size, mesh_timeout=60 + size / 2)
            try:
                # The joins' history and summaries are exchanged in the first moments of a link: let
                # them pass before the window opens (a settling time, not a wait for an event).
                time.sleep(SETTLE)
                cpu_before, machine_before, started = room.cpu_seconds(), machine_busy_seconds(), time.monotonic()
                # Read after the CPU query, whose answer wakes every peer: the window holds no command.
                drops_before, switches_before = loopback_drops(), room.thread_switches()
                time.sleep(seconds)  # the measuring window: nobody types
                switches = room.thread_switches() - switches_before
                cpu_after, machine_after, window = room.cpu_seconds(), machine_busy_seconds(), time.monotonic() - started
                drops = loopback_drops() - drops_before
            finally:
                room.close()
            per_peer_hour = 3600 / size / window
            rows.append({"impl": impl, "peers": size, "meshed": room.meshed, "window_s": window, "loopback_drops": drops,
                         "cpu_s_per_peer_hour": (cpu_after - cpu_before) * per_peer_hour,
                         "wakeups_per_peer_s": switches / size / window,
                         "machine_cpu_s_per_peer_hour": (machine_after - machine_before) * per_peer_hour})
            log(f"  {rows[-1]['cpu_s_per_peer_hour']:.2f} CPU s per peer per hour (machine: "
                f"{rows[-1]['machine_cpu_s_per_peer_hour']:.2f}){'' if room.meshed else '; the mesh was incomplete'}")
    return rows


# How long an idle room settles after its mesh is complete, before its CPU is measured.
SETTLE = 3.0


def in_process(limit: int) -> dict:
    """How many p2pchat peers one process can hold (fully meshed), adding them until one falls short."""
    import resource

    code = f"""
import json, resource, sys, time, p2pchat
port = int(sys.argv[1]); peers = []; why = None
for i in range({limit}):
    try:
        peer = p2pchat.Peer(f"n{{i}}", "127.0.0.1", port, data_dir=f"{{sys.argv[2]}}/n{{i}}").join()
    except p2pchat.P2PChatError as err:
        why = f"{{type(err).__name__}}: {{err}}"; break
    connected, listed = peer.join_result
    if connected < listed:  # out of descriptors (or another limit): this one does not count
        why = f"peer {{i + 1}} reached {{connected}} of {{listed}}"; peer.close(); break
    peers.append(peer)
deadline = time.monotonic() + 30
while time.monotonic() < deadline and min(len(p.peers()) for p in peers) < len(peers) - 1:
    time.sleep(0.2)
meshed = len(peers) if min(len(p.peers()) for p in peers) >= len(peers) - 1 else None
peers[0].send("hello")
got = sum(1 for p in peers[1:] if p.recv(timeout=10) is not None)
import os
try:
    fds = len(os.listdir("/proc/self/fd"))
except OSError:  # every descriptor is in use
    fds = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
print(json.dumps({{"peers": len(peers), "meshed": meshed, "delivered": got, "why": why,
                  "fds": fds, "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)}}))
"""
    tracker = start_tracker("p2pchat")
    try:
        out = subprocess.run([sys.executable, "-c", code, str(tracker.port), os.environ["P2PCHAT_BENCH_DATA"]],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
    finally:
        stop([tracker])
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1:] or ["exited"], "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)}
    return json.loads(out.stdout.strip().splitlines()[-1])


def history_sync(count: int, repeats: int) -> dict:
    """A member with `count` messages in its log; newcomers ask for all of them (in this process)."""
    text = "a chat line of a typical length, about sixty characters long"
    runs, live = [], []
    with tempfile.TemporaryDirectory() as data, Tracker(host="127.0.0.1", port=0) as tracker:
        host, port = tracker.address
        data_dir = Path(data)
        with Peer("ana", host, port, data_dir=data_dir / "ana", history=0) as ana:
            for i in range(count):
                ana.send(f"{i:06d} {text}")
            deadline = time.monotonic() + 60
            while not ana.history(limit=1)[0].text.startswith(f"{count - 1:06d}"):
                if time.monotonic() > deadline:
                    raise BenchFailure("the member's log never had every message")
                time.sleep(0.05)
            for run in range(repeats):
                log(f"history: newcomer {run + 1} of {repeats} asks for {count} messages")
                newcomer_dir = data_dir / f"newcomer{run}"
                started = time.perf_counter()
                with Peer(f"new{run}", host, port, data_dir=newcomer_dir, history=count) as newcomer:
                    received = 0
                    while True:
                        event = newcomer.recv_event(timeout=60)
                        if event is None:
                            raise BenchFailure(f"the newcomer got {received} of {count} and then nothing")
                        if isinstance(event, Message) and event.history:
                            received += 1
                        elif isinstance(event, HistorySynced):
                            break
                    took = time.perf_counter() - started
                # Its log is complete on disk once the peer is gone: the last handle closes the
                # database, which folds the write-ahead log into it.
                del newcomer
                deadline = time.monotonic() + 10
                while (newcomer_dir / "history.sqlite3-wal").exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
                disk = sum(f.stat().st_size for f in newcomer_dir.iterdir())
                runs.append({"seconds": took, "received": received, "disk_bytes": disk})

                log(f"history: the same {count} messages live")
                with Peer(f"live{run}", host, port, data_dir=data_dir / f"live{run}", history=0,
                          max_message_rate=1_000_000) as listener:
                    wait_linked(ana, listener.name)
                    started = time.perf_counter()
                    for i in range(count):
                        ana.send(f"{i:06d} {text}")
                    got = sum(1 for _ in range(count) if listener.recv(timeout=30) is not None)
                    live.append({"seconds": time.perf_counter() - started, "received": got})
    return {"messages": count, "text_bytes": len(text) + 7, "runs": runs, "live": live,
            "seconds": median([r["seconds"] for r in runs]), "live_seconds": median([r["seconds"] for r in live]),
            "disk_bytes_per_message": median([r["disk_bytes"] / max(r["received"], 1) for r in runs])}


def wait_linked(member: Peer, name: str, timeout: float = 30.0) -> None:
    """Until `member` (in this process) has a link to the member called `name`."""
    deadline = time.monotonic() + timeout
    while not any(p.name == name for p in member.peers()):
        if time.monotonic() > deadline:
            raise BenchFailure(f"{name} never linked to {member.name}")
        time.sleep(0.01)


# ---------------------------------------------------------------- report


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b and a == a and b == b else "n/a"


def table(results: dict) -> str:
    out = ["| scenario | figure | p2pchat | baseline | p2pchat / baseline |", "| --- | --- | ---: | ---: | ---: |"]

    def row(scenario: str, figure: str, p: float, b: float, fmt: str = "{:.0f}") -> None:
        out.append(f"| {scenario} | {figure} | {fmt.format(p)} | {fmt.format(b)} | {ratio(p, b)} |")

    def pairs(rows: list[dict], key: str):
        """(size, p2pchat row, baseline row) for every size measured, smallest first."""
        by = {(r["impl"], r[key]): r for r in rows}
        for size in sorted({r[key] for r in rows}):
            yield size, by[("p2pchat", size)], by[("baseline", size)]

    if "latency" in results:
        for size, p, b in pairs(results["latency"], "peers"):
            row("latency", f"{size} peers, p50 (µs)", p["p50_us"], b["p50_us"])
            row("latency", f"{size} peers, p99 (µs)", p["p99_us"], b["p99_us"])
            row("latency", f"{size} peers, CPU of all peers per delivery (µs)", p["cpu_us_per_delivery"], b["cpu_us_per_delivery"])
        for f in sorted((r for r in results["latency"] if r["impl"] in FLOORS), key=lambda r: (r["impl"], r["peers"])):
            b = next(r for r in results["latency"] if r["impl"] == "baseline" and r["peers"] == f["peers"])
            out.append(f"| latency | floor ({FLOORS[f['impl']]}, no protocol), {f['peers']} peers: p50, p99, CPU per delivery (µs) | "
                       f"{f['p50_us']:.0f}, {f['p99_us']:.0f}, {f['cpu_us_per_delivery']:.0f} | | floor / baseline "
                       f"{ratio(f['p50_us'], b['p50_us'])}, {ratio(f['p99_us'], b['p99_us'])}, "
                       f"{ratio(f['cpu_us_per_delivery'], b['cpu_us_per_delivery'])} |")
    if "throughput" in results:
        t = {r["impl"]: r for r in results["throughput"]["rows"]}
        size = results["throughput"]["peers"]
        p, b, f = t["p2pchat"], t["baseline"], t["floor"]
        capped = lambda r: " (all steps passed)" if r["capped"] else ""  # noqa: E731
        out.append(f"| throughput | {size} peers, highest rate per peer at 100% (msg/s) | {p['max_rate']:.0f}{capped(p)} | "
                   f"{b['max_rate']:.0f}{capped(b)} | {ratio(p['max_rate'], b['max_rate'])} |")
        row("throughput", "deliveries/s at that rate", p["deliveries_per_s"], b["deliveries_per_s"])
        row("throughput", "CPU seconds per 1,000 deliveries", p["cpu_per_1000"], b["cpu_per_1000"], "{:.3f}")
        out.append(f"| throughput | raw TCP fan-out floor: highest rate, deliveries/s | {f['max_rate']:.0f}, "
                   f"{f['deliveries_per_s']:.0f} | | p2pchat / floor {ratio(p['deliveries_per_s'], f['deliveries_per_s'])} |")
        offered = 5 * b["max_rate"] * size * (size - 1)
        if "application_us" in results["throughput"] and offered:
            # What 5x the baseline's rate leaves per delivery: the room's whole CPU (every process, the
            # kernel's TCP included) over the deliveries offered each second at that rate.
            out.append(f"| throughput | CPU per delivery the machine has at 5× the baseline's rate ({results['machine']['cpus']} "
                       f"cores, {offered:,.0f} deliveries/s offered; µs) | {results['machine']['cpus'] * 1e6 / offered:.2f} | | |")
            out.append(f"| throughput | the benchmark application's own Python per message received, before the library's "
                       f"(µs) | {results['throughput']['application_us']:.2f} | | |")
            out.append(f"| throughput | p2pchat's `recv` on the application's thread per message received: CPU of that thread "
                       f"(µs) | {results['throughput']['library_us']:.2f} | | |")
    if "tracker" in results:
        for size, p, b in pairs(results["tracker"], "registrations"):
            row("tracker", f"joins/s, {size} registered", p["joins_per_s"], b["joins_per_s"])
            row("tracker", f"entries per list (mean), {size} registered", p["entries_per_join"], b["entries_per_join"])
            row("tracker", f"bytes of list per join, {size} registered", p["bytes_per_join"], b["bytes_per_join"])
            if "floor_joins_per_s" in p and "floor_joins_per_s" in b:
                row("tracker", f"floor: joins/s of a raw server sending a list that long, {size} registered",
                    p["floor_joins_per_s"], b["floor_joins_per_s"])
                row("tracker", f"joins/s as a share of that floor, {size} registered",
                    p["joins_per_s"] / p["floor_joins_per_s"], b["joins_per_s"] / b["floor_joins_per_s"], "{:.2f}")
    if "scale" in results:
        rows = results["scale"]["rooms"]
        for impl in IMPLS:
            mine = [r for r in rows if r["impl"] == impl]
            results["scale"][f"{impl}_largest"] = max([r["peers"] for r in mine if r["full"]], default=0)
        largest = lambda impl: results["scale"][f"{impl}_largest"]  # noqa: E731
        row("scale", "largest room with 100% delivery (peers)", largest("p2pchat"), largest("baseline"))
        pss = {size: {r["impl"]: r["pss_kib_median"] for r in rows if r["peers"] == size} for size in sorted({r["peers"] for r in rows})}
        for impl, label in (("p2pchat", ""), ("p2pchat-asyncio", ", p2pchat in an asyncio program")):
            for size, by_impl in pss.items():
                if impl in by_impl and "baseline" in by_impl:
                    row("scale", f"PSS per peer process, {size} peers{label} (KiB)", by_impl[impl], by_impl["baseline"])
        one = results["scale"].get("in_process", {})
        if "peers" in one:
            out.append(f"| scale | peers in one process (API), fully meshed | {one['peers']} ({one['fds']} descriptors; "
                       f"stopped by: {one['why'] or 'the step limit'}) | | |")
    if "idle" in results:
        for size, p, b in pairs(results["idle"], "peers"):
            mesh = "" if p["meshed"] and b["meshed"] else " (a mesh was incomplete)"
            row("idle", f"{size} peers, nobody typing: CPU s per peer per hour, peer processes{mesh}",
                p["cpu_s_per_peer_hour"], b["cpu_s_per_peer_hour"], "{:.2f}")
            row("idle", f"{size} peers, nobody typing: CPU s per peer per hour, whole machine",
                p["machine_cpu_s_per_peer_hour"], b["machine_cpu_s_per_peer_hour"], "{:.2f}")
            row("idle", f"{size} peers, nobody typing: thread wake-ups per peer per second",
                p["wakeups_per_peer_s"], b["wakeups_per_peer_s"], "{:.1f}")
            row("idle", f"{size} peers, nobody typing: packets lost to a full loopback backlog",
                p.get("loopback_drops", 0), b.get("loopback_drops", 0))
    if "history" in results:
        h = results["history"]
        n = h["messages"]
        out.append(f"| history | newcomer receives {n:,} earlier messages (s) | {h['seconds']:.3f} | n/a (none kept) | "
                   f"vs the same {n:,} live: {ratio(h['seconds'], h['live_seconds'])} ({h['live_seconds']:.3f} s) |")
        out.append(f"| history | log on disk per message (bytes; text is {h['text_bytes']}) | "
                   f"{h['disk_bytes_per_message']:.0f} | n/a | |")
    return "\n".join(out)


def chart(results: dict, path: Path) -> Optional[Path]:
    """One panel per scenario that ran (latency, throughput, tracker, memory), both implementations in
    each; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    color = {"p2pchat": "tab:blue", "baseline": "tab:orange", "floor": "tab:green", "floor-rust": "tab:olive", "p2pchat-asyncio": "tab:purple"}
    latency_ax, throughput_ax, tracker_ax, memory_ax = axes.flat
    if "latency" in results:
        for impl in LATENCY_ROOMS:
            rows = sorted((r for r in results["latency"] if r["impl"] == impl), key=lambda r: r["peers"])
            if not rows:
                continue  # a partial run merged with results from before the floor existed
            latency_ax.plot([r["peers"] for r in rows], [r["p99_us"] for r in rows], marker="o", color=color[impl], label=f"{impl} p99")
            latency_ax.plot([r["peers"] for r in rows], [r["p50_us"] for r in rows], marker=".", linestyle="--", color=color[impl],
                            label=f"{impl} p50")
        latency_ax.set(xlabel="peers in the room", ylabel="one-way latency (µs)", title="latency", yscale="log")
        latency_ax.legend(fontsize="small", ncol=2)
    if "throughput" in results:
        for row in results["throughput"]["rows"]:
            # Each offered rate against the median of what its runs delivered (a run stops at its first
            # step short of 100%).
            steps = [step for run in row["runs"] for step in run]
            rates = sorted({step["rate"] for step in steps})
            delivered = [median([step["deliveries_per_s"] for step in steps if step["rate"] == rate]) for rate in rates]
            throughput_ax.plot(rates, delivered, marker="o", color=color[row["impl"]], label=f"{row['impl']} (highest at 100%: {row['max_rate']}/s)")
        throughput_ax.set(xlabel="offered lines/s per peer", ylabel="deliveries per second",
                          title=f"throughput, {results['throughput']['peers']} peers")
        throughput_ax.legend()
    if "tracker" in results:
        for impl in IMPLS:
            rows = sorted((r for r in results["tracker"] if r["impl"] == impl), key=lambda r: r["registrations"])
            tracker_ax.plot([r["registrations"] for r in rows], [r["joins_per_s"] for r in rows], marker="o", color=color[impl], label=impl)
            tracker_ax.plot([r["registrations"] for r in rows], [r["floor_joins_per_s"] for r in rows], marker=".",
                            linestyle=":", color=color[impl], label=f"floor for {impl}'s list")
        tracker_ax.set(xlabel="registrations", ylabel="joins per second", title="tracker", xscale="log", yscale="log")
        tracker_ax.legend()
    if "scale" in results:
        for impl in IMPLS + ("p2pchat-asyncio",):
            rows = sorted((r for r in results["scale"]["rooms"] if r["impl"] == impl), key=lambda r: r["peers"])
            if rows:
                memory_ax.plot([r["peers"] for r in rows], [r["pss_kib_median"] / 1024 for r in rows], marker="o", color=color[impl], label=impl)
        memory_ax.set(xlabel="peers in the room (one process each)", ylabel="PSS per peer process (MiB)", title="memory")
        memory_ax.set_ylim(bottom=0)
        memory_ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="p2pchat vs the asyncio baseline, side by side", allow_abbrev=False)
    parser.add_argument("--quick", action="store_true", help="a small smoke run (seconds, not minutes)")
    parser.add_argument("--only", default="latency,throughput,tracker,scale,history,idle", help="comma-separated scenarios")
    parser.add_argument("--repeats", type=int, help="runs per figure (default 3; 1 with --quick)")
    parser.add_argument("--out", type=Path, default=ROOT / "benches" / "results", help="where to write the results")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    only = set(args.only.split(","))
    if args.quick:
        plan: dict[str, Callable[[], object]] = {
            "latency": lambda: latency({3: 10}, repeats=repeats),
            "throughput": lambda: {"peers": 3, "rows": throughput(3, [50, 200], seconds=0.5, repeats=repeats),
                                   **application_cost(1000, repeats=3)},
            "tracker": lambda: tracker_joins([10, 100], seconds=0.5, repeats=repeats),
            "scale": lambda: {"rooms": scale([4], [4]), "in_process": in_process(limit=6)},
            "history": lambda: history_sync(500, repeats=repeats),
            "idle": lambda: idle([4], seconds=1.0),
        }
    else:
        plan = {
            "latency": lambda: latency({5: 500, 20: 200, 50: 300}, repeats=repeats),
            "throughput": lambda: {"peers": 20, "rows": throughput(20, [200, 400, 600, 800, 1000, 1200, 1400, 1600, 2000, 2400, 3200], seconds=2.0, repeats=repeats),
                                   **application_cost(20_000, repeats=5)},
            "tracker": lambda: tracker_joins([10, 1000, 10000], seconds=2.0, repeats=repeats),
            "scale": lambda: {"rooms": scale([50, 100, 150, 200], [50, 150]), "in_process": in_process(limit=400)},
            "history": lambda: history_sync(10_000, repeats=repeats),
            # 500 would be the size; such a room did not mesh here in 15 minutes (docs/benchmarks.md).
            "idle": lambda: idle([10, 100, 200], seconds=30.0),
        }
    unknown = only - set(plan)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}; choose from {', '.join(plan)}")
    # Peers log history on disk as users run them, each in a directory of this run, removed at the end.
    bench_data = tempfile.TemporaryDirectory(prefix="p2pchat-bench-")
    os.environ["P2PCHAT_BENCH_DATA"] = bench_data.name
    started = time.monotonic()
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "system": platform.platform()},
                     "quick": args.quick, "repeats": repeats}
    timings: dict[str, float] = {}
    for name, run in plan.items():
        if name in only:
            scenario_started = time.monotonic()
            try:
                results[name] = run()
            except (BenchFailure, P2PChatError) as err:
                print(f"bench: {name} could not run: {err}", file=sys.stderr)
                return 1
            timings[name] = time.monotonic() - scenario_started
    took = time.monotonic() - started
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("quick.json" if args.quick else "latest.json")
    partial = only != set(plan)
    if partial and path.exists():
        # A partial run updates its scenarios and keeps the others' latest figures (and the time the
        # last whole run took).
        results = {**json.loads(path.read_text()), **{k: v for k, v in results.items() if k in only or k not in plan}}
    else:
        results["seconds"] = took
    path.write_text(json.dumps(results, indent=1))
    print(table(results))
    png = chart(results, args.out / ("quick.png" if args.quick else "latest.png"))
    kind = f"partial ({', '.join(sorted(only))})" if partial else ("quick" if args.quick else "full")
    print(f"\n{kind} benchmark, {repeats} run(s) per figure, {took:.0f} s "
          f"({', '.join(f'{name} {seconds:.0f} s' for name, seconds in timings.items())}); "
          f"raw results in {args.out}" + (f"; chart {png.name}" if png else " (no matplotlib: no chart)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
