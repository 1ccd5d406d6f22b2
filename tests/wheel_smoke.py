"""A two-peer chat through an installed p2pchat, with nothing else: what a user's first run does.

Run by test_packaging (the wheel in a fresh virtual environment with no Rust on the PATH) and by the
release workflow on each platform it builds for (.github/workflows/release.yml).
"""

import sys

import p2pchat

with p2pchat.Tracker(host="127.0.0.1", port=0) as tracker, \
        p2pchat.Peer("a", *tracker.address, save_history=False) as a, \
        p2pchat.Peer("b", *tracker.address, save_history=False) as b:
    b.send("hello from " + sys.version.split()[0])
    message = a.recv(timeout=10)
    if message is None:
        sys.exit("no message within 10 s")
    print(message.text)
