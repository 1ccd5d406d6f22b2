"""Reference peer: behaves on the wire like the original asyncio ``client.py``, byte for byte.

Written from the protocol description in the project's issues (no original code):
- asks ``Escreva um nome: `` on stdin, keeps at most 40 characters, empty becomes ``Unknow``;
- picks a free port P, connects to the tracker from P, does ONE read of up to 2048 bytes, splits it on
  ``-`` (dropping empty parts) and each part on ``:``, closes, then listens on 0.0.0.0:P; if the connect
  fails or the read is empty it waits 5 s and tries again from the same P;
- dials every listed address one after another; dialled and accepted connections join one set;
- writes ``<NAME> :: text`` (no terminator) to every connection for each stdin line and prints
  ``<Eu> :: text``; prints every chunk it reads, decoded as UTF-8, as it arrives (a chunk that is not
  UTF-8 raises, which drops that connection, logged only under ``-d``); sends nothing else, ever.
- when stdin ends it stops sending and keeps running.

Deviations, for tests only, none of which changes a byte on the wire:
- ``--reuseaddr`` sets SO_REUSEADDR on the tracker socket, so it can listen on Linux under a tracker that
  does not reset the connection (the original cannot; see issue 2);
- ``--capture FILE`` appends every received chunk as a JSON line ``{"from": "ip:port", "hex": ...}``;
- ``-d`` logs its steps on stderr (``listening on P``, ``connection opened/accepted``, ``dropped``).
"""

import argparse
import asyncio
import json
import logging
import socket
import sys

log = logging.getLogger("original")
CONNECTIONS = set()


def capture(path, peer, data):
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"from": f"{peer[0]}:{peer[1]}", "hex": data.hex()}) + "\n")


async def serve_connection(reader, writer, capture_path):
    peer = writer.get_extra_info("peername")
    CONNECTIONS.add(writer)
    try:
        while True:
            data = await reader.read(2048)
            if not data:
                break
            capture(capture_path, peer, data)
            print(data.decode("utf-8"), flush=True)
    except Exception as err:  # noqa: BLE001 - the original drops the connection on any error
        log.debug("dropped %s:%s: %r", peer[0], peer[1], err)
    finally:
        CONNECTIONS.discard(writer)
        writer.close()
        log.debug("connection closed %s:%s", peer[0], peer[1])


async def ask_tracker(server, port, local_port, reuseaddr):
    loop = asyncio.get_running_loop()
    while True:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if reuseaddr:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setblocking(False)
        try:
            sock.bind(("0.0.0.0", local_port))
            local_port = sock.getsockname()[1]
            await loop.sock_connect(sock, (server, port))
            data = await loop.sock_recv(sock, 2048)
        except OSError as err:
            log.debug("tracker exchange failed: %r", err)
            data = b""
        sock.close()
        if data:
            log.debug("tracker answered %r", data)
            return local_port, data.decode("utf-8")
        await asyncio.sleep(5)


async def main(args):
    name = input("Escreva um nome: ")[:40] or "Unknow"
    local_port, answer = await ask_tracker(args.server, args.port, 0, args.reuseaddr)
    addresses = [part.split(":") for part in answer.split("-") if part]

    async def on_accept(reader, writer):
        peer = writer.get_extra_info("peername")
        log.debug("connection accepted from %s:%s", peer[0], peer[1])
        await serve_connection(reader, writer, args.capture)

    server = await asyncio.start_server(on_accept, "0.0.0.0", local_port)
    log.debug("listening on %s", local_port)
    tasks = [server]
    for host, port in addresses:
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
        except OSError as err:
            log.debug("cannot connect to %s:%s: %r", host, port, err)
            continue
        log.debug("connection opened to %s:%s", host, port)
        tasks.append(asyncio.ensure_future(serve_connection(reader, writer, args.capture)))

    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        text = line.rstrip("\n")
        for writer in list(CONNECTIONS):
            writer.write(f"<{name}> :: {text}".encode("utf-8"))
        print(f"<Eu> :: {text}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("-s", "--server", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, default=7472)
    parser.add_argument("-d", "--debug", action="store_true")
    parser.add_argument("--reuseaddr", action="store_true")
    parser.add_argument("--capture")
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s: %(message)s")
    try:
        asyncio.run(main(args))
    except KeyboardInterrupt:
        sys.exit(0)
