"""Bad input from the network never crashes anything, and the room goes on."""

import re
import socket
import time

from harness import WAIT, home, original_exchange
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from p2pchat import Message, Peer, PeerJoined, PeerLeft, Tracker


def test_tracker_survives_junk_and_silent_and_vanishing_clients():
    with Tracker(host="127.0.0.1", port=0) as tracker:
        port = tracker.address[1]
        with Peer("real", "127.0.0.1", port, data_dir=home("real")):
            for junk in (b"\x00\xff" * 100, b"GET / HTTP/1.1\r\n\r\n", bytes(range(256))):
                assert original_exchange(port, payload=junk) == b"", "a client that sends bytes is not an original client"
            for _ in range(200):
                original_exchange(port, hold=False)  # connects and leaves at once
            silent = original_exchange(port)  # an original client: sends nothing, gets the list
            assert silent.decode().split("-")[0].startswith("127.0.0.1:")
            remembered = tracker.peers()
            assert len(remembered) == 2, remembered  # the real peer and the silent client only
            with Peer("late", "127.0.0.1", port, data_dir=home("late")) as late:
                assert late.join_result == (1, 2)  # reached the real peer; the silent one is not listening


def collect_until(peer: Peer, text: str):
    """Every message until one with `text` arrives (bounded)."""
    seen = []
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        event = peer.recv_event(timeout=max(0.01, deadline - time.monotonic()))
        if isinstance(event, Message):
            seen.append(event)
            if event.text == text:
                return seen
    raise AssertionError(f"{text!r} never arrived; got {[m.text for m in seen]}")


def test_invalid_utf8_and_split_characters_from_a_raw_peer():
    with Tracker(host="127.0.0.1", port=0) as tracker, Peer("victim", *tracker.address, data_dir=home("victim")) as victim:
        with socket.create_connection(("127.0.0.1", victim.address[1]), timeout=WAIT) as raw:
            raw.sendall(b"<evil> :: bad \xff\xfe byte")
            assert collect_until(victim, "bad \ufffd\ufffd byte")
            snowman = "<evil> :: a☃ ok".encode()
            cut = snowman.index("☃".encode()) + 1  # inside the snowman's three bytes
            raw.sendall(snowman[:cut])
            # The text before the cut is shown on its own: that read is over before the rest is sent.
            assert collect_until(victim, "a")[-1].text == "a"
            raw.sendall(snowman[cut:])
            rest = collect_until(victim, "☃ ok")[-1]
            assert (rest.text, rest.continued) == ("☃ ok", True), "the same line, continued"


def test_a_peer_dying_mid_message_is_dropped_and_the_room_goes_on():
    with Tracker(host="127.0.0.1", port=0) as tracker:
        host, port = tracker.address
        with Peer("ana", host, port, history=0, data_dir=home("ana")) as ana, Peer("bob", host, port, data_dir=home("bob")) as bob:
            assert isinstance(ana.recv_event(timeout=WAIT), PeerJoined)
            raw = socket.create_connection(("127.0.0.1", ana.address[1]), timeout=WAIT)
            assert isinstance(ana.recv_event(timeout=WAIT), PeerJoined)
            raw.sendall(b"<dying> :: half a mess")
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            raw.close()  # reset, mid-message
            events = []
            while not any(isinstance(e, PeerLeft) for e in events):
                event = ana.recv_event(timeout=WAIT)
                assert event is not None, f"no disconnect noticed; got {events}"
                events.append(event)
            bob.send("still alive?")
            assert collect_until(ana, "still alive?")


def test_a_dead_address_in_the_list_is_skipped():
    with Tracker(host="127.0.0.1", port=0) as tracker:
        port = tracker.address[1]
        ghost = socket.socket()
        ghost.bind(("127.0.0.1", 0))
        ghost.connect(("127.0.0.1", port))
        ghost.recv(2048)  # registered, then gone: nobody will listen there
        ghost.close()
        with Peer("ana", "127.0.0.1", port, data_dir=home("ana")) as ana, Peer("bob", "127.0.0.1", port, data_dir=home("bob")) as bob:
            assert bob.join_result == (1, 2)
            bob.send("the room works")
            assert collect_until(ana, "the room works")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks=st.lists(st.binary(min_size=1, max_size=512), min_size=1, max_size=8))
def test_random_bytes_never_hurt_a_peer(chunks):
    with Tracker(host="127.0.0.1", port=0) as tracker:
        host, port = tracker.address
        with Peer("target", host, port, data_dir=home("target")) as target, Peer("friend", host, port, data_dir=home("friend")) as friend:
            with socket.create_connection(("127.0.0.1", target.address[1]), timeout=WAIT) as raw:
                try:
                    for chunk in chunks:
                        raw.sendall(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # bytes that open with no `<NAME> :: ` header: the target drops the connection
            friend.send("after the noise")
            received = collect_until(target, "after the noise")
            noise = b"".join(chunks)
            if not re.match(rb"<[^>\r\n]{1,40}> :: ", noise):
                # Not a chat peer: nothing it sent was shown.
                assert [(m.sender, m.text) for m in received] == [("friend", "after the noise")]
            assert not target.closed


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def test_thousands_of_junk_connections_leave_the_tracker_correct_and_small(room):
    tracker = room.p2pchat_tracker()
    pid = tracker.proc.popen.pid
    with Peer("real", "127.0.0.1", tracker.port, data_dir=home("real")):
        before = rss_kib(pid)
        junk = [b"", b"\x00" * 64, b"GET / HTTP/1.0\r\n\r\n", b"\xffp2pchat\xff\xff\xff\xff", b"\xffp2pchat\x00\x00\x00\x02{}"]
        for i in range(3000):
            with socket.create_connection(("127.0.0.1", tracker.port), timeout=WAIT) as s:
                if junk[i % len(junk)]:
                    s.sendall(junk[i % len(junk)])
        after = rss_kib(pid)
        answer = original_exchange(tracker.port)  # an original client still gets a correct list
        listed = answer.decode().split("-")
        assert len(listed) == 1 and listed[0].startswith("127.0.0.1:"), answer
        assert after - before < 20 * 1024, f"the tracker grew by {after - before} KiB over 3000 junk connections"


@settings(max_examples=60, deadline=None)
@given(payload=st.binary(min_size=1, max_size=2048), close_early=st.booleans())
def test_random_bytes_never_hurt_the_tracker(payload, close_early):
    with Tracker(host="127.0.0.1", port=0) as tracker:
        port = tracker.address[1]
        with Peer("member", "127.0.0.1", port, data_dir=home("member")) as member:
            original_exchange(port, payload=payload, hold=not close_early)
            # Whatever that was, an original client still gets exactly the room.
            assert original_exchange(port) == f"127.0.0.1:{member.address[1]}".encode()
            assert tracker.running
