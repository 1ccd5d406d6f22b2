import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Room  # noqa: E402


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
