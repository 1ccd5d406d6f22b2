"""``p2pchat``: the tracker and the client under one command (also ``python -m p2pchat``).

    p2pchat --version
    p2pchat server [server.py's options]
    p2pchat client [client.py's options]
"""

import argparse
import sys
from typing import Optional

from . import __version__, client, server
from ._cli import invoked_as

EXAMPLES = """\
examples:
  p2pchat server                    run a tracker on port 7472 (as python server.py)
  p2pchat client -n ana             join the room through the tracker on this machine
  p2pchat client --help             every client option
"""


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=invoked_as(None, "p2pchat"), description="Peer-to-peer group chat.", epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"p2pchat {__version__}")
    parser.add_argument("command", choices=("server", "client"), help="run the tracker, or join a room")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the command's own options")
    args = parser.parse_args(argv)
    return (server.main if args.command == "server" else client.main)(args.options, prog=f"{parser.prog} {args.command}")


if __name__ == "__main__":
    sys.exit(main())
