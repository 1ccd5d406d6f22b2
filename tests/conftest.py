import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Room  # noqa: E402

# The tests press Ctrl-C (SIGINT) on the programs they start, as a user at a terminal does. A test run
# started in the background (`cmd &` in a script, some CI agents) has SIGINT ignored, and its children
# would inherit that: Python then installs no KeyboardInterrupt handler and Ctrl-C does nothing. With a
# handler here instead, they start with SIGINT at its default, as a terminal's programs do.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
    """Each test's peers (in this process and the clients it starts) log history in a directory of its
    own, never in the user's."""
    path = tmp_path / "p2pchat-data"
    monkeypatch.setenv("P2PCHAT_DATA_DIR", str(path))
    return path


@pytest.fixture
def room():
    r = Room()
    yield r
    r.stop_all()
