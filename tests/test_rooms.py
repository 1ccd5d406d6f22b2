"""Rooms, names and presence: the p2pchat extension protocol, invisible to original peers."""

import json
import signal
import socket
import struct

import pytest
from harness import MAGIC, WAIT, frame, home, read_frame
from p2pchat import MAX_TEXT_BYTES, Message, Notice, Peer, PeerJoined, Tracker


def test_rooms_do_not_hear_each_other_and_the_default_room_mixes(room, tmp_path):
    tracker = room.p2pchat_tracker()
    red = [room.p2pchat_peer(n, tracker.port, "--room", "red") for n in ("ana", "bob")]
    lobby = [room.p2pchat_peer("cid", tracker.port), room.reference_peer("ref", tracker.port, "--capture", str(tmp_path / "ref.jsonl")),
             room.p2pchat_peer("dee", tracker.port)]
    for p in red:
        p.wait_connections(1)
    for p in lobby:
        p.wait_connections(2)
    for p in red + lobby:
        p.say(f"{p.name} speaking")
    for group in (red, lobby):
        for p in group:
            for other in group:
                if other is not p:
                    p.got(other.name, f"{other.name} speaking")
    # Nobody heard the other room. (Every room's lines have arrived by now: each line goes out at once
    # and all of one room's lines were seen above.)
    for p in red:
        assert not [line for line in p.proc.out.snapshot() if any(f"<{o.name}>" in line for o in lobby)]
    for p in lobby:
        assert not [line for line in p.proc.out.snapshot() if any(f"<{o.name}>" in line for o in red)]


def test_presence_join_leave_kill_nick_and_who(room, tmp_path):
    tracker = room.p2pchat_tracker()
    ana = room.p2pchat_peer("ana", tracker.port)
    bob = room.p2pchat_peer("bob", tracker.port)
    ref = room.reference_peer("ref", tracker.port, "--capture", str(tmp_path / "ref.jsonl"))
    cid = room.p2pchat_peer("cid", tracker.port)
    watchers = [ana, bob]
    for p in watchers:
        p.wait_connections(3)
        p.proc.err.saw(r"^\* cid \(127\.0\.0\.1:\d+\) joined \(p2pchat\)$")
        p.proc.err.saw(r"^\* 127\.0\.0\.1:\d+ joined \(original\)$")
    ref.say("hello from the original")
    for p in watchers:
        p.proc.err.saw(r"^\* 127\.0\.0\.1:\d+ is now known as ref$")

    cid.say("/nick cida")
    cid.proc.err.expect(r"you are now known as cida")
    for p in watchers:
        p.proc.err.saw(r"^\* cid \(127\.0\.0\.1:\d+\) is now known as cida$")
    cid.say("renamed")
    for p in watchers:
        p.got("cida", "renamed")
    ref.got("cida", "renamed")

    ana.say("/who")
    ana.proc.err.expect(r"4 member\(s\) in the default room:")
    ana.proc.err.expect(r"^\*   ana \(you, port \d+, key [0-9a-f]{4}(-[0-9a-f]{4}){7}\)$")
    for pattern in (r"bob \(127\.0\.0\.1:\d+\) p2pchat", r"cida \(127\.0\.0\.1:\d+\) p2pchat", r"ref \(127\.0\.0\.1:\d+\) original"):
        ana.proc.err.saw(rf"^\*   {pattern}$")

    cid.say("/quit")
    assert cid.proc.wait() == 0
    for p in watchers:
        p.proc.err.saw(r"^\* cida \(127\.0\.0\.1:\d+\) left the room$")
    bob.proc.signal(signal.SIGKILL)
    bob.proc.wait()
    ana.proc.err.saw(r"^\* bob \(127\.0\.0\.1:\d+\) left \(")

    # Through all of that, the original peer got nothing but chat lines.
    received = b"".join(bytes.fromhex(json.loads(line)["hex"]) for line in (tmp_path / "ref.jsonl").read_text().splitlines())
    assert received == b"<cida> :: renamed", received


