"""The p2pchat tracker, with the original ``server.py``'s command line.

    python server.py                 # 0.0.0.0:7472, like the original
    python server.py --port 9000 -d  # another port, debug logs
"""

import argparse
import sys
from typing import Optional

from . import AddressInUse, P2PChatError, Tracker, __version__
from ._cli import Leave, handle_signals, invoked_as, port, setup_logging, signals_deferred, status

EXAMPLES = """\
examples:
  python server.py                    listen on every interface, port 7472 (the original's)
  python server.py --port 9000        another port; clients then use --port 9000
  python server.py --host 127.0.0.1   only this machine can join
"""


# The program's name as invoked (`server.py`, `p2pchat-server`, `p2pchat server`), set by `main`.
PROG = "server.py"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog=PROG,
        description="Run a p2pchat tracker. It only tells newcomers who is in the room; chat goes peer to peer.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: %(default)s, every interface)")
    parser.add_argument("-p", "--port", type=port, default=7472, help="port to listen on (default: %(default)s)")
    parser.add_argument("--registration-timeout", type=float, default=6.0, metavar="SECONDS",
                        help="drop a p2pchat peer that stopped pinging after this long (default: %(default)s)")
    parser.add_argument("--original-ttl", type=float, default=45.0, metavar="SECONDS",
                        help="probe an original peer nobody vouched for in this long, and drop it if the probe "
                             "fails (default: %(default)s)")
    parser.add_argument("--relay", action="store_true",
                        help="relay messages between p2pchat members that cannot reach each other (behind symmetric "
                             "NATs); off by default, so the tracker never carries a chat message")
    parser.add_argument("-d", "--debug", action="store_true", help="log every join")
    parser.add_argument("--version", action="version", version=f"p2pchat {__version__}")
    return parser


def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> int:
    global PROG
    PROG = invoked_as(prog, "server.py")
    args = build_parser().parse_args(argv)
    setup_logging(args.debug)
    handle_signals()
    try:
        tracker = Tracker(args.host, args.port, original_ttl=args.original_ttl,
                          registration_timeout=args.registration_timeout, relay=args.relay)
    except AddressInUse as err:
        print(f"{PROG}: {err} (use --port to choose another)", file=sys.stderr)
        return 1
    except (P2PChatError, ValueError) as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Leave):
        return 0
    try:
        host, bound_port = tracker.address
        status(f"p2pchat tracker listening on {host}:{bound_port} (Ctrl-C to stop)")
        if args.relay:
            status("relaying messages between p2pchat members that cannot reach each other (--relay)")
        tracker.serve_forever()
    except (KeyboardInterrupt, Leave):
        pass
    finally:
        with signals_deferred():
            tracker.stop()
            status("tracker stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
