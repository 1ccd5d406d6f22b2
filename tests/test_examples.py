"""Each program in examples/ against a real local room, as a real process."""

import signal

from harness import WAIT, python, wait_until
from p2pchat import Peer, PeerJoined, Tracker


def stop_with_ctrl_c(proc) -> None:
    proc.signal(signal.SIGINT)
    assert proc.wait() == 0
    assert not any("Traceback" in line for line in proc.err.snapshot()), proc.err.snapshot()


def wait_joined(peer: Peer, name: str) -> None:
    while True:
        event = peer.recv_event(timeout=WAIT)
        assert event is not None, f"{name} never joined"
        if isinstance(event, PeerJoined) and event.name == name:
            return


def test_the_echo_bot_answers(room, tmp_path):
    with Tracker(host="127.0.0.1", port=0) as tracker:
        host, port = tracker.address
        bot = room.start(python("examples/echo_bot.py", "--port", str(port)), "echo")
        bot.out.expect(r"echo listening on port \d+")
        with Peer("ana", host, port, data_dir=tmp_path / "ana", history=0) as ana:
            wait_joined(ana, "echo")
            ana.send("ping ☃")
            answer = ana.recv(timeout=WAIT)
            assert (answer.sender, answer.text) == ("echo", "ana said: ping ☃")
        stop_with_ctrl_c(bot)


def test_the_logger_writes_a_room_to_a_file(room, tmp_path):
    log = tmp_path / "dev.log"
    with Tracker(host="127.0.0.1", port=0) as tracker:
        host, port = tracker.address
        logger = room.start(python("examples/room_logger.py", str(log), "--room", "dev", "--port", str(port)), "logger")
        logger.out.expect("logging room 'dev'")
        with Peer("ana", host, port, room="dev", data_dir=tmp_path / "ana", history=0) as ana, \
                Peer("bob", host, port, room="other", data_dir=tmp_path / "bob") as bob:
            wait_joined(ana, "logger")
            ana.send("first")
            ana.send("second")
            bob.send("not in dev")
            wait_until(lambda: log.exists() and log.read_text().count("\n") == 2, "the logger wrote both lines")
        lines = log.read_text().splitlines()
        assert [line.split(" ", 2)[2] for line in lines] == ["<ana> first", "<ana> second"]
        stop_with_ctrl_c(logger)


def test_the_bridge_relays_both_ways(room, tmp_path):
    with Tracker(host="127.0.0.1", port=0) as tracker:
        host, port = tracker.address
        bridge = room.start(python("examples/bridge.py", "red", "blue", "--port", str(port)), "bridge")
        bridge.out.expect("bridging 'red' and 'blue'")
        with Peer("ana", host, port, room="red", data_dir=tmp_path / "ana", history=0) as ana, \
                Peer("bob", host, port, room="blue", data_dir=tmp_path / "bob", history=0) as bob:
            wait_joined(ana, "bridge")
            wait_joined(bob, "bridge")
            ana.send("hi blue")
            relayed = bob.recv(timeout=WAIT)
            assert (relayed.sender, relayed.text) == ("bridge", "[red] <ana> hi blue")
            bob.send("hi red")
            relayed = ana.recv(timeout=WAIT)
            assert (relayed.sender, relayed.text) == ("bridge", "[blue] <bob> hi red")
            assert ana.recv(timeout=0.5) is None, "nothing echoes back"
        stop_with_ctrl_c(bridge)
