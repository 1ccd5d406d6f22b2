"""Room logger: appends every message of a room to a text file, one line each (callbacks).

    python examples/room_logger.py chat.log --room dev --port 7472
"""

import argparse
import time

from p2pchat import Peer
from p2pchat.callbacks import listen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file")
    parser.add_argument("--server", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7472)
    parser.add_argument("--room", default="")
    args = parser.parse_args()
    with open(args.file, "a", encoding="utf-8") as out, Peer("logger", args.server, args.port, room=args.room) as peer:

        def write(message) -> None:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(message.sent_at or message.received_at))
            out.write(f"{when} <{message.sender or '?'}> {message.text}\n")
            out.flush()

        print(f"logging room {args.room!r} to {args.file}", flush=True)
        listen(peer, on_message=write, background=False)  # until Ctrl-C


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
