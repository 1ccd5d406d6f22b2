"""Rooms across home routers (issue 9), on the test bed of tests/natbed.py."""

import re
import time

import pytest
from harness import REFERENCE, REFERENCE_PROMPT, python, wait_until
from natbed import bed, run  # noqa: F401 - fixture


def start_tracker(bed, host, *extra: str):
    tracker = bed.start(host, python("server.py", "--host", "0.0.0.0", "--port", "7472", "-d", *extra), "tracker")
    tracker.err.expect("listening on")
    return tracker


def start_client(bed, host, name: str, tracker_ip: str, *extra: str, env=None):
    proc = bed.start(host, python("client.py", "--server", tracker_ip, "--name", name, "--history", "0", "-d", *extra), name, env)
    port = int(proc.err.expect(r"listening on port (\d+)", timeout=30).group(1))
    return proc, port


def chat_both_ways(ana, bob, text: str) -> None:
    """Ana says `text`, Bob answers: each sees the other's line."""
    ana.line(text)
    bob.out.saw(rf"^<ana> :: {re.escape(text)}$")
    bob.line("and back")
    ana.out.saw(r"^<bob> :: and back$")


# Issue 23's targets: the first lines within about 2 s behind symmetric routers, a direct link within
# 3 s behind port-preserving ones. Measured from the second peer's start, the build before relay-first
# took 10.1 s and 3.07 s (its first dial had to time out, after 3 s, before anything else was tried);
# this one takes ~1.1 s for both. The bounds leave room for a loaded CI machine and still fail the old
# build. What runs measured is in docs/nat.md (`-s` prints each run's figure).
DIRECT_LINK_BOUND = 2.5
FIRST_LINES_BOUND = 3.0


@pytest.mark.parametrize("run", range(10))  # ten fresh beds: the punch must not be luck
def test_two_peers_behind_port_preserving_routers_get_a_direct_link(bed, run):
    public = bed.public_host()
    ana_home, bob_home = bed.nat_host("preserving"), bed.nat_host("preserving")
    tracker = start_tracker(bed, public)
    ana, ana_port = start_client(bed, ana_home, "ana", public.ip)
    started = time.monotonic()
    bob, bob_port = start_client(bed, bob_home, "bob", public.ip)
    # Bob cannot dial Ana through her router; the tracker has both dial each other at once, as soon
    # as Bob's first dial has gone unanswered for a second.
    bob.err.saw(rf"^\* ana \({re.escape(ana_home.public_ip)}:{ana_port}\) joined \(p2pchat\)$", timeout=30)
    took = time.monotonic() - started
    print(f"direct link {took:.2f} s after bob started")
    assert took < DIRECT_LINK_BOUND, f"the direct link came {took:.2f} s after bob started"
    tracker.err.saw(rf"asking {re.escape(ana_home.public_ip)}:{ana_port} to dial {re.escape(bob_home.public_ip)}:{bob_port}", timeout=30)
    ana.err.saw(rf"^\* bob \({re.escape(bob_home.public_ip)}:{bob_port}\) joined \(p2pchat\)$", timeout=30)
    chat_both_ways(ana, bob, "hello through two routers")
    # Direct: the link's far end is the other's router, at the other's listening port.
    ana.line("/who")
    ana.err.saw(rf"^\*   bob \({re.escape(bob_home.public_ip)}:{bob_port}\) p2pchat$")


def test_an_original_peer_on_the_public_side_chats_with_peers_behind_routers(bed):
    """What the original design gives: the original client, which joined first, is dialled by the
    p2pchat peers behind routers (outgoing connections pass), and then everyone chats."""
    public, original_host = bed.public_host(), bed.public_host()
    ana_home, bob_home = bed.nat_host("preserving"), bed.nat_host("preserving")
    start_tracker(bed, public)
    ref = bed.start(original_host, python(str(REFERENCE / "original_client.py"), "--server", public.ip, "-d"), "ref")
    ref.line("ref")
    ref.err.expect(r"listening on (\d+)")
    ana, _ = start_client(bed, ana_home, "ana", public.ip)
    bob, _ = start_client(bed, bob_home, "bob", public.ip)
    ana.err.saw(r"^\* .* joined \(original\)$", timeout=30)
    bob.err.saw(r"^\* .* joined \(original\)$", timeout=30)
    ref.line("oi from the open internet")
    for proc in (ana, bob):
        proc.out.saw(r"^<ref> :: oi from the open internet$")
    ana.line("hello ref")
    ref.out.saw(rf"^(?:{re.escape(REFERENCE_PROMPT)})?<ana> :: hello ref$")


