"""Callbacks, for programs that prefer them to loops over ``peer.events()``."""

import logging
import threading
from typing import Callable, Optional

from ._core import Message, Peer

_log = logging.getLogger("p2pchat.callbacks")


def listen(
    peer: Peer,
    on_message: Optional[Callable[[Message], object]] = None,
    on_event: Optional[Callable[[object], object]] = None,
    *,
    background: bool = True,
) -> Optional[threading.Thread]:
    """Call ``on_message(message)`` for every message and ``on_event(event)`` for every other event
    (joins, leaves, renames, notices, ``HistorySynced``) until the peer closes.

    With ``background=True`` (the default) this runs in a daemon thread, which is returned; otherwise it
    runs here and returns when the peer closes. A callback that raises is logged and the next event is
    still delivered.
    """

    def deliver() -> None:
        for event in peer.events():
            try:
                if isinstance(event, Message):
                    if on_message is not None:
                        on_message(event)
                elif on_event is not None:
                    on_event(event)
            except Exception:
                _log.exception("a p2pchat callback raised on %r", event)

    if not background:
        deliver()
        return None
    thread = threading.Thread(target=deliver, name=f"p2pchat-callbacks-{peer.name}", daemon=True)
    thread.start()
    return thread
