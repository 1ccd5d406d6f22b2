"""Private rooms (issue 6): what the wire shows, and how the client takes a secret."""

import os
import re
import socket
import stat
import threading

import pytest
from harness import home, python
from p2pchat import InvalidInput, Peer, Tracker, new_invite_code

SECRET = "correct horse battery staple"


class RecordingProxy:
    """Forwards TCP connections to `target` and keeps every byte that passes, both ways."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.captured: list[bytes] = []
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            if not data:
                try:
                    sink.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            with self.lock:
                self.captured.append(data)
            try:
                sink.sendall(data)
            except OSError:
                return

    def everything(self) -> bytes:
        with self.lock:
            return b"".join(self.captured)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def proxies():
    made: list[RecordingProxy] = []
    yield lambda port: made.append(RecordingProxy(port)) or made[-1]
    for proxy in made:
        proxy.close()


def test_a_private_conversation_shows_nothing_readable_on_the_wire(room, proxies):
    """Every byte to the tracker and between the peers is recorded: no message, name, room name or
    secret appears, and the tracker knows the room only by an opaque id."""
    with Tracker("127.0.0.1", 0) as tracker:
        to_tracker = proxies(tracker.address[1])
        env = {"P2PCHAT_SECRET": SECRET}
        ana = room.start(python("client.py", "--port", str(to_tracker.port), "--name", "anastasia", "--room", "plans-for-friday",
                                "--history", "0"), "ana", env=env)
        ana_port = int(ana.err.expect(r"joined as 'anastasia' in private room 'plans-for-friday' .*listening on port (\d+)").group(1))
        ana.err.expect(r"^\* private room: every link is encrypted")
        to_ana = proxies(ana_port)
        # Bob reaches Ana through the recording proxy only (no tracker: just her address).
        bob = room.start(python("client.py", "--peer", f"127.0.0.1:{to_ana.port}", "--name", "bartholomew",
                                "--room", "plans-for-friday", "--history", "0"), "bob", env=env)
        bob.err.expect(r"connected to 1 of 1 peer\(s\)")
        ana.err.saw(r"^\* bartholomew \(.*\) joined \(p2pchat, encrypted, key [0-9a-f-]{39}\)$")
        bob.line("meet at the old lighthouse")
        ana.out.saw(r"^<bartholomew> :: meet at the old lighthouse$")
        ana.line("bring the lantern")
        bob.out.saw(r"^<anastasia> :: bring the lantern$")
        bob.line("/nick barty")
        ana.err.saw(r"is now known as barty$")

        registrations = to_tracker.everything()
        room_id = re.search(rb'"room":"([0-9a-f]{32})"', registrations).group(1).decode()
        assert len(tracker.peers(room_id)) == 1, "ana is registered under the opaque id"
        assert tracker.peers("plans-for-friday") == []
        wire = registrations + to_ana.everything()
        assert len(to_ana.everything()) > 200, "the conversation did go through the proxy"
        for secret_text in ["meet at the old lighthouse", "bring the lantern", "anastasia", "bartholomew", "barty",
                            "plans-for-friday", SECRET, "lighthouse", "lantern"]:
            assert secret_text.encode() not in wire, f"{secret_text!r} is readable on the wire"


def test_a_wrong_secret_gets_a_clear_error_and_no_link(room):
    tracker = room.p2pchat_tracker()
    ana = room.p2pchat_peer("ana", tracker.port, "--room", "plans", "--history", "0", env={"P2PCHAT_SECRET": SECRET})
    mallory = room.start(python("client.py", "--peer", f"127.0.0.1:{ana.listen_port}", "--name", "mallory",
                                "--room", "plans", "--history", "0"), "mallory", env={"P2PCHAT_SECRET": "not the secret at all"})
    mallory.err.expect(rf"^\* no private link with 127\.0\.0\.1:{ana.listen_port}: .*another secret")
    mallory.line("/who")
    mallory.err.expect(r"^\* 1 member\(s\) in room 'plans':$")
    ana.proc.line("/who")
    ana.proc.err.expect(r"^\* 1 member\(s\) in room 'plans':$")


def test_an_invite_code_lets_someone_in_without_the_secret(room):
    tracker = room.p2pchat_tracker()
    ana = room.p2pchat_peer("ana", tracker.port, "--room", "plans", "--history", "0", env={"P2PCHAT_SECRET": SECRET})
    ana.proc.line("/invite")
    code = ana.proc.err.expect(r"invite code \(.*\): (p2pc1-[0-9a-f-]+)$").group(1)
    carol = room.start(python("client.py", "--port", str(tracker.port), "--name", "carol", "--history", "0"), "carol",
                       env={"P2PCHAT_SECRET": code})
    carol.err.expect(r"joined as 'carol' in private room 'plans'")
    ana.proc.err.saw(r"^\* carol \(.*\) joined \(p2pchat, encrypted, key [0-9a-f-]{39}\)$")
    carol.line("thanks for the invite")
    ana.proc.out.saw(r"^<carol> :: thanks for the invite$")


@pytest.mark.parametrize("argv, env, error", [
    (["--room", "plans", "--private"], {}, r"--private asks for the secret on a terminal; without one, use --secret-file"),
    (["--room", "plans", "--secret-file", "/nonexistent/secret"], {}, r"cannot read the secret file '/nonexistent/secret'"),
    (["--room", "plans"], {"P2PCHAT_SECRET": "short"}, r"too short: use at least 8 characters"),
    ([], {"P2PCHAT_SECRET": SECRET}, r"the default room cannot be private"),
    (["--room", "other"], {"P2PCHAT_SECRET": "p2pc1-" + "ab" * 32 + "-" + b"plans".hex()}, r'invite code is for room "plans", not "other"'),
    (["--room", "plans"], {"P2PCHAT_SECRET": "p2pc1-12"}, r"invite code is damaged"),
])
def test_a_secret_that_cannot_be_used_is_a_clear_error(room, argv, env, error):
    proc = room.start(python("client.py", "--name", "ana", "--port", "9", *argv), "ana", env=env)
    proc.close_stdin()
    assert proc.wait() == 2
    proc.err.expect(r"^client\.py: .*" + error)
    assert not any("Traceback" in line for line in proc.err.snapshot())


def test_the_secret_file_is_read_and_the_secret_never_needs_the_command_line(room, tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n", encoding="utf-8")
    os.chmod(secret_file, stat.S_IRUSR | stat.S_IWUSR)
    tracker = room.p2pchat_tracker()
    ana = room.p2pchat_peer("ana", tracker.port, "--room", "plans", "--secret-file", str(secret_file), "--history", "0")
    bob = room.start(python("client.py", "--port", str(tracker.port), "--name", "bob", "--room", "plans", "--history", "0"),
                     "bob", env={"P2PCHAT_SECRET": SECRET})
    bob.err.expect(r"connected to 1 of 1 peer\(s\)")
    ana.proc.err.saw(r"^\* bob \(.*\) joined \(p2pchat, encrypted, key [0-9a-f-]{39}\)$")
    # There is no flag that takes the secret itself (and no abbreviation of --secret-file).
    refused = room.start(python("client.py", "--secret", SECRET), "argv")
    assert refused.wait() == 2
    refused.err.saw(r"client\.py: error: unrecognized arguments: --secret")


def test_the_python_api_takes_a_secret_and_refuses_a_weak_one():
    with pytest.raises(InvalidInput, match="too short"):
        Peer("ana", room="plans", secret="short", data_dir=home("ana"))
    with pytest.raises(InvalidInput, match="default room cannot be private"):
        Peer("ana", secret=SECRET, data_dir=home("ana"))
    peer = Peer("ana", room="plans", secret=SECRET, save_history=False, data_dir=home("ana"))
    assert peer.private and peer.room == "plans"
    invited = Peer("bob", secret=peer.invite_code, save_history=False, data_dir=home("bob"))
    assert invited.room == "plans" and invited.invite_code == peer.invite_code
    assert not Peer("carol", room="plans", save_history=False, data_dir=home("carol")).private


def test_a_new_room_has_a_random_key_and_a_bad_name_is_a_clear_error():
    code = new_invite_code("plans")
    assert re.fullmatch(r"p2pc1-[0-9a-f]{64}-" + b"plans".hex(), code)
    assert new_invite_code("plans") != code, "each new room has its own key"
    ana = Peer("ana", secret=code, save_history=False, data_dir=home("ana"))
    assert ana.private and ana.room == "plans" and ana.invite_code == code
    with pytest.raises(InvalidInput, match="a private room needs a name"):
        new_invite_code("")
    with pytest.raises(InvalidInput, match="control"):
        new_invite_code("plans\nand more")


def test_the_client_shows_each_members_proven_key_and_flags_a_changed_one(room):
    tracker = room.p2pchat_tracker()
    env = {"P2PCHAT_SECRET": SECRET}
    ana = room.p2pchat_peer("ana", tracker.port, "--room", "plans", "--history", "0", env=env)
    bob = room.p2pchat_peer("bob", tracker.port, "--room", "plans", "--history", "0", env=env)
    bob_key = bob.proc.err.saw(r"joined as 'bob' .*\(key ([0-9a-f-]{39})\)").group(1)
    ana.proc.err.saw(rf"^\* bob \(.*\) joined \(p2pchat, encrypted, key {bob_key}\)$")
    bob.proc.line("/quit")
    assert bob.proc.wait() == 0
    ana.proc.err.saw(r"^\* bob \(.*\) left the room$")
    # Another user (another identity file) calls themselves bob.
    impostor = room.start(python("client.py", "--port", str(tracker.port), "--name", "bob", "--room", "plans",
                                 "--history", "0"), "impostor", env=env)
    other_key = impostor.err.expect(r"joined as 'bob' .*\(key ([0-9a-f-]{39})\)").group(1)
    assert other_key != bob_key
    ana.proc.err.saw(rf"^\* WARNING: bob \(.*\) proves key {other_key}, but bob had key {bob_key} when you first met it here")
    ana.proc.err.saw(rf"^\* bob \(.*\) joined \(p2pchat, encrypted, key {other_key} CHANGED: perhaps not who you met before\)$")
    # The impostor's lines are refused while bob's name is tied to the first key.
    impostor.line("trust me")
    ana.proc.err.saw(r"^\* dropped a message .*signed again by someone else")
    # Ana learns (out of band) that bob really has a new machine: she trusts the new key.
    ana.proc.line("/trust bob 0000-0000")
    ana.proc.err.saw(r"^\* cannot trust that key: no member called bob proves key 0000-0000")
    ana.proc.line(f"/trust bob {other_key}")
    ana.proc.err.saw(rf"^\* bob has key {other_key} from now on$")
    impostor.line("it is me, on my new laptop")
    ana.proc.out.saw(r"^<bob> :: it is me, on my new laptop$")  # shown now (it was dropped before)
    ana.proc.line("/untrust bob")
    ana.proc.err.saw(r"^\* forgot bob's key; the next key it proves is taken$")
    ana.proc.line("/untrust bob")
    ana.proc.err.saw(r"^\* no key was remembered for bob$")


def test_messages_say_whether_their_author_signed_them(tmp_path):
    """Through the Python API: in a private room each message is signed and checked; in an open room,
    where a name proves nothing, none is."""
    with Tracker("127.0.0.1", 0) as tracker:
        host, port = tracker.address
        for secret, room_name, signed in ((SECRET, "plans", True), (None, "open", False)):
            made = [Peer(name, host, port, room=room_name, secret=secret, data_dir=tmp_path / name, history=0)
                    for name in ("ana", "bob")]
            with made[0] as ana, made[1] as bob:
                assert ana.private is signed
                bob.send(f"hello {room_name}")
                message = ana.recv(timeout=10)
                assert (message.text, message.signed) == (f"hello {room_name}", signed)
                assert ana.history(limit=1)[0].signed is signed, "the log keeps the signature"


def test_files_are_private_at_rest(tmp_path):
    """After a private-room session, the data directory p2pchat made is its owner's alone, and so is
    every file in it (message log with its -wal and -shm, identity, known keys), whatever the umask."""
    previous = os.umask(0o022)
    try:
        with Tracker("127.0.0.1", 0) as tracker:
            host, port = tracker.address
            dirs = {name: tmp_path / name / "data" for name in ("ana", "bob")}
            with Peer("ana", host, port, room="plans", secret=SECRET, data_dir=dirs["ana"], history=0) as ana, \
                    Peer("bob", host, port, room="plans", secret=SECRET, data_dir=dirs["bob"], history=0) as bob:
                bob.send("kept to ourselves")
                assert ana.recv(timeout=10).text == "kept to ourselves"
                files = {p.name for p in dirs["ana"].iterdir()}
                assert any(name.endswith("-wal") for name in files), files  # checked while the log is open
                modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in dirs["ana"].iterdir()}
                assert all(mode == 0o600 for mode in modes.values()), modes
        for data in dirs.values():
            assert stat.S_IMODE(data.stat().st_mode) == 0o700
            assert stat.S_IMODE(data.parent.stat().st_mode) == 0o700, "made by p2pchat too"
            names = {p.name for p in data.iterdir()}
            assert {"identity.json", "known_keys.json"} <= names, names
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in data.iterdir()}
            assert all(mode == 0o600 for mode in modes.values()), modes
    finally:
        os.umask(previous)


def test_the_environment_forgets_the_secret_once_read(tmp_path, monkeypatch):
    import argparse

    from p2pchat.client import room_secret
    monkeypatch.setenv("P2PCHAT_SECRET", SECRET)
    assert room_secret(argparse.Namespace(secret_file=None, private=False, json=False, room="plans")) == SECRET
    assert "P2PCHAT_SECRET" not in os.environ, "a program started from here would inherit it"


def test_the_client_warns_about_a_secret_file_others_can_read(room, tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n", encoding="utf-8")
    os.chmod(secret_file, 0o644)
    tracker = room.p2pchat_tracker()
    ana = room.p2pchat_peer("ana", tracker.port, "--room", "plans", "--secret-file", str(secret_file), "--history", "0")
    ana.proc.err.saw(r"^client\.py: warning: other accounts on this machine can read the secret file .*chmod 600 it$")