def relayed_join(proc, name: str, relay_ip: str, timeout: float = 45):
    return proc.err.saw(rf"^\* {name} \(.*\) joined \(p2pchat, relayed by {re.escape(relay_ip)}:\d+\)$", timeout=timeout)


def symmetric_pair_and_a_public_member(bed):
    """A tracker and "rel" on the public side, "ana" and "bob" each behind a symmetric router."""
    public, relay_host = bed.public_host(), bed.public_host()
    ana_home, bob_home = bed.nat_host("symmetric"), bed.nat_host("symmetric")
    start_tracker(bed, public)
    rel, _ = start_client(bed, relay_host, "rel", public.ip)
    ana, _ = start_client(bed, ana_home, "ana", public.ip)
    bob, _ = start_client(bed, bob_home, "bob", public.ip)
    return relay_host, rel, ana, bob


def test_peers_behind_symmetric_routers_talk_through_a_relay(bed):
    """A symmetric NAT picks a new port per destination, so neither dial nor punch can reach it; the
    member on the public side that both reach relays, and every message is shown once."""
    relay_host, rel, ana, bob = symmetric_pair_and_a_public_member(bed)
    relayed_join(bob, "ana", relay_host.ip)
    relayed_join(ana, "bob", relay_host.ip)
    rel.err.saw(r"relaying between", timeout=5)
    for n in range(3):
        ana.line(f"ana through the relay {n}")
        bob.line(f"bob through the relay {n}")
    for n in range(3):
        bob.out.saw(rf"^<ana> :: ana through the relay {n}$")
        ana.out.saw(rf"^<bob> :: bob through the relay {n}$")
        rel.out.saw(rf"^<ana> :: ana through the relay {n}$")
    # Shown once: a later line arrives after any duplicate would have.
    ana.line("the end")
    bob.out.saw(r"^<ana> :: the end$")
    assert bob.out.count(r"^<ana> :: ana through the relay \d$") == 3
    bob.line("/who")
    bob.err.saw(rf"^\*   ana \(.*\) p2pchat, relayed by {re.escape(relay_host.ip)}:\d+$")


def test_lines_typed_before_the_relay_opens_still_arrive(bed):
    """Two peers behind symmetric routers, and a public member. Both start typing at once, long before
    their relay is set up (their dials, then the punch, must fail first): each line still reaches the
    other side exactly once, live or caught up through the relay once it opens. (Before anti-entropy,
    none of the lines typed before the relay opened ever arrived.)"""
    _, _, ana, bob = symmetric_pair_and_a_public_member(bed)
    for n in range(10):
        ana.line(f"ana early {n}")
        bob.line(f"bob early {n}")
    for n in range(10):
        bob.out.saw(rf"^(\[history [^]]*\] )?<ana> :: ana early {n}$", timeout=60)
        ana.out.saw(rf"^(\[history [^]]*\] )?<bob> :: bob early {n}$", timeout=60)
    ana.line("the end")
    bob.out.saw(r"^<ana> :: the end$")
    bob.line("the end")
    ana.out.saw(r"^<bob> :: the end$")
    assert bob.out.count(r"^(\[history [^]]*\] )?<ana> :: ana early \d$") == 10
    assert ana.out.count(r"^(\[history [^]]*\] )?<bob> :: bob early \d$") == 10


