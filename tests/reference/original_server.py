"""Reference tracker: behaves on the wire like the original asyncio ``server.py``, byte for byte.

Written from the protocol description in the project's issues (no original code). On every accepted
connection it writes the ``ip:port`` of every connection it accepted before, joined by ``-`` (or a lone
``-``), then remembers this one's address. It never reads, never closes a connection itself (asyncio
closes its side when the client closes), never forgets an address, and sends the whole list however long.

Deviation for tests only: ``--port`` (default 7472) and ``--host``; it prints ``listening on PORT``.
"""

import argparse
import asyncio
import sys

ADDRESSES = []


class Tracker(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        host, port = transport.get_extra_info("peername")[:2]
        transport.write(("-".join(ADDRESSES) or "-").encode("utf-8"))  # type: ignore[attr-defined]
        ADDRESSES.append(f"{host}:{port}")

    def data_received(self, data: bytes) -> None:
        pass  # the original never reads what clients send


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=7472)
    args = parser.parse_args()
    server = await asyncio.get_running_loop().create_server(Tracker, args.host, args.port)
    print(f"listening on {server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
