"""History: late joiners see the conversation, gaps are caught up once, every peer keeps a local log."""

import contextlib
import itertools
import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from harness import MAGIC, ROOT, WAIT, frame, home, python, read_frame, wait_until
from netns import namespace  # noqa: F401 - fixture
from p2pchat import HistoryError, HistorySynced, Message, Peer, Tracker
from p2pchat._core import MAX_TEXT_BYTES

HISTORY_LINE = r"^\[history \d{4}-\d\d-\d\d \d\d:\d\d\] "


def take_messages(peer: Peer, count: int, timeout: float = WAIT):
    """The next `count` messages (bounded wait for each)."""
    received = []
    for _ in range(count):
        message = peer.recv(timeout=timeout)
        assert message is not None, f"{peer.name}: only {len(received)} of {count} messages came"
        received.append(message)
    return received


def test_a_newcomer_sees_500_earlier_messages_in_the_same_order_as_every_member(tmp_path):
    with Tracker(host="127.0.0.1", port=0) as tracker:
        host, port = tracker.address
        with Peer("ana", host, port, data_dir=tmp_path / "ana") as ana, \
                Peer("bob", host, port, data_dir=tmp_path / "bob") as bob:
            assert isinstance(bob.recv_event(timeout=WAIT), HistorySynced)
            for i in range(250):
                ana.send(f"ana {i}")
                bob.send(f"bob {i}")
            take_messages(ana, 250)
            take_messages(bob, 250)

            with Peer("cid", host, port, data_dir=tmp_path / "cid", history=500) as cid:
                events = []
                while not isinstance(events[-1:] and events[-1], HistorySynced):
                    event = cid.recv_event(timeout=WAIT)
                    assert event is not None, f"cid got {len(events)} events, then nothing"
                    events.append(event)
                shown = [e for e in events if isinstance(e, Message)]
                assert events[-1].received == 500 == len(shown)
                assert all(m.history and m.id for m in shown)
                assert [m.text for m in shown if m.sender == "ana"] == [f"ana {i}" for i in range(250)]
                assert [m.text for m in shown if m.sender == "bob"] == [f"bob {i}" for i in range(250)]

                # Every member's log has the 500 in one order, the one cid was shown them in.
                order = [(m.stamp, m.id) for m in shown]
                assert order == sorted(order)
                for member in (ana, bob, cid):
                    logged = member.history(limit=1000)
                    assert [m.id for m in logged] == [m.id for m in shown], member.name
                # Paging back from a message gives the ones before it.
                assert [m.id for m in cid.history(limit=10, before=shown[100])] == [m.id for m in shown[90:100]]

                # Live messages come after the history, marked as live.
                ana.send("live now")
                live = cid.recv(timeout=WAIT)
                assert (live.text, live.history) == ("live now", False)


def test_live_messages_said_while_history_arrives_come_after_it(tmp_path):
    with Tracker(host="127.0.0.1", port=0) as tracker:
        host, port = tracker.address
        with Peer("ana", host, port, data_dir=tmp_path / "ana") as ana:
            for i in range(1500):
                ana.send(f"old {i}")
            with Peer("bob", host, port, data_dir=tmp_path / "bob", history=2000) as bob:
                # Live or (if ana had not seen bob's link yet) as history: either way once, last.
                ana.send("new")
                texts = [m.text for m in take_messages(bob, 1501)]
                assert texts == [f"old {i}" for i in range(1500)] + ["new"]
                assert bob.recv(timeout=0.5) is None


def test_a_restarted_client_shows_its_log_and_gets_what_it_missed_once(room):
    with Tracker(host="127.0.0.1", port=0) as tracker:
        port = tracker.address[1]
        ana = room.p2pchat_peer("ana", port)
        bob = room.p2pchat_peer("bob", port)
        bob.wait_connections(1)
        for i in range(5):
            ana.say(f"before {i}")
        bob.got_all([("ana", f"before {i}") for i in range(5)])
        bob.proc.signal(signal.SIGKILL)
        bob.proc.wait()
        ana.proc.err.saw(r"^\* bob \(.*\) left \(")
        for i in range(5):
            ana.say(f"while away {i}")

        again = room.p2pchat_peer("bob", port)  # the same name: the same data directory
        # Its own log, then the room's catch-up: each line once, as history (checked again when the
        # room stops, so a copy that came later counts too).
        earlier = [("ana", f"before {i}") for i in range(5)] + [("ana", f"while away {i}") for i in range(5)]
        again.got_all(earlier, history=True)
        again.proc.err.saw(r"earlier message\(s\) received from the room")
        ana.say("live again")
        again.got("ana", "live again")
        lines = again.proc.out.snapshot()
        before = [lines.index(next(line for line in lines if line.endswith(f":: before {i}"))) for i in range(5)]
        away = [lines.index(next(line for line in lines if line.endswith(f":: while away {i}"))) for i in range(5)]
        assert before + away == sorted(before + away), "shown in the order they were said"


