"""Type stubs for the compiled core (``p2pchat._core``)."""

from os import PathLike
from pathlib import Path
from types import TracebackType
from typing import Any, AsyncIterator, Awaitable, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Type, Union, final

__version__: str
DEFAULT_PORT: int
MAX_NAME_CHARS: int
MAX_TEXT_BYTES: int
MAX_ROOM_CHARS: int

Address = Tuple[str, int]

class P2PChatError(Exception):
    """Base class of every error p2pchat raises."""

class InvalidInput(P2PChatError):
    """A name or message that cannot be sent as given."""

class TrackerUnreachable(P2PChatError):
    """The tracker could not be found, reached, or gave no answer."""

class AddressInUse(P2PChatError):
    """The port to listen on is taken by another program."""

class PeerClosed(P2PChatError):
    """The peer was closed (or never joined)."""

class HistoryError(P2PChatError):
    """The message log on disk cannot be opened or used."""

class IdentityError(P2PChatError):
    """The identity file cannot be read or created."""

def default_data_dir() -> Path: ...

@final
class Message:
    """A chat message received from another member."""

    sender: Optional[str]
    text: str
    address: Optional[Address]
    received_at: float
    continued: bool
    id: Optional[str]
    sent_at: Optional[float]
    stamp: Optional[int]
    history: bool
    signed: bool

@final
class PeerJoined:
    """A member joined the room."""

    address: Address
    name: Optional[str]
    protocol: str
    outgoing: bool
    relayed_by: Optional[Address]
    encrypted: bool
    fingerprint: Optional[str]
    key_changed: bool

@final
class PeerLeft:
    """A member left the room (clean: it said goodbye)."""

    address: Address
    name: Optional[str]
    reason: str
    clean: bool

@final
class PeerRenamed:
    """A member is known by a new name."""

    address: Address
    old: Optional[str]
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

    address: Address
    name: Optional[str]
    outgoing: bool
    protocol: Optional[str]
    relayed_by: Optional[Address]
    encrypted: bool
    fingerprint: Optional[str]
    key_changed: bool

Event = Union[Message, PeerJoined, PeerLeft, PeerRenamed, Notice, HistorySynced]

@final
class EventStream:
    """Every event of a peer, blocking or async; it ends when the peer closes."""

    def __iter__(self) -> Iterator[Event]: ...
    def __next__(self) -> Event: ...
    def __aiter__(self) -> AsyncIterator[Event]: ...
    def __anext__(self) -> Awaitable[Event]: ...

@final
class Tracker:
    """A tracker speaking the original protocol, serving in the background from creation."""

    def __init__(
        self, host: str = "0.0.0.0", port: int = 7472, *, original_ttl: float = 45.0, registration_timeout: float = 6.0,
        relay: bool = False,
    ) -> None: ...
    @property
    def address(self) -> Address: ...
    @property
    def running(self) -> bool: ...
    def peers(self, room: str = "") -> List[Address]: ...
    def serve_forever(self) -> None: ...
    def stop(self) -> None: ...
    def __enter__(self) -> "Tracker": ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool: ...

@final
class Peer:
    """A chat peer; `join()` it to a room, then send and receive."""

    def __init__(
        self,
        name: str,
        server: Optional[str] = "127.0.0.1",
        port: int = 7472,
        *,
        listen: Optional[int] = None,
        room: str = "",
        peers: Sequence[Union[str, Address]] = (),
        max_message_rate: Optional[int] = None,
        history: int = 100,
        data_dir: Union[str, "PathLike[str]", None] = None,
        save_history: bool = True,
        identity: Union[str, "PathLike[str]", None] = None,
        secret: Optional[str] = None,
    ) -> None: ...
    @property
    def name(self) -> str: ...
    @property
    def room(self) -> str: ...
    def nick(self, name: str) -> None: ...
    @property
    def address(self) -> Optional[Address]: ...
    @property
    def join_result(self) -> Optional[Tuple[int, int]]: ...
    @property
    def fingerprint(self) -> Optional[str]: ...
    @property
    def private(self) -> bool: ...
    @property
    def invite_code(self) -> Optional[str]: ...
    @property
    def closed(self) -> bool: ...
    def join(self) -> "Peer": ...
    def join_async(self) -> Awaitable["Peer"]: ...
    def send(self, text: str) -> int: ...
    def post(self, text: str) -> None: ...
    def send_async(self, text: str) -> Awaitable[int]: ...
    def recv(self, timeout: Optional[float] = None) -> Optional[Message]: ...
    def recv_async(self) -> Awaitable[Message]: ...
    def recv_event(self, timeout: Optional[float] = None) -> Optional[Event]: ...
    def recv_event_async(self) -> Awaitable[Event]: ...
    def events(self) -> EventStream: ...
    def history(self, limit: int = 100, before: Union[Message, float, None] = None) -> List[Message]: ...
    def history_async(self, limit: int = 100, before: Union[Message, float, None] = None) -> Awaitable[List[Message]]: ...
    def peers(self) -> List[PeerInfo]: ...
    def status(self) -> Tuple[int, str]: ...
    def close(self) -> None: ...
    def close_async(self) -> Awaitable[None]: ...
    def __iter__(self) -> Iterator[Message]: ...
    def __next__(self) -> Message: ...
    def __aiter__(self) -> "Peer": ...
    def __anext__(self) -> Awaitable[Message]: ...
    def __enter__(self) -> "Peer": ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool: ...
    def __aenter__(self) -> Awaitable["Peer"]: ...
    def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> Awaitable[None]: ...

def _shutdown() -> None: ...
def _set_log_level(level: int) -> None: ...
def _next_log_records(wait: bool) -> List[Tuple[str, int, str]]: ...
def _wake_log_bridge() -> None: ...

# Benchmark instruments (benches/run.py): Rust load generators, not part of the chat API.
def _bench_tracker_joins(
    host: str,
    port: int,
    protocol: str,
    registrations: int,
    *,
    list_bytes: Optional[int] = None,
    concurrency: int = 4,
    duration: float = 2.0,
) -> Dict[str, float]: ...
def _bench_raw_list_server(
    list_bytes: int, on_listening: Callable[[int], object], *, host: str = "127.0.0.1", port: int = 0
) -> None: ...
def _bench_fanout(
    nodes: int, rate: int, message: bytes, *, duration: float = 2.0, drain: float = 2.0
) -> Dict[str, float]: ...
@final
class _BenchRawLinks:
    def __init__(self) -> None: ...
    def add(self, link: Any) -> None: ...
    def send(self, message: bytes) -> int: ...
    def take(self) -> Dict[str, Any]: ...
    def __len__(self) -> int: ...