@pytest.mark.parametrize("run", range(3))
def test_peers_behind_symmetric_routers_exchange_their_first_lines_within_seconds(bed, run):
    """Bob starts and types at once (his line waits in his stdin until his prompt is there); Ana types
    at the same moment. A relay is asked for after 1 s while the dials go on, so each first line
    arrives within seconds of Bob's start, not after every dial failed."""
    public, relay_host = bed.public_host(), bed.public_host()
    ana_home, bob_home = bed.nat_host("symmetric"), bed.nat_host("symmetric")
    start_tracker(bed, public)
    start_client(bed, relay_host, "rel", public.ip)
    ana, _ = start_client(bed, ana_home, "ana", public.ip)
    started = time.monotonic()
    bob = bed.start(bob_home, python("client.py", "--server", public.ip, "--name", "bob", "--history", "0", "-d"), "bob")
    bob.line("bob, the moment he started")
    ana.line("ana, the moment bob started")
    for receiver, line in ((ana, "<bob> :: bob, the moment he started"), (bob, "<ana> :: ana, the moment bob started")):
        receiver.out.saw(rf"^(\[history [^]]*\] )?{re.escape(line)}$", timeout=30)
        took = time.monotonic() - started
        print(f"{line!r} shown {took:.2f} s after bob started")
        assert took < FIRST_LINES_BOUND, f"{line!r} was shown {took:.2f} s after bob started"
    ana.line("the end")
    bob.out.saw(r"^<ana> :: the end$")
    assert ana.out.count(r"<bob> :: bob, the moment he started$") == 1
    assert bob.out.count(r"<ana> :: ana, the moment bob started$") == 1


def test_a_room_mixing_public_cone_and_symmetric_peers_delivers_everything(bed):
    """Four members: on the public side, behind a port-preserving router, and two behind symmetric
    routers. Every line reaches the three others exactly once, however each pair is linked."""
    public, open_host = bed.public_host(), bed.public_host()
    cone_home, sym1_home, sym2_home = bed.nat_host("preserving"), bed.nat_host("symmetric"), bed.nat_host("symmetric")
    start_tracker(bed, public)
    names = ["pub", "cone", "sym1", "sym2"]
    procs = {}
    for name, host in zip(names, [open_host, cone_home, sym1_home, sym2_home]):
        procs[name], _ = start_client(bed, host, name, public.ip)
    # The symmetric peers reach the cone peer, and each other, only through a relay.
    relayed_join(procs["sym2"], "sym1", open_host.ip)
    for name in ("sym1", "sym2"):
        relayed_join(procs[name], "cone", open_host.ip)
    for name in names:
        procs[name].line("/who")
        for other in names:
            if other != name:
                procs[name].err.saw(rf"^\*   {other} \(")
    for name in names:
        for n in range(5):
            procs[name].line(f"{name} says {n}")
    for name in names:
        procs[name].line(f"{name} is done")
    for receiver in names:
        for sender in names:
            if sender != receiver:
                procs[receiver].out.saw(rf"^<{sender}> :: {sender} is done$", timeout=30)
        for sender in names:
            if sender != receiver:
                assert procs[receiver].out.count(rf"^<{sender}> :: {sender} says \d$") == 5, (receiver, sender)


def test_two_symmetric_peers_alone_talk_through_a_tracker_that_relays(bed):
    """Nobody in common to relay: the tracker does, because its operator said --relay."""
    public = bed.public_host()
    ana_home, bob_home = bed.nat_host("symmetric"), bed.nat_host("symmetric")
    tracker = start_tracker(bed, public, "--relay")
    ana, _ = start_client(bed, ana_home, "ana", public.ip)
    bob, _ = start_client(bed, bob_home, "bob", public.ip)
    relayed_join(bob, "ana", public.ip)
    relayed_join(ana, "bob", public.ip)
    tracker.err.saw(r"relaying between", timeout=5)
    chat_both_ways(ana, bob, "hello via the tracker")
    bob.line("/who")
    bob.err.saw(r"^\* 2 member\(s\) in the default room:$")
    bob.err.saw(rf"^\*   ana \(.*\) p2pchat, relayed by {re.escape(public.ip)}:7472$")