def logged_texts(data: Path) -> list[str]:
    """The texts in the message log of the user whose data directory is `data`."""
    with contextlib.closing(sqlite3.connect(data / "history.sqlite3", timeout=WAIT)) as db:
        return [text for (text,) in db.execute("SELECT text FROM messages")]


def test_a_client_alone_shows_its_own_log_after_a_clean_exit_and_after_a_kill(room):
    """Nobody else is online when bob comes back, so what it shows as history can only come from its
    own log: after a clean exit, and after a kill that came once the log batch was written."""
    with Tracker(host="127.0.0.1", port=0) as tracker:
        port = tracker.address[1]

        def alone_again():
            wait_until(lambda: tracker.peers() == [], "nobody is listed")
            return room.p2pchat_peer("bob", port)  # the same name: the same data directory

        ana, bob = room.p2pchat_peer("ana", port), room.p2pchat_peer("bob", port)
        bob.wait_connections(1)
        ana.say("said before a clean exit")
        bob.got("ana", "said before a clean exit")
        for proc in (bob.proc, ana.proc):
            proc.line("/quit")
            assert proc.wait() == 0
        bob = alone_again()
        bob.got("ana", "said before a clean exit", history=True)

        ana = room.p2pchat_peer("ana", port)
        bob.wait_connections(1)
        ana.say("said before a kill")
        bob.got("ana", "said before a kill")
        wait_until(lambda: "said before a kill" in logged_texts(home("bob")), "bob's log batch holds the line")
        bob.proc.signal(signal.SIGKILL)
        bob.proc.wait()
        ana.proc.line("/quit")
        assert ana.proc.wait() == 0
        bob = alone_again()
        bob.got_all([("ana", "said before a clean exit"), ("ana", "said before a kill")], history=True)


def test_no_history_writes_no_message_log_to_disk(room, tmp_path):
    with Tracker(host="127.0.0.1", port=0) as tracker:
        port = tracker.address[1]
        data = tmp_path / "nothing-here"
        ana = room.p2pchat_peer("ana", port, "--no-history", "--data-dir", str(data))
        with Peer("bob", "127.0.0.1", port, save_history=False, data_dir=data) as bob:
            ana.wait_connections(1)
            bob.send("not for the disk")
            ana.saw_line(r"^<bob> :: not for the disk$")
            ana.say("nor this")
            assert bob.recv(timeout=WAIT).text == "nor this"
            # This session's messages are still kept, in memory.
            assert [m.text for m in bob.history()] == ["not for the disk", "nor this"]
        kept = sorted(p.name for p in data.rglob("*")) if data.exists() else []
        assert kept in ([], ["identity.json"]), kept  # the user's key pair, not a message log


def test_a_line_sent_just_before_the_client_exits_is_in_its_log(tmp_path):
    """The log writes in batches on a timer; leaving writes the last batch, so a client that sends a
    line and exits at once (a script's `--exit-on-eof`) still has it on disk."""
    data = tmp_path / "ana"
    with Tracker(host="127.0.0.1", port=0) as tracker:
        sent = subprocess.run(python("client.py", "--port", str(tracker.address[1]), "--name", "ana", "--data-dir", str(data), "--exit-on-eof"),
                              cwd=ROOT, input="last words\n", capture_output=True, text=True, timeout=WAIT * 2)
    assert sent.returncode == 0, sent.stderr
    texts = logged_texts(data)
    assert texts == ["last words"], texts


