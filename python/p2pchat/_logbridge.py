"""Forward the Rust core's log records to Python's :mod:`logging`.

Rust never calls Python from its own threads; it queues records, and this thread drains them into
``logging.getLogger("p2pchat.<module>")``, sleeping until one comes. Rust is told the effective level of
the ``p2pchat`` logger whenever a level changes anywhere in :mod:`logging` (``setLevel``,
``basicConfig``, ``dictConfig``, ``disable``), so ``logging.getLogger("p2pchat").setLevel(logging.DEBUG)``
is all it takes to see debug logs, even after import, and disabled levels cost Rust one comparison.
"""

import logging
import threading
from typing import Optional

from . import _core

_LOGGER = logging.getLogger("p2pchat")


class _Bridge(threading.Thread):
    def __init__(self) -> None:
        super().__init__(name="p2pchat-log-bridge", daemon=True)
        self.stop_requested = threading.Event()

    def run(self) -> None:
        while True:
            stopping = self.stop_requested.is_set()
            for name, record_level, message in _core._next_log_records(wait=not stopping):
                logging.getLogger(name).log(record_level, message)
            if stopping:
                return


_bridge: Optional[_Bridge] = None


def sync_level() -> None:
    """Apply the ``p2pchat`` logger's effective level to Rust."""
    _core._set_log_level(_LOGGER.getEffectiveLevel())


def _follow_level_changes() -> None:
    # Every level change in `logging` empties its managers' cache of enabled levels through this
    # method; following it costs nothing between changes (a polling thread woke every process).
    manager = logging.Logger.manager
    clear_cache = manager._clear_cache  # type: ignore[attr-defined]  # CPython's, not in the stubs

    def clear_cache_and_sync() -> None:
        clear_cache()
        sync_level()

    manager._clear_cache = clear_cache_and_sync  # type: ignore[attr-defined]


def start() -> None:
    global _bridge
    if _bridge is None:
        _follow_level_changes()
        sync_level()
        _bridge = _Bridge()
        _bridge.start()


def stop() -> None:
    """Forward what is queued, then end the thread (called at exit)."""
    if _bridge is not None:
        _bridge.stop_requested.set()
        _core._wake_log_bridge()
        _bridge.join(timeout=2)