def test_a_private_room_goes_through_the_trackers_relay_sealed(bed):
    """The same for a private room: the tracker passes on sealed messages it cannot read, and learns
    no name. Members take nothing but sealed messages from it, so it names and lists nobody: each
    sees the other's lines, signed, and no join through the tracker."""
    public = bed.public_host()
    ana_home, bob_home = bed.nat_host("symmetric"), bed.nat_host("symmetric")
    tracker = start_tracker(bed, public, "--relay")
    env = {"P2PCHAT_SECRET": "correct horse battery staple"}
    ana, _ = start_client(bed, ana_home, "ana", public.ip, "--room", "plans", env=env)
    bob, _ = start_client(bed, bob_home, "bob", public.ip, "--room", "plans", env=env)
    tracker.err.saw(r"relaying between", timeout=45)
    chat_both_ways(ana, bob, "sealed for the tracker")
    assert not any("ana" in line or "bob" in line or "plans" in line for line in tracker.err.snapshot())
    for proc in (ana, bob):
        assert not any("relayed by" in line for line in proc.err.snapshot()), "the tracker listed a member"


def split(bed, side: list, other: list) -> None:
    """Nothing from the hosts of `other` reaches those of `side`: dropped on arrival, so the sender
    sees no error, only silence, as when a link between two networks fails. (Called both ways.) The
    tracker's host stays reachable from both."""
    others = ", ".join(h.ip for h in other)
    for host in side:
        ruleset = f"""
table inet split {{
    chain input {{ type filter hook input priority 0; policy accept; ip saddr {{ {others} }} drop; }}
}}
"""
        run(["ip", "netns", "exec", host.ns, "nft", "-f", "-"], stdin=ruleset)


def heal(hosts: list) -> None:
    for host in hosts:
        run(["ip", "netns", "exec", host.ns, "nft", "delete", "table", "inet", "split"])


def test_a_split_room_heals_and_every_member_has_every_line_once(bed):
    """A room of 6 is split 3 | 3 long enough for every link across to die, each side talks, and the
    split heals: every member then has every line once, the other side's marked as caught up."""
    tracker_host = bed.public_host()
    start_tracker(bed, tracker_host)
    hosts = [bed.public_host() for _ in range(6)]
    names = [f"m{i}" for i in range(6)]
    procs = [start_client(bed, host, name, tracker_host.ip)[0] for host, name in zip(hosts, names)]
    for proc in procs:
        wait_until(lambda proc=proc: proc.err.count(r"^\* m\d \(.*\) joined \(p2pchat\)$") == 5, "a full mesh", timeout=30)
    left, right = hosts[:3], hosts[3:]
    split(bed, left, right)
    split(bed, right, left)
    split_at = time.monotonic()
    for proc in procs:  # every link across is noticed dead (silent for 8 s, or the kernel's timeout)
        wait_until(lambda proc=proc: proc.err.count(r"^\* m\d \(.*\) left \(") >= 3, "the split is felt", timeout=30)
    for i, proc in enumerate(procs):
        for n in range(2):
            proc.line(f"{names[i]} during the split {n}")
    for i, proc in enumerate(procs):  # each side hears its own side live
        for j in range(6):
            if j != i and (j < 3) == (i < 3):
                proc.out.saw(rf"^<{names[j]}> :: {names[j]} during the split 1$")
    # The split lasts 20 s, whatever else happened meanwhile: its length is the condition tested.
    time.sleep(max(0.0, 20 - (time.monotonic() - split_at)))
    heal(hosts)
    for i, proc in enumerate(procs):
        for j in range(6):
            if j == i:
                continue
            for n in range(2):
                marked = r"\[history [^]]*\] " if (j < 3) != (i < 3) else ""
                proc.out.saw(rf"^{marked}<{names[j]}> :: {names[j]} during the split {n}$", timeout=60)
    for proc in procs:  # a last line from each: any duplicate would have come by then
        proc.line(f"{proc.name} is done")
    for i, proc in enumerate(procs):
        for j in range(6):
            if j != i:
                # Live, or caught up if its author's link to this member was not back yet.
                proc.out.saw(rf"^(\[history [^]]*\] )?<{names[j]}> :: {names[j]} is done$", timeout=30)
                assert proc.out.count(rf"<{names[j]}> :: {names[j]} during the split \d$") == 2, (names[i], names[j])
