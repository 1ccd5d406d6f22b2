"""Type stubs for the compiled core (``p2pchat._core``)."""

from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence
from os import PathLike
from pathlib import Path
from types import TracebackType
from typing import (
    final,
)

__all__ = [
    "__version__",
    "DEFAULT_PORT",
    "MAX_NAME_CHARS",
    "MAX_TEXT_BYTES",
    "MAX_ROOM_CHARS",
    "Tracker",
    "Peer",
    "Message",
    "PeerJoined",
    "PeerLeft",
    "PeerRenamed",
    "Notice",
    "HistorySynced",
    "EventStream",
    "PeerInfo",
    "_shutdown",
    "default_data_dir",
    "new_invite_code",
    "_set_log_level",
    "_next_log_records",
    "_wake_log_bridge",
]

__version__: str
DEFAULT_PORT: int
MAX_NAME_CHARS: int
MAX_TEXT_BYTES: int
MAX_ROOM_CHARS: int

# The public names `p2pchat.Address` and `p2pchat.Event` are defined in `p2pchat/__init__.py`; these
# stub-only aliases say the same.
_Address = tuple[str, int]

def default_data_dir() -> Path: ...
def new_invite_code(room: str) -> str:
    """A new private room called `room`, under a random 256-bit key: its invite code, to give as `secret`."""

@final
class Message:
    """A chat message received from another member."""

    sender: str | None
    text: str
    address: _Address | None
    received_at: float
    continued: bool
    id: str | None
    sent_at: float | None
    stamp: int | None
    history: bool
    signed: bool

@final
class PeerJoined:
    """A member joined the room."""

    address: _Address
    name: str | None
    protocol: str
    outgoing: bool
    relayed_by: _Address | None
    encrypted: bool
    fingerprint: str | None
    key_changed: bool

@final
class PeerLeft:
    """A member left the room (clean: it said goodbye)."""

    address: _Address
    name: str | None
    reason: str
    clean: bool

@final
class PeerRenamed:
    """A member is known by a new name."""

    address: _Address
    old: str | None
    new: str

@final
class Notice:
    """Something the user should know that is not about one message."""

    text: str

@final
class HistorySynced:
    """The history asked for on join is in; live events follow."""

    received: int

@final
class PeerInfo:
    """A member this peer holds a connection to."""

    address: _Address
    name: str | None
    outgoing: bool
    protocol: str | None
    relayed_by: _Address | None
    encrypted: bool
    fingerprint: str | None
    key_changed: bool

_Event = Message | PeerJoined | PeerLeft | PeerRenamed | Notice | HistorySynced

@final
class EventStream:
    """Every event of a peer, blocking or async; it ends when the peer closes."""

    def __iter__(self) -> Iterator[_Event]: ...
    def __next__(self) -> _Event: ...
    def __aiter__(self) -> AsyncIterator[_Event]: ...
    def __anext__(self) -> Awaitable[_Event]: ...

@final
class Tracker:
    """A tracker speaking the original protocol, serving in the background from creation."""

    def __new__(
        cls, host: str = "0.0.0.0", port: int = 7472, *, original_ttl: float = 45.0, registration_timeout: float = 6.0,
        relay: bool = False,
    ) -> Tracker: ...
    @property
    def address(self) -> _Address: ...
    @property
    def running(self) -> bool: ...
    def peers(self, room: str = "") -> list[_Address]: ...
    def serve_forever(self) -> None: ...
    def stop(self) -> None: ...
    def __enter__(self) -> Tracker: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool: ...

@final
class Peer:
    """A chat peer; `join()` it to a room, then send and receive."""

    def __new__(
        cls,
        name: str,
        server: str | None = "127.0.0.1",
        port: int = 7472,
        *,
        listen: int | None = None,
        room: str = "",
        peers: Sequence[str | _Address] = (),
        max_message_rate: int | None = None,
        history: int = 100,
        data_dir: str | PathLike[str] | None = None,
        save_history: bool = True,
        identity: str | PathLike[str] | None = None,
        secret: str | None = None,
    ) -> Peer: ...
    @property
    def name(self) -> str: ...
    @property
    def room(self) -> str: ...
    def nick(self, name: str) -> None: ...
    def trust(self, name: str, fingerprint: str) -> None: ...
    def untrust(self, name: str) -> bool: ...
    @property
    def address(self) -> _Address | None: ...
    @property
    def join_result(self) -> tuple[int, int] | None: ...
    @property
    def fingerprint(self) -> str | None: ...
    @property
    def private(self) -> bool: ...
    @property
    def invite_code(self) -> str | None: ...
    @property
    def closed(self) -> bool: ...
    def join(self) -> Peer: ...
    def join_async(self) -> Awaitable[Peer]: ...
    def send(self, text: str) -> int: ...
    def post(self, text: str) -> None: ...
    def send_async(self, text: str) -> Awaitable[int]: ...
    def recv(self, timeout: float | None = None) -> Message | None: ...
    def recv_async(self) -> Awaitable[Message]: ...
    def recv_event(self, timeout: float | None = None) -> _Event | None: ...
    def recv_event_async(self) -> Awaitable[_Event]: ...
    def events(self) -> EventStream: ...
    def history(self, limit: int = 100, before: Message | float | None = None) -> list[Message]: ...
    def history_async(self, limit: int = 100, before: Message | float | None = None) -> Awaitable[list[Message]]: ...
    def peers(self) -> list[PeerInfo]: ...
    def status(self) -> tuple[int, str]: ...
    def close(self) -> None: ...
    def close_async(self) -> Awaitable[None]: ...
    def __iter__(self) -> Iterator[Message]: ...
    def __next__(self) -> Message: ...
    def __aiter__(self) -> Peer: ...
    def __anext__(self) -> Awaitable[Message]: ...
    def __enter__(self) -> Peer: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool: ...
    def __aenter__(self) -> Awaitable[Peer]: ...
    def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Awaitable[None]: ...

def _shutdown() -> None: ...
def _set_log_level(level: int) -> None: ...
def _next_log_records(wait: bool) -> list[tuple[str, int, str]]: ...
def _wake_log_bridge() -> None: ...