def test_a_corrupt_log_gives_a_clear_error_and_a_way_forward(room, tmp_path):
    data = tmp_path / "broken"
    data.mkdir()
    garbage = b"not a database\n" * 500
    (data / "history.sqlite3").write_bytes(garbage)
    with Tracker(host="127.0.0.1", port=0) as tracker:
        host, port = tracker.address
        with pytest.raises(HistoryError, match="history.sqlite3.*--no-history"):
            Peer("ana", host, port, data_dir=data).join()

        proc = room.start(python("client.py", "--port", str(port), "--name", "bob", "--data-dir", str(data)), "bob")
        assert proc.wait() == 1
        proc.err.saw(r"^client\.py: cannot open the history file .*history\.sqlite3: .*--no-history")
        assert not any("Traceback" in line for line in proc.err.snapshot())
        assert (data / "history.sqlite3").read_bytes() == garbage, "the file is left as it was"

        # The way forward it names works.
        room.p2pchat_peer("bob", port, "--data-dir", str(data), "--no-history")
        not_a_dir = tmp_path / "a-file"
        not_a_dir.write_text("")
        with pytest.raises(HistoryError, match="cannot create the history directory"):
            Peer("cid", host, port, data_dir=not_a_dir / "sub", identity=tmp_path / "cid.json").join()


def test_history_answers_are_bounded_in_size_and_rate(tmp_path):
    """A member asked for history again and again answers with at most its newest 10,000 messages, and
    only while its 16 MiB allowance for that link lasts; the allowance comes back with time. (How fast
    it refills, 1 MiB/s, is checked in virtual time: sync.rs's answer-budget test.)"""
    text = "h" * 1000
    with Tracker(host="127.0.0.1", port=0) as tracker, \
            Peer("ana", *tracker.address, data_dir=tmp_path / "ana", history=0) as ana:
        for i in range(12_000):
            ana.send(f"{i:05d} {text}")
        wait_until(lambda: ana.history(limit=1)[0].text.startswith("11999"), "ana logged every message")
        with socket.create_connection(("127.0.0.1", ana.address[1]), timeout=WAIT) as raw:
            raw.sendall(MAGIC + frame({"type": "hello", "v": 1, "id": "greedy", "name": "greedy", "room": ""}))
            assert raw.recv(len(MAGIC), socket.MSG_WAITALL) == MAGIC
            assert read_frame(raw)["type"] == "hello"
            answers: dict[int, list] = {}  # req -> messages

            def ask(first_req: int, count: int) -> None:
                """Ask `count` times at once; wait until every one was answered."""
                for req in range(first_req, first_req + count):
                    raw.sendall(frame({"type": "history_request", "req": req, "limit": 1_000_000_000}))
                pending = set(range(first_req, first_req + count))
                while pending:
                    message = read_frame(raw)
                    if message["type"] != "history":
                        continue
                    answers.setdefault(message["req"], []).extend(message["msgs"])
                    if not message["more"]:
                        pending.discard(message["req"])

            ask(0, 40)  # all at once: ~10 MB each, so the allowance runs out within the first two
            first = [m["text"][:5] for m in answers[0]]
            assert first == [f"{i:05d}" for i in range(2000, 12_000)], "the newest 10,000, oldest first"
            answered = {r: len(m) for r, m in answers.items() if m}
            assert len(answered) <= 3, f"the allowance did not stop a burst of asks: {answered}"
            assert all(len(m) <= 10_000 for m in answers.values())
            # Then one ask after another, as fast as answered: empty answers (each smaller than its
            # ask) until the allowance has come back, then messages again.
            deadline = time.monotonic() + WAIT
            for req in itertools.count(40):
                ask(req, 1)
                if answers[req]:
                    break
                assert time.monotonic() < deadline, f"no answer with messages after {req - 39} more asks"


