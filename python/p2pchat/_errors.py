"""The errors p2pchat raises: one hierarchy under `P2PChatError`, each class also the builtin a caller
would catch without knowing p2pchat (`except ValueError`, `except ConnectionError`, `except OSError`).

They are defined here, in Python, because a class can have two bases only here; the Rust core raises
these very classes (`pyo3::import_exception!` in `src/py/mod.rs`). They print as `p2pchat.X`.
"""

__all__ = [
    "P2PChatError",
    "InvalidInput",
    "TrackerUnreachable",
    "AddressInUse",
    "PeerClosed",
    "HistoryError",
    "IdentityError",
]


class P2PChatError(Exception):
    """Base class of every error p2pchat raises."""


class InvalidInput(P2PChatError, ValueError):
    """A value that cannot be used as given: a name, a message, a room, an address, a setting."""


class TrackerUnreachable(P2PChatError, ConnectionError):
    """The tracker could not be found, reached, or gave no answer."""


class AddressInUse(P2PChatError, OSError):
    """The port to listen on is taken by another program."""


class PeerClosed(P2PChatError):
    """The peer was closed (or never joined)."""


class HistoryError(P2PChatError, OSError):
    """The message log on disk cannot be opened or used."""


class IdentityError(P2PChatError, OSError):
    """The identity file, or the file of known keys, cannot be read or written."""


for _error in (P2PChatError, InvalidInput, TrackerUnreachable, AddressInUse, PeerClosed, HistoryError, IdentityError):
    _error.__module__ = "p2pchat"
del _error
