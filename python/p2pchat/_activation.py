"""What p2pchat starts the first time a Tracker or Peer is made, and never at import.

Importing p2pchat starts no thread and registers no exit hook: a program that only imports it (for
the exceptions, the constants, or a type) pays nothing. The first ``Tracker`` or ``Peer`` calls
:func:`activate` (from its constructor in the Rust core), which starts the thread that forwards the
core's log records to :mod:`logging` and registers, with :mod:`atexit`, the closing of every live peer
and tracker before the interpreter finalizes, then the bridge's last drain.
"""

import atexit
import threading

from . import _core, _logbridge

_lock = threading.Lock()
_active = False


def activate() -> None:
    """Start the log bridge and register the exit hooks, once per process."""
    global _active
    with _lock:
        if _active:
            return
        _active = True
        _logbridge.start()
        # atexit runs handlers last-registered first: close every peer and tracker (letting queued
        # lines out), then stop the log bridge once their last records were forwarded.
        atexit.register(_logbridge.stop)
        atexit.register(_core._shutdown)
