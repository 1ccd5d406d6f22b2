"""A small internet on one machine, for tests across home routers (issue 9's test bed).

Network namespaces: a "public" bridge (10.77.0.0/24) and any number of hosts. A public host sits on the
bridge. A NATed host sits behind a router of its own: the router's WAN leg is on the bridge, its LAN leg
leads to the host (192.168.N.0/24). Each router masquerades LAN → WAN, either port-preserving (as most home
routers: a port-restricted cone NAT) or with random ports (a symmetric NAT); it forwards only established
flows inward and drops unsolicited packets to itself, as a home router does.

Needs root (CAP_NET_ADMIN), `ip` and `nft`; `bed` skips with the reason where they are missing. Everything
it creates (namespaces, their interfaces, the processes started in them) is removed when the test ends,
failed or not.
"""

import subprocess
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import pytest
from harness import Proc, Room
from netns import cannot_run, require_netns

PUBLIC_NET = "10.77.0"


@dataclass
class Host:
    ns: str
    ip: str  # its own address (private, behind a router)
    public_ip: str  # where the public side sees it: its own address, or its router's
    nat: Optional[str]  # None, "preserving" or "symmetric"


class NatBed:
    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:5]
        self.namespaces: list[str] = []
        self.room = Room()
        self.count = 0
        self.bridge = self._namespace("pub")
        self._ip(self.bridge, "link", "add", "br0", "type", "bridge")
        self._ip(self.bridge, "link", "set", "br0", "up")

    # -- plumbing -------------------------------------------------------------------------------
    def _namespace(self, role: str) -> str:
        name = f"p2pnat-{self.tag}-{role}"
        run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        return name

    def _ip(self, ns: str, *args: str) -> None:
        run(["ip", "-n", ns, *args])

    def _wire(self, a_ns: str, a_name: str, b_ns: str, b_name: str) -> None:
        """A veth pair between two namespaces (created with unique names, then renamed inside)."""
        self.count += 1
        left, right = f"v{self.tag}{self.count}a", f"v{self.tag}{self.count}b"
        run(["ip", "link", "add", left, "type", "veth", "peer", "name", right])
        run(["ip", "link", "set", left, "netns", a_ns])
        run(["ip", "link", "set", right, "netns", b_ns])
        self._ip(a_ns, "link", "set", left, "name", a_name)
        self._ip(b_ns, "link", "set", right, "name", b_name)
        self._ip(a_ns, "link", "set", a_name, "up")
        self._ip(b_ns, "link", "set", b_name, "up")

    def _on_bridge(self, ns: str, ifname: str, ip: str) -> None:
        port = f"p{self.count + 1}"  # the bridge's side of the next wire
        self._wire(ns, ifname, self.bridge, port)
        self._ip(self.bridge, "link", "set", port, "master", "br0")
        self._ip(ns, "addr", "add", f"{ip}/24", "dev", ifname)

    # -- hosts ----------------------------------------------------------------------------------
    def public_host(self) -> Host:
        n = len(self.namespaces)
        ns = self._namespace(f"h{n}")
        ip = f"{PUBLIC_NET}.{10 + n}"
        self._on_bridge(ns, "eth0", ip)
        return Host(ns, ip, ip, None)

    def nat_host(self, nat: str = "preserving") -> Host:
        """A host behind a router of its own; `nat` is "preserving" or "symmetric"."""
        assert nat in ("preserving", "symmetric"), nat
        n = len(self.namespaces)
        router, host = self._namespace(f"r{n}"), self._namespace(f"h{n + 1}")
        wan_ip, lan_net = f"{PUBLIC_NET}.{10 + n}", f"192.168.{n}"
        self._on_bridge(router, "wan", wan_ip)
        self._wire(router, "lan", host, "eth0")
        self._ip(router, "addr", "add", f"{lan_net}.1/24", "dev", "lan")
        self._ip(host, "addr", "add", f"{lan_net}.2/24", "dev", "eth0")
        self._ip(host, "route", "add", "default", "via", f"{lan_net}.1")
        run(["ip", "netns", "exec", router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        masquerade = "masquerade" if nat == "preserving" else "masquerade random,fully-random"
        ruleset = f"""
table ip nat {{
    chain postrouting {{
        type nat hook postrouting priority 100; policy accept;
        oifname "wan" {masquerade}
    }}
}}
table inet home {{
    chain forward {{
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
        iifname "lan" oifname "wan" accept
    }}
    chain input {{
        type filter hook input priority 0; policy drop;
        ct state established,related accept
        iifname "lan" accept
        iifname "lo" accept
    }}
}}
"""
        run(["ip", "netns", "exec", router, "nft", "-f", "-"], stdin=ruleset)
        return Host(host, f"{lan_net}.2", wan_ip, nat)

    # -- processes ------------------------------------------------------------------------------
    def start(self, host: Host, argv: Sequence[str], name: str, env: Optional[dict] = None) -> Proc:
        return self.room.start(["ip", "netns", "exec", host.ns, *argv], name, env)

    def delete(self) -> None:
        self.room.stop_all()
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def run(argv: Sequence[str], stdin: str = "") -> None:
    done = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"{' '.join(argv)} failed: {done.stderr.strip()}"


@pytest.fixture
def bed():
    require_netns("nft")
    probe = subprocess.run(["ip", "netns", "add", f"p2pnat-probe-{uuid.uuid4().hex[:5]}"], capture_output=True, text=True)
    if probe.returncode != 0:
        cannot_run(f"cannot create a network namespace: {probe.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", probe.args[-1]], capture_output=True)
    built = NatBed()
    try:
        yield built
    finally:
        built.delete()
