"""The NAT test bed itself (tests/natbed.py) behaves like the routers it stands for."""

import subprocess

from harness import python
from natbed import bed  # noqa: F401 - fixture

SERVER = ("import socket, sys\n"
          "s = socket.create_server(('0.0.0.0', int(sys.argv[1])))\n"
          "print('ready', flush=True)\n"
          "c, a = s.accept()\n"
          "print('from', a[0], a[1], flush=True)\n")
CLIENT = ("import socket, sys\n"
          "s = socket.socket()\n"
          "s.bind(('0.0.0.0', int(sys.argv[3])))\n"
          "s.settimeout(float(sys.argv[4]))\n"
          "try:\n"
          "    s.connect((sys.argv[1], int(sys.argv[2])))\n"
          "    print('connected', flush=True)\n"
          "except OSError as err:\n"
          "    print('failed', err, flush=True)\n")


def seen_from(bed, server_host, client_host, local_port: int):
    server = bed.start(server_host, python("-c", SERVER, "7000"), "server")
    server.out.expect("ready")
    client = bed.start(client_host, python("-c", CLIENT, server_host.public_ip, "7000", str(local_port), "5"), "client")
    client.out.expect("connected")
    found = server.out.expect(r"from (\S+) (\d+)")
    return found.group(1), int(found.group(2))


def test_a_port_preserving_router_shows_its_host_at_the_same_port(bed):
    public, home = bed.public_host(), bed.nat_host("preserving")
    assert seen_from(bed, public, home, 40001) == (home.public_ip, 40001)
    assert home.ip.startswith("192.168.") and home.public_ip != home.ip


def test_a_symmetric_router_picks_another_port(bed):
    public, home = bed.public_host(), bed.nat_host("symmetric")
    ip, port = seen_from(bed, public, home, 40001)
    assert ip == home.public_ip and port != 40001


def test_a_router_drops_connections_nobody_inside_asked_for(bed):
    public, home = bed.public_host(), bed.nat_host("preserving")
    server = bed.start(home, python("-c", SERVER, "7000"), "server")
    server.out.expect("ready")
    for target in (home.public_ip, home.ip):
        client = bed.start(public, python("-c", CLIENT, target, "7000", "0", "1"), "client")
        client.out.expect(r"failed")  # timed out or unreachable, within the client's 1 s
    assert not any(line.startswith("from") for line in server.out.snapshot())


def test_everything_the_bed_made_is_removed(bed):
    bed.public_host()
    bed.nat_host("symmetric")
    bed.delete()  # what the fixture does after every test, failed or not (again: harmless)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert bed.tag not in listed, listed
    links = subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    assert f"v{bed.tag}" not in links, "no veth left in the root namespace"
