"""Echo bot: answers every live message in the room with the same text (asyncio).

    python examples/echo_bot.py --server 127.0.0.1 --port 7472
"""

import argparse
import asyncio

from p2pchat import Message, Peer


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7472)
    parser.add_argument("--name", default="echo")
    args = parser.parse_args()
    async with Peer(args.name, args.server, args.port, history=0) as bot:
        print(f"{args.name} listening on port {bot.address[1]}", flush=True)
        async for event in bot.events():
            if isinstance(event, Message) and not event.history and event.sender:
                await bot.send_async(f"{event.sender} said: {event.text}")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
