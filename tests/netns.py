"""Network namespaces created by a test for itself: isolated loopback, own firewall, removed afterwards.

Needs root (CAP_NET_ADMIN), iproute2's `ip` and, for firewall rules, `nft` (.ci/run installs both).
Tests that need them skip with the reason when they cannot run, except in CI (`CI` set), where not
running them is a failure: a green CI run has run every one of them.
"""

import os
import shutil
import subprocess
import uuid
from collections.abc import Sequence

import pytest
from harness import Proc, Room, python


def cannot_run(reason: str) -> None:
    """This test cannot run here: a skip on a developer's machine, a failure in CI."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the network-namespace tests, but this one cannot: {reason}")
    pytest.skip(reason)


def require_netns(*tools: str) -> None:
    if os.geteuid() != 0:
        cannot_run("needs root to create a network namespace")
    for tool in ("ip", *tools):
        if shutil.which(tool) is None:
            cannot_run(f"needs `{tool}` (Debian package {'nftables' if tool == 'nft' else 'iproute2'})")


class Namespace:
    """One namespace with loopback up; processes started in it are stopped before it is deleted."""

    def __init__(self) -> None:
        self.name = f"p2pchat-test-{uuid.uuid4().hex[:8]}"
        created = subprocess.run(["ip", "netns", "add", self.name], capture_output=True, text=True)
        if created.returncode != 0:
            cannot_run(f"cannot create a network namespace: {created.stderr.strip()}")
        self.room = Room()
        self.sh("ip", "link", "set", "lo", "up")

    def sh(self, *argv: str, stdin: str = "") -> str:
        done = subprocess.run(["ip", "netns", "exec", self.name, *argv], input=stdin, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"{' '.join(argv)} failed: {done.stderr}"
        return done.stdout

    def nft(self, ruleset: str) -> None:
        self.sh("nft", "-f", "-", stdin=ruleset)

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def two_clients(self) -> tuple[Proc, int, Proc, int]:
        """A tracker on 7472 and two clients, bob then ana, linked: (ana, ana_port, bob, bob_port)."""
        tracker = self.room.start(self.argv(python("server.py", "--host", "127.0.0.1", "--port", "7472")), "tracker")
        tracker.err.expect("listening on")
        bob = self.room.start(self.argv(python("client.py", "--name", "bob")), "bob")
        bob_port = int(bob.err.expect(r"listening on port (\d+)").group(1))
        ana = self.room.start(self.argv(python("client.py", "--name", "ana")), "ana")
        ana_port = int(ana.err.expect(r"listening on port (\d+); connected to 1 of 1").group(1))
        bob.err.expect(r"^\* ana \(127\.0\.0\.1:\d+\) joined \(p2pchat\)$")
        return ana, ana_port, bob, bob_port

    def outage(self, *ports: int) -> None:
        """Lose every packet to or from these ports (no FIN, no reset) until `end_outage`."""
        listed = ", ".join(map(str, ports))
        self.nft(f"""
table inet outage {{
    chain output {{
        type filter hook output priority 0; policy accept;
        tcp sport {{ {listed} }} drop
        tcp dport {{ {listed} }} drop
    }}
}}
""")

    def end_outage(self) -> None:
        self.sh("nft", "delete", "table", "inet", "outage")

    def delete(self) -> None:
        self.room.stop_all()
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


@pytest.fixture
def namespace():
    require_netns("nft")
    ns = Namespace()
    try:
        yield ns
    finally:
        ns.delete()
