"""The API reference is generated from the docstrings and the stubs (pdoc), here, so it cannot rot:
every public name has its entry, with its documentation."""

import re
import subprocess
import sys

import p2pchat
from harness import ROOT


def test_the_api_reference_builds_and_documents_every_public_name(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pdoc", "p2pchat", "p2pchat.callbacks", "-o", str(tmp_path)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr[-3000:]
    page = (tmp_path / "p2pchat.html").read_text()
    anchors = set(re.findall(r'id="([A-Za-z_][\w.]*)"', page))
    missing = [name for name in p2pchat.__all__ if name not in anchors and not name.startswith("__")]
    assert not missing, f"not in the reference: {missing}"
    for cls in (p2pchat.Peer, p2pchat.Tracker):
        methods = [m for m in dir(cls) if not m.startswith("_")]
        undocumented = [m for m in methods if f"{cls.__name__}.{m}" not in anchors]
        assert not undocumented, f"{cls.__name__} members missing from the reference: {undocumented}"
    # Every attribute and method of the public classes says what it is (pdoc shows an empty entry
    # otherwise).
    classes = [obj for obj in (getattr(p2pchat, n) for n in p2pchat.__all__) if isinstance(obj, type)]
    silent = [f"{cls.__name__}.{m}" for cls in classes for m in dir(cls)
              if not m.startswith("_") and not (getattr(cls, m).__doc__ or "").strip()
              and not issubclass(cls, BaseException)]
    assert not silent, f"without a docstring: {silent}"
    # The text is the docstrings': the Peer's says what join does.
    assert "asks the tracker" in page
    assert (tmp_path / "p2pchat" / "callbacks.html").exists()