def test_joining_through_a_member_with_peer_reaches_the_whole_room(room):
    tracker = room.reference_tracker()
    ref = room.reference_peer("ref", tracker.port, "--reuseaddr")
    ana = room.p2pchat_peer("ana", tracker.port)
    ana.wait_connections(1)
    late = room.p2pchat_peer("late", 1, "--peer", f"127.0.0.1:{ana.listen_port}")
    late.wait_connections(1)
    # Ana names the original peer; late links to it, but shows it only once it says a line (a
    # silent port named by a member must tell that member nothing).
    ref.wait_connections(2)
    ref.say("oi from ref")
    late.got("ref", "oi from ref")
    late.wait_connections(2)
    late.say("/who")
    late.proc.err.saw(r"^\*   ana \(127\.0\.0\.1:\d+\) p2pchat$")
    late.proc.err.saw(r"^\*   ref \(127\.0\.0\.1:\d+\) original$")
    late.say("hi everyone")
    ana.got("late", "hi everyone")
    ref.got("late", "hi everyone")


@pytest.fixture
def lone_peer():
    with Tracker(host="127.0.0.1", port=0) as tracker, Peer("host", *tracker.address, history=0, data_dir=home("host")) as peer:
        yield peer


def test_a_version_mismatch_is_refused_clearly_and_the_peer_goes_on(lone_peer):
    with socket.create_connection(("127.0.0.1", lone_peer.address[1]), timeout=WAIT) as raw:
        raw.sendall(MAGIC + frame({"type": "hello", "v": 99, "id": "future", "name": "x", "room": ""}))
        assert raw.recv(len(MAGIC), socket.MSG_WAITALL) == MAGIC
        answer = read_frame(raw)
        assert answer["type"] == "error" and answer["code"] == "version" and "99" in answer["message"]
        assert raw.recv(1) == b"", "the link is closed after the refusal"
    event = lone_peer.recv_event(timeout=WAIT)
    assert isinstance(event, Notice) and "version 99" in event.text


@pytest.mark.parametrize("payload", [
    frame({"no": "type"}),
    struct.pack(">I", 5) + b"{bad}",
    struct.pack(">I", 2**31),
    frame({"type": "msg", "id": "x", "from": "x", "room": "", "ts": 0, "text": "before any hello"}),
])
def test_malformed_frames_close_the_link_not_the_peer(lone_peer, payload):
    with socket.create_connection(("127.0.0.1", lone_peer.address[1]), timeout=WAIT) as raw:
        raw.sendall(MAGIC + payload)
        try:
            assert raw.recv(4096) == b"", "the peer closes the link"
        except ConnectionResetError:
            pass
    # The peer still works: another member joins and talks.
    with Peer("other", server=None, peers=[("127.0.0.1", lone_peer.address[1])], data_dir=home("other")) as other:
        event = lone_peer.recv_event(timeout=WAIT)
        while not isinstance(event, PeerJoined):
            event = lone_peer.recv_event(timeout=WAIT)
        other.send("still fine")
        message = lone_peer.recv(timeout=WAIT)
        assert message is not None and message.text == "still fine"


def test_the_tracker_refuses_a_future_version_clearly():
    with Tracker(host="127.0.0.1", port=0) as tracker:
        with socket.create_connection(tracker.address, timeout=WAIT) as raw:
            raw.sendall(MAGIC + frame({"type": "hello", "v": 2, "id": "x", "room": ""}))
            assert raw.recv(len(MAGIC), socket.MSG_WAITALL) == MAGIC
            answer = read_frame(raw)
            assert answer["type"] == "error" and answer["code"] == "version"
        assert tracker.peers() == []


