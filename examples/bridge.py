"""Bridge: relays live messages between two rooms, each side marked with the room it came from.

    python examples/bridge.py red blue --port 7472
"""

import argparse
import threading

from p2pchat import Message, Peer


def relay(source: Peer, target: Peer) -> None:
    for event in source.events():  # ends when the peer closes
        if isinstance(event, Message) and not event.history:
            target.send(f"[{source.room}] <{event.sender or '?'}> {event.text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rooms", nargs=2)
    parser.add_argument("--server", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7472)
    args = parser.parse_args()
    one, two = (Peer("bridge", args.server, args.port, room=room, history=0) for room in args.rooms)
    with one, two:
        threading.Thread(target=relay, args=(one, two), daemon=True).start()
        print(f"bridging {args.rooms[0]!r} and {args.rooms[1]!r}", flush=True)
        relay(two, one)  # until Ctrl-C


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
