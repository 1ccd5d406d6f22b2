"""``client.py --json``: drive a peer with JSON lines, from any language.

Commands come one JSON object per line on stdin; every event and every answer goes out as one JSON
object per line on stdout (docs/cli.md lists every field). Logs go to stderr. A line that is not a
command gets an ``error`` object naming it, and the peer goes on.
"""

import json
import sys
import threading
from typing import Any, Callable, Optional

from . import HistorySynced, Message, Notice, P2PChatError, Peer, PeerClosed, PeerJoined, PeerLeft, PeerRenamed
from ._cli import say, signals_deferred


def emit(obj: dict[str, Any]) -> None:
    say(json.dumps(obj, ensure_ascii=False, separators=(",", ":")))


def address(value: Optional[tuple[str, int]]) -> Optional[list[Any]]:
    return list(value) if value is not None else None


def message_json(m: Message) -> dict[str, Any]:
    return {"type": "message", "sender": m.sender, "text": m.text, "address": address(m.address), "id": m.id,
            "sent_at": m.sent_at, "received_at": m.received_at, "stamp": m.stamp, "history": m.history, "signed": m.signed,
            "continued": m.continued}


def event_json(event: object) -> dict[str, Any]:
    """Every event the peer reports, as the JSON object ``--json`` prints for it."""
    if isinstance(event, Message):
        return message_json(event)
    if isinstance(event, PeerJoined):
        return {"type": "peer_joined", "address": address(event.address), "name": event.name,
                "protocol": event.protocol, "outgoing": event.outgoing, "relayed_by": address(event.relayed_by),
                "encrypted": event.encrypted, "fingerprint": event.fingerprint, "key_changed": event.key_changed}
    if isinstance(event, PeerLeft):
        return {"type": "peer_left", "address": address(event.address), "name": event.name,
                "reason": event.reason, "clean": event.clean}
    if isinstance(event, PeerRenamed):
        return {"type": "peer_renamed", "address": address(event.address), "old": event.old, "new": event.new}
    if isinstance(event, Notice):
        return {"type": "notice", "text": event.text}
    if isinstance(event, HistorySynced):
        return {"type": "history_synced", "received": event.received}
    return {"type": "unknown", "repr": repr(event)}


def pump(peer: Peer) -> None:
    while True:
        try:
            event = peer.recv_event()
        except PeerClosed:
            return
        if event is not None:
            emit(event_json(event))


def _send(peer: Peer, cmd: dict[str, Any]) -> dict[str, Any]:
    return {"type": "sent", "reached": peer.send(_text(cmd, "text"))}


def _nick(peer: Peer, cmd: dict[str, Any]) -> dict[str, Any]:
    peer.nick(_text(cmd, "name"))
    return {"type": "renamed", "name": peer.name}


def _who(peer: Peer, cmd: dict[str, Any]) -> dict[str, Any]:
    return {"type": "members", "members": [
        {"address": address(p.address), "name": p.name, "protocol": p.protocol, "outgoing": p.outgoing,
         "relayed_by": address(p.relayed_by), "encrypted": p.encrypted, "fingerprint": p.fingerprint,
         "key_changed": p.key_changed}
        for p in peer.peers()]}


def _history(peer: Peer, cmd: dict[str, Any]) -> dict[str, Any]:
    limit = cmd.get("limit", 100)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise ValueError('"limit" must be a whole number, 0 or more')
    before = cmd.get("before")
    if before is not None and (isinstance(before, bool) or not isinstance(before, (int, float))):
        raise ValueError('"before" must be a time in seconds since the epoch')
    return {"type": "history", "messages": [message_json(m) for m in peer.history(limit=limit, before=before)]}


def _text(cmd: dict[str, Any], field: str) -> str:
    value = cmd.get(field)
    if not isinstance(value, str):
        raise ValueError(f'"{field}" must be a string')
    return value


COMMANDS: dict[str, Callable[[Peer, dict[str, Any]], dict[str, Any]]] = {"send": _send, "nick": _nick, "who": _who, "history": _history}


def handle(peer: Peer, line: str) -> bool:
    """Run one command line; returns False for ``quit``."""
    if not line.strip():
        return True
    try:
        cmd = json.loads(line)
    except ValueError as err:
        emit({"type": "error", "message": f"not JSON: {err}", "input": line.rstrip("\n")})
        return True
    if not isinstance(cmd, dict) or not isinstance(cmd.get("cmd"), str):
        emit({"type": "error", "message": 'a command is an object with a "cmd" string', "input": line.rstrip("\n")})
        return True
    if cmd["cmd"] == "quit":
        return False

    def answer_with_id(answer: dict[str, Any]) -> None:
        if "id" in cmd:
            answer["id"] = cmd["id"]  # lets a driver match answers (errors too) to its commands
        emit(answer)

    run = COMMANDS.get(cmd["cmd"])
    if run is None:
        known = ", ".join(sorted([*COMMANDS, "quit"]))
        answer_with_id({"type": "error", "message": f"unknown command {cmd['cmd']!r}; known: {known}", "input": line.rstrip("\n")})
        return True
    try:
        answer = run(peer, cmd)
    except (ValueError, P2PChatError) as err:
        answer_with_id({"type": "error", "message": str(err), "input": line.rstrip("\n")})
        return True
    answer_with_id(answer)
    return True


def run(peer: Peer) -> None:
    """After the peer joined: print events, run commands from stdin until ``quit`` or its end, then
    close the peer and say ``closed``."""
    host, listen_port = peer.address or ("", 0)
    reached, listed = peer.join_result or (0, 0)
    emit({"type": "ready", "name": peer.name, "room": peer.room, "address": [host, listen_port],
          "reached": reached, "listed": listed, "fingerprint": peer.fingerprint})
    events = threading.Thread(target=pump, args=(peer,), name="p2pchat-json-events", daemon=True)
    events.start()
    try:
        for line in sys.stdin:
            if not handle(peer, line):
                return
    finally:
        with signals_deferred():
            peer.close()
            events.join(5)  # every event before the last object
            emit({"type": "closed"})
