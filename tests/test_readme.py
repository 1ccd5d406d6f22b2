"""The README's quick start, as written, on a system Python that refuses global installs (PEP 668).

Its install runs as the README gives it, in a copy of the checkout (what a fresh clone holds), with
`python3` being the system's Python. The tracker it then starts, and the two users who join, run
in a network namespace of the test's own, so nothing listens beyond it.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from harness import ROOT
from netns import cannot_run, namespace  # noqa: F401 - fixture

SYSTEM_PYTHON = Path("/usr/bin/python3")

# A build of the Rust core from scratch, in release mode: minutes on 2 cores.
pytestmark = pytest.mark.timeout(1800)


def quick_start_command() -> str:
    """The first shell block after the README's "Quick start" heading."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Quick start"):]
    found = re.search(r"```sh\n(.+?)\n```", section, re.S)
    assert found, "no shell block in the quick start"
    return found.group(1).strip()


def test_the_quick_start_installs_and_chats_on_a_python_that_refuses_global_installs(namespace, tmp_path):  # noqa: F811
    ns = namespace
    stdlib = subprocess.run([str(SYSTEM_PYTHON), "-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"],
                            capture_output=True, text=True) if SYSTEM_PYTHON.exists() else None
    if stdlib is None or not (Path(stdlib.stdout.strip()) / "EXTERNALLY-MANAGED").exists():
        cannot_run(f"needs a system Python that refuses global installs at {SYSTEM_PYTHON} (Debian 12, Ubuntu 23.04+)")
    command = quick_start_command()
    install, run = command.rsplit(" && ", 1)
    assert run == "python server.py", f"the quick start no longer ends by starting the tracker: {command!r}"

    checkout = tmp_path / "p2pchat"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in filter(None, files.split("\0")):
        if (ROOT / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, checkout / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(SYSTEM_PYTHON)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", CARGO_TARGET_DIR=str(tmp_path / "target"))
    env.pop("VIRTUAL_ENV", None)
    installed = subprocess.run(["bash", "-c", install], cwd=checkout, env=env, capture_output=True, text=True, timeout=1700)
    assert installed.returncode == 0, f"{install!r} failed:\n{installed.stderr[-3000:]}"

    def in_the_venv(line: str, name: str):
        return ns.room.start(ns.argv(["bash", "-c", f"cd {checkout} && . .venv/bin/activate && exec {line}"]), name)

    tracker = in_the_venv(run, "tracker")
    tracker.err.expect(r"listening on 0\.0\.0\.0:7472")
    bob = in_the_venv("python client.py -n bob", "bob")
    bob.err.expect(r"joined as 'bob'")
    ana = in_the_venv("python client.py -n ana", "ana")
    ana.err.expect(r"joined as 'ana'.*connected to 1 of 1")
    ana.line("hello from the README")
    bob.out.expect(r"^<ana> :: hello from the README$")
