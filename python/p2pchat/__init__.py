"""p2pchat: peer-to-peer group chat.

A tiny tracker tells a newcomer who is in the room; the newcomer connects to every member directly and
every line goes straight from its author to each peer. The wire protocol is the original asyncio
scripts', byte for byte, so original and p2pchat peers chat in one room.

Blocking use::

    from p2pchat import Tracker, Peer
    with Tracker(host="127.0.0.1", port=0) as tracker, \\
         Peer("ana", *tracker.address) as ana, Peer("bob", *tracker.address) as bob:
        ana.send("hello")
        print(bob.recv(timeout=5))

asyncio use::

    async with Peer("ana", "127.0.0.1", 7472) as ana:
        await ana.send_async("hello")
        async for message in ana:
            print(message.sender, message.text)
"""

from typing import Union

from ._core import (
    DEFAULT_PORT,
    MAX_NAME_CHARS,
    MAX_ROOM_CHARS,
    MAX_TEXT_BYTES,
    EventStream,
    HistorySynced,
    Message,
    Notice,
    Peer,
    PeerInfo,
    PeerJoined,
    PeerLeft,
    PeerRenamed,
    Tracker,
    __version__,
    default_data_dir,
    new_invite_code,
)
from ._errors import (
    AddressInUse,
    HistoryError,
    IdentityError,
    InvalidInput,
    P2PChatError,
    PeerClosed,
    TrackerUnreachable,
)

# What `Peer.address`, `Message.address` and the tracker's lists hold: (host, port).
Address = tuple[str, int]
# Everything `Peer.recv_event()` and `Peer.events()` give.
Event = Union[Message, PeerJoined, PeerLeft, PeerRenamed, Notice, HistorySynced]

__all__ = [
    "Address",
    "Event",
    "DEFAULT_PORT",
    "MAX_NAME_CHARS",
    "MAX_ROOM_CHARS",
    "MAX_TEXT_BYTES",
    "AddressInUse",
    "EventStream",
    "HistoryError",
    "HistorySynced",
    "IdentityError",
    "InvalidInput",
    "Message",
    "Notice",
    "P2PChatError",
    "Peer",
    "PeerClosed",
    "PeerInfo",
    "PeerJoined",
    "PeerLeft",
    "PeerRenamed",
    "Tracker",
    "TrackerUnreachable",
    "__version__",
    "default_data_dir",
    "new_invite_code",
]

# Importing starts nothing: the first Tracker or Peer starts the log bridge and registers the exit
# hooks (`_activation`).
