"""Which side moved a tracker figure between two builds: the tracker, or the load generator?

The tracker scenario of benches/run.py runs the tracker (`server.py`) and the load generator
(`_core._bench_tracker_joins`) from the same build. When its joins per second differ between two
builds, this crosses them: every pairing of one build's tracker with either build's load, taking
turns round after round, at one registration count.

    python benches/tracker_cross.py --build before=/tmp/venv-a/bin/python --build after=/tmp/venv-b/bin/python

Each `--build NAME=PYTHON` is an interpreter with that build of p2pchat installed (with the `bench`
feature). The tracker runs `server.py` of this checkout (a thin script) under the tracker build's
interpreter, so its code is that build's. Prints one JSON object: every run, and the median joins
per second of each pairing.
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LOAD = """
import json, sys
import p2pchat
report = p2pchat._core._bench_tracker_joins("127.0.0.1", int(sys.argv[1]), "p2pchat", int(sys.argv[2]),
                                            concurrency=4, duration=float(sys.argv[3]))
print(json.dumps(report))
"""


def one_run(tracker_python: str, load_python: str, registrations: int, seconds: float) -> dict:
    tracker = subprocess.Popen([tracker_python, "server.py", "--host", "127.0.0.1", "--port", "0"], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert tracker.stderr is not None
        first = tracker.stderr.readline()
        found = re.search(r"listening on [\d.]+:(\d+)", first)
        if not found:
            raise SystemExit(f"the tracker under {tracker_python} did not start: {first!r}")
        load = subprocess.run([load_python, "-c", LOAD, found.group(1), str(registrations), str(seconds)],
                              capture_output=True, text=True, timeout=600, check=False)
        if load.returncode != 0:
            raise SystemExit(f"the load under {load_python} failed:\n{load.stderr}")
        return json.loads(load.stdout)
    finally:
        tracker.terminate()
        tracker.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--build", action="append", required=True, metavar="NAME=PYTHON",
                        help="a build to cross: its name and an interpreter that has it installed (twice or more)")
    parser.add_argument("--registrations", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=2.0, help="joining time of each run")
    parser.add_argument("--rounds", type=int, default=5, help="each pairing runs once per round")
    args = parser.parse_args()
    builds = dict(b.split("=", 1) for b in args.build if "=" in b)
    if len(builds) < 2 or len(builds) != len(args.build):
        parser.error("give two or more --build NAME=PYTHON, with different names")
    pairings = [(t, load) for t in builds for load in builds]
    runs: dict[str, list[float]] = {f"tracker {t}, load {load}": [] for t, load in pairings}
    for round_number in range(args.rounds):
        # A different pairing goes first each round, so that none always runs on a fresh machine.
        shift = round_number % len(pairings)
        for t, load in pairings[shift:] + pairings[:shift]:
            report = one_run(builds[t], builds[load], args.registrations, args.seconds)
            joins = report["joins"] / report["seconds"]
            runs[f"tracker {t}, load {load}"].append(round(joins))
            print(f"round {round_number + 1}: tracker {t}, load {load}: {joins:,.0f} joins/s", file=sys.stderr)
    medians = {pairing: statistics.median(values) for pairing, values in runs.items()}
    print(json.dumps({"registrations": args.registrations, "seconds": args.seconds, "runs": runs,
                      "median_joins_per_s": medians}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
