"""Forward the Rust core's log records to Python's :mod:`logging`.

Rust never calls Python from its own threads; it queues records, and this thread drains them into
``logging.getLogger("p2pchat.<module>")``. It also tells Rust the effective level of the ``p2pchat``
logger, so ``logging.getLogger("p2pchat").setLevel(logging.DEBUG)`` (or ``basicConfig``) is all it takes
to see debug logs, even after import.
"""

import logging
import threading
from typing import Optional

from . import _core

_POLL_SECONDS = 0.2


class _Bridge(threading.Thread):
    def __init__(self) -> None:
        super().__init__(name="p2pchat-log-bridge", daemon=True)
        self.stop_requested = threading.Event()

    def run(self) -> None:
        root = logging.getLogger("p2pchat")
        level: Optional[int] = None
        while True:
            current = root.getEffectiveLevel()
            if current != level:
                _core._set_log_level(current)
                level = current
            stopping = self.stop_requested.is_set()
            for name, record_level, message in _core._next_log_records(0.0 if stopping else _POLL_SECONDS):
                logging.getLogger(name).log(record_level, message)
            if stopping:
                return


_bridge: Optional[_Bridge] = None


def sync_level() -> None:
    """Apply the ``p2pchat`` logger's level to Rust now, rather than within the next poll."""
    _core._set_log_level(logging.getLogger("p2pchat").getEffectiveLevel())


def start() -> None:
    global _bridge
    if _bridge is None:
        _bridge = _Bridge()
        _bridge.start()


def stop() -> None:
    """Forward what is queued, then end the thread (called at exit)."""
    if _bridge is not None:
        _bridge.stop_requested.set()
        _bridge.join(timeout=2)