def test_long_and_back_to_back_messages_arrive_whole_and_separate():
    with Tracker(host="127.0.0.1", port=0) as tracker:
        host, port = tracker.address
        with Peer("ana", host, port, history=0, data_dir=home("ana")) as ana, Peer("bob", host, port, data_dir=home("bob")) as bob:
            assert isinstance(ana.recv_event(timeout=WAIT), PeerJoined)
            texts = ["x" * MAX_TEXT_BYTES, "short", "<bob> :: looks like a header", "é" * (MAX_TEXT_BYTES // 2)]
            texts += [f"line {i}" for i in range(200)]
            for text in texts:
                assert bob.send(text) == 1
            received = [ana.recv(timeout=WAIT) for _ in texts]
            assert [m.text for m in received] == texts
            assert all(not m.continued and m.id for m in received)
            assert len({m.id for m in received}) == len(texts)


def test_python_api_rooms_and_presence():
    with Tracker(host="127.0.0.1", port=0) as tracker:
        host, port = tracker.address
        with Peer("ana", host, port, room="red", history=0, data_dir=home("ana")) as ana, Peer("bob", host, port, room="red", data_dir=home("bob")) as bob, \
                Peer("cid", host, port, room="blue", data_dir=home("cid")) as cid:
            assert (ana.room, cid.room) == ("red", "blue")
            assert tracker.peers(room="red") == [(host, ana.address[1]), (host, bob.address[1])]
            assert tracker.peers() == []
            joined = ana.recv_event(timeout=WAIT)
            assert isinstance(joined, PeerJoined) and (joined.name, joined.protocol) == ("bob", "p2pchat")
            bob.nick("bobby")
            assert bob.name == "bobby"
            renamed = ana.recv_event(timeout=WAIT)
            assert (renamed.old, renamed.new) == ("bob", "bobby")
            assert cid.send("anyone in blue?") == 0
            bob.send("red")
            message = ana.recv(timeout=WAIT)
            assert isinstance(message, Message) and (message.sender, message.text) == ("bobby", "red")


def accept_and_read_hello(server: socket.socket) -> socket.socket:
    conn, _ = server.accept()
    conn.settimeout(WAIT)
    assert conn.recv(len(MAGIC), socket.MSG_WAITALL) == MAGIC
    assert read_frame(conn)["type"] == "hello"
    return conn


def test_a_refused_version_falls_back_to_the_original_protocol():
    """A newer peer refuses our hello; we redial and speak the original protocol with it."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(WAIT)
        with Peer("ana", server=None, peers=[server.getsockname()], history=0, data_dir=home("ana")) as ana:
            first = accept_and_read_hello(server)
            first.sendall(MAGIC + frame({"type": "error", "code": "version", "message": "I speak version 2"}))
            first.close()
            notices = [ana.recv_event(timeout=WAIT) for _ in range(2)]
            assert [type(n) for n in notices] == [Notice, Notice], notices
            assert "I speak version 2" in notices[0].text and "original protocol" in notices[1].text
            second, _ = server.accept()
            second.settimeout(WAIT)
            ana.send("plain again")
            assert second.recv(4096) == b"<ana> :: plain again", "only original bytes on the new link"
            second.close()


def test_a_message_id_is_shown_once():
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(WAIT)
        with Peer("ana", server=None, peers=[server.getsockname()], data_dir=home("ana")) as ana:
            conn = accept_and_read_hello(server)
            conn.sendall(MAGIC + frame({"type": "hello", "v": 1, "id": "raw-peer", "name": "raw", "room": "", "listen_port": 1}))
            repeated = {"type": "msg", "id": "same-id", "from": "raw", "room": "", "ts": 0, "text": "once"}
            conn.sendall(frame(repeated) + frame(repeated) + frame({**repeated, "id": "other-id", "text": "twice?"}))
            texts = [ana.recv(timeout=WAIT).text for _ in range(2)]
            assert texts == ["once", "twice?"]
            assert ana.recv(timeout=0.3) is None
            conn.close()
