"""Each user's key pair: created once, owner-only, shown as a fingerprint; a damaged one is refused."""

import stat

import pytest
from harness import home, python
from p2pchat import IdentityError, Peer, Tracker


def test_a_user_keeps_one_identity_across_runs(tmp_path):
    key = tmp_path / "me" / "identity.json"
    with Tracker(host="127.0.0.1", port=0) as tracker:
        with Peer("ana", *tracker.address, identity=key, save_history=False, data_dir=home("ana")) as first:
            fingerprint = first.fingerprint
        with Peer("ana", *tracker.address, identity=key, save_history=False, data_dir=home("ana")) as again:
            assert again.fingerprint == fingerprint
        with Peer("ana", *tracker.address, identity=tmp_path / "other.json", save_history=False, data_dir=home("ana")) as other:
            assert other.fingerprint != fingerprint
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert len(fingerprint) == 39 and fingerprint.count("-") == 7  # 128 bits


def test_the_client_shows_its_fingerprint_and_refuses_a_damaged_identity(room, tmp_path):
    tracker = room.p2pchat_tracker()
    ana = room.p2pchat_peer("ana", tracker.port, "--identity", str(tmp_path / "ana.json"))
    fingerprint = ana.proc.err.saw(r"joined as 'ana' \(key ([0-9a-f]{4}(-[0-9a-f]{4}){7})\)").group(1)
    ana.say("/who")
    ana.proc.err.saw(rf"ana \(you, port \d+, key {fingerprint}\)")

    damaged = tmp_path / "damaged.json"
    damaged.write_text("{ not an identity")
    with pytest.raises(IdentityError, match="damaged.json.*--identity"):
        Peer("bob", "127.0.0.1", tracker.port, identity=damaged, data_dir=home("bob")).join()
    bob = room.start(python("client.py", "-n", "bob", "--port", str(tracker.port), "--identity", str(damaged)), "bob")
    assert bob.wait() == 1
    bob.err.saw(r"^client\.py: cannot read the identity .*damaged\.json: not an identity file")
    assert damaged.read_text() == "{ not an identity", "left as it was"


def test_an_identity_that_cannot_be_created_says_where(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with Tracker(host="127.0.0.1", port=0) as tracker:
        with pytest.raises(IdentityError, match="cannot create the identity .*a-file/sub/identity.json"):
            Peer("ana", *tracker.address, identity=blocker / "sub" / "identity.json", save_history=False, data_dir=home("ana")).join()