def test_a_history_answer_never_exceeds_the_frame_limit(tmp_path):
    with Tracker(host="127.0.0.1", port=0) as tracker:
        host, port = tracker.address
        with Peer("ana", host, port, data_dir=tmp_path / "ana") as ana:
            big = ["é" * (MAX_TEXT_BYTES // 2) for _ in range(20)]  # 1.3 MB: many frames
            for text in big:
                ana.send(text)
            with Peer("bob", host, port, data_dir=tmp_path / "bob") as bob:
                assert [m.text for m in take_messages(bob, 20)] == big


def test_a_peer_cut_off_for_a_while_catches_up_once(namespace):
    """An outage drops every packet between two clients for longer than they wait for a silent link.
    What each typed meanwhile reaches the other once the link is back, once, marked as history."""
    ns = namespace
    ana, ana_port, bob, bob_port = ns.two_clients()
    bob.line("before the outage")
    ana.out.expect(r"^<bob> :: before the outage$")
    ns.outage(bob_port, ana_port)
    bob.line("during the outage")  # written to a link that is already dead, unknowingly
    ana.line("ana during the outage")
    ana.err.expect(r"^\* bob \(127\.0\.0\.1:\d+\) left \((silent for|read failed)", timeout=15)
    bob.err.expect(r"^\* ana \(127\.0\.0\.1:\d+\) left \((silent for|read failed)", timeout=15)
    bob.line("after bob noticed")  # written to nobody
    ns.end_outage()
    ana.err.expect(r"^\* bob \(127\.0\.0\.1:\d+\) joined \(p2pchat\)$", timeout=30)
    ana.out.saw(HISTORY_LINE + r"<bob> :: after bob noticed$")
    ana.out.saw(HISTORY_LINE + r"<bob> :: during the outage$")
    bob.out.saw(HISTORY_LINE + r"<ana> :: ana during the outage$")
    bob.line("live again")
    ana.out.saw(r"^<bob> :: live again$")
    for proc, texts in ((ana, ["during the outage", "after bob noticed", "before the outage"]), (bob, ["ana during the outage"])):
        lines = proc.out.snapshot()
        for text in texts:
            assert sum(line.endswith(f":: {text}") for line in lines) == 1, (proc.name, text, lines)


def test_original_lines_are_kept_in_the_own_log_but_never_served(tmp_path):
    """An original peer's line reaches each p2pchat peer separately and has no id: each keeps it in
    its own log, and none serves it to a newcomer (which would show it under a second id)."""
    with Tracker(host="127.0.0.1", port=0) as tracker:
        host, port = tracker.address
        with Peer("ana", host, port, data_dir=tmp_path / "ana", history=0) as ana:
            with socket.create_connection(("127.0.0.1", ana.address[1]), timeout=WAIT) as original:
                original.sendall(b"<orig> :: said the old way")
                heard = ana.recv(timeout=WAIT)
                assert (heard.sender, heard.text, heard.id) == ("orig", "said the old way", None)
                ana.send("said the new way")
                logged = ana.history()
                assert [(m.sender, m.text) for m in logged] == [("orig", "said the old way"), ("ana", "said the new way")]
                assert logged[0].id is None and logged[0].stamp < logged[1].stamp

                with Peer("bob", host, port, data_dir=tmp_path / "bob") as bob:
                    events = [bob.recv_event(timeout=WAIT)]
                    while not isinstance(events[-1], HistorySynced):
                        events.append(bob.recv_event(timeout=WAIT))
                    texts = [e.text for e in events if isinstance(e, Message)]
                    assert texts == ["said the new way"] and events[-1].received == 1
                # The original peer got the line, and not one byte of history.
                assert original.recv(4096) == b"<ana> :: said the new way"


def test_a_member_slow_to_send_history_does_not_hold_the_room_back(tmp_path):
    """The join waits a few seconds for the first part of the history; after that the room's live
    events flow, and history that comes later is still shown, as history."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(WAIT)
        with Peer("ana", server=None, peers=[server.getsockname()], data_dir=tmp_path / "ana") as ana:
            member, _ = server.accept()
            member.settimeout(WAIT)
            assert member.recv(len(MAGIC), socket.MSG_WAITALL) == MAGIC
            assert read_frame(member)["type"] == "hello"
            member.sendall(MAGIC + frame({"type": "hello", "v": 1, "id": "slow", "name": "slow", "room": "",
                                          "listen_port": server.getsockname()[1]}))
            request = read_frame(member)
            if request["type"] == "summary":  # what ana holds of the last minutes (nothing): skip it
                assert request["buckets"] == []
                request = read_frame(member)
            assert request["type"] == "history_request" and request["limit"] == 100
            member.sendall(frame({"type": "msg", "id": "live1", "from": "slow", "room": "", "ts": 1, "text": "live"}))
            events = [ana.recv_event(timeout=WAIT)]
            while not isinstance(events[-1], HistorySynced):
                events.append(ana.recv_event(timeout=WAIT))
            assert events[-1].received == 0, "released before any history came"
            live = ana.recv(timeout=WAIT)
            assert (live.text, live.history) == ("live", False)
            old = {"id": "old1", "from": "slow", "room": "", "ts": 1, "hlc": 1 << 16, "text": "said long ago"}
            member.sendall(frame({"type": "history", "req": request["req"], "msgs": [old], "more": False}))
            late = ana.recv(timeout=WAIT)
            assert (late.text, late.history) == ("said long ago", True)
            member.close()
