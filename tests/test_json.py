"""`client.py --json`: two peers driven entirely through JSON lines."""

import json

from harness import python


def json_peer(room, name: str, tracker_port: int):
    proc = room.start(python("client.py", "--json", "--name", name, "--port", str(tracker_port)), name)
    ready = json.loads(proc.out.expect(r'^\{"type":"ready"').string)
    assert ready["name"] == name and ready["room"] == "" and ready["address"][1] > 0
    return proc


def next_object(proc, type_: str) -> dict:
    """The next stdout object of this type (every line before it must be JSON too)."""
    return json.loads(proc.out.expect(rf'^\{{"type":"{type_}"').string)


def command(proc, **cmd) -> None:
    proc.line(json.dumps(cmd))


def test_two_peers_chat_through_json_lines(room):
    tracker = room.p2pchat_tracker()
    ana = json_peer(room, "ana", tracker.port)
    bob = json_peer(room, "bob", tracker.port)
    joined = next_object(ana, "peer_joined")
    assert (joined["name"], joined["protocol"]) == ("bob", "p2pchat")
    assert next_object(bob, "history_synced") == {"type": "history_synced", "received": 0}

    command(bob, cmd="send", text="hello ana ☃", id="c1")
    assert next_object(bob, "sent") == {"type": "sent", "reached": 1, "id": "c1"}
    message = next_object(ana, "message")
    assert (message["sender"], message["text"], message["history"]) == ("bob", "hello ana ☃", False)
    assert message["id"] and message["stamp"] and message["address"][1] > 0

    command(bob, cmd="nick", name="bobby")
    assert next_object(bob, "renamed") == {"type": "renamed", "name": "bobby"}
    renamed = next_object(ana, "peer_renamed")
    assert (renamed["old"], renamed["new"]) == ("bob", "bobby")
    command(ana, cmd="who")
    members = next_object(ana, "members")["members"]
    assert [(m["name"], m["protocol"]) for m in members] == [("bobby", "p2pchat")]
    command(ana, cmd="history", limit=10)
    assert [m["text"] for m in next_object(ana, "history")["messages"]] == ["hello ana ☃"]

    # Mistakes get an error object naming the input, and the peer goes on.
    ana.line("this is not json")
    assert next_object(ana, "error")["input"] == "this is not json"
    # A failing command's answer carries its id, as a successful one's does, so a driver can match it.
    command(ana, cmd="send", text="", id="e1")
    error = next_object(ana, "error")
    assert "empty" in error["message"] and error["id"] == "e1"
    command(ana, cmd="teleport", id=2)
    error = next_object(ana, "error")
    assert "unknown command 'teleport'" in error["message"] and error["id"] == 2
    command(ana, cmd="history", limit=-1)
    error = next_object(ana, "error")
    assert "limit" in error["message"] and "id" not in error

    command(bob, cmd="quit")
    assert next_object(bob, "closed") == {"type": "closed"}
    assert bob.wait() == 0
    left = next_object(ana, "peer_left")
    assert (left["name"], left["clean"]) == ("bobby", True)
    ana.close_stdin()  # the end of the commands closes the peer too
    next_object(ana, "closed")
    assert ana.wait() == 0
    for proc in (ana, bob):
        for line in proc.out.snapshot():
            assert isinstance(json.loads(line), dict), line


def test_json_mode_needs_a_name_and_reports_fatal_errors_as_json(room):
    proc = room.start(python("client.py", "--json"), "nameless")
    assert proc.wait() == 2
    proc.err.saw(r"--json needs --name")
    taken = room.start(python("client.py", "--json", "-n", "x", "--port", "1", "--listen", "0", "--room", "a" * 65), "bad-room")
    assert taken.wait() == 2
    error = json.loads(taken.out.expect(r'^\{"type":"error"').string)
    assert error["fatal"] is True and "room" in error["message"]
