"""Original-protocol interop: p2pchat and reference (original-behaving) trackers and peers, mixed.

The reference scripts in tests/reference behave on the wire like the original server.py and client.py.
Under the reference tracker, reference peers need --reuseaddr to listen on Linux (the original's known
defect); under p2pchat's tracker they run exactly as the original, without it.
"""

import json
from pathlib import Path

import pytest


def start_peer(room, kind, name, tracker, capture_dir: Path):
    if kind == "p2pchat":
        return room.p2pchat_peer(name, tracker.port)
    extra = ["--capture", str(capture_dir / f"{name}.jsonl")]
    if tracker.kind == "reference":
        extra.append("--reuseaddr")
    return room.reference_peer(name, tracker.port, *extra)


@pytest.mark.parametrize("tracker_kind", ["p2pchat", "reference"])
@pytest.mark.parametrize("order", [("p2pchat", "reference", "p2pchat", "reference"),
                                   ("reference", "p2pchat", "reference", "p2pchat")])
def test_mixed_room_every_line_reaches_every_peer(room, tmp_path, tracker_kind, order):
    tracker = room.p2pchat_tracker() if tracker_kind == "p2pchat" else room.reference_tracker()
    tracker.kind = tracker_kind
    names = [f"{kind[:3]}{i}" for i, kind in enumerate(order)]
    peers = [start_peer(room, kind, name, tracker, tmp_path) for kind, name in zip(order, names)]
    for p in peers:
        p.wait_connections(len(peers) - 1)

    for p in peers:
        p.say(f"hi from {p.name} ☃")
    for p in peers:
        for other in peers:
            if other is not p:
                p.got(other.name, f"hi from {other.name} ☃")

    # p2pchat peers speak the extension with each other and the original protocol with reference peers,
    # also under the reference tracker, which tells them nothing.
    for p in (p for p in peers if p.kind == "p2pchat"):
        p.say("/who")
        for other in peers:
            if other is not p:
                protocol = "p2pchat" if other.kind == "p2pchat" else "original"
                p.proc.err.saw(rf"^\*   {other.name} \(127\.0\.0\.1:\d+\) {protocol}$")

    # A reference peer received exactly the original bytes from every p2pchat peer, and at most a probe
    # (0xFF first) alone on a connection it then dropped.
    for ref in (p for p in peers if p.kind == "reference"):
        chunks = [json.loads(line) for line in (tmp_path / f"{ref.name}.jsonl").read_text().splitlines()]
        by_connection = {}
        for chunk in chunks:
            by_connection.setdefault(chunk["from"], bytearray()).extend(bytes.fromhex(chunk["hex"]))
        probes = [bytes(b) for b in by_connection.values() if b.startswith(b"\xff")]
        streams = sorted(bytes(b) for b in by_connection.values() if not b.startswith(b"\xff"))
        expected = sorted(f"<{o.name}> :: hi from {o.name} ☃".encode() for o in peers if o is not ref)
        assert streams == expected, f"{ref.name} received {streams!r}"
        for probe in probes:
            assert tracker_kind == "reference", "under p2pchat's tracker nobody needs to probe"
            assert probe.startswith(b"\xffp2pchat")
            length = int.from_bytes(probe[8:12], "big")
            assert len(probe) == 12 + length, f"nothing but one hello frame: {probe!r}"
            assert json.loads(probe[12:])["type"] == "hello"
