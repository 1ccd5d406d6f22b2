import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Room  # noqa: E402


@pytest.fixture
def room():
    r = Room()
    yield r
    r.stop_all()
