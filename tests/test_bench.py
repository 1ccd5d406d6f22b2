"""The benchmark's smoke run (`benches/run.py --quick`) still works end to end.

Figures are printed by the benchmark, never asserted here; what is checked is that every scenario ran
for both implementations, in real processes, and that the tiny rooms delivered every message.
"""

import json
import subprocess
import sys

from harness import ROOT


def test_the_quick_benchmark_runs_every_scenario_for_both_implementations(tmp_path, capsys):
    run = subprocess.run(
        [sys.executable, "benches/run.py", "--quick", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    with capsys.disabled():  # the table, in the CI log (pytest would keep a passing test's output to itself)
        print("\n" + run.stdout)
    results = json.loads((tmp_path / "quick.json").read_text())
    assert {row["impl"] for row in results["latency"]} == {"p2pchat", "baseline", "floor", "floor-rust"}
    for row in results["latency"]:
        assert all(r["delivered"] == r["expected"] for r in row["runs"]), row
        assert row["cpu_us_per_delivery"] > 0, f"the peers' CPU was not measured: {row}"
    throughput = {row["impl"]: row for row in results["throughput"]["rows"]}
    assert set(throughput) == {"p2pchat", "baseline", "floor"}
    assert all(row["max_rate"] > 0 for row in throughput.values()), throughput
    assert results["throughput"]["application_us"] > 0, "the application's own cost per message was not measured"
    assert results["throughput"]["library_us"] > 0, "the CPU of p2pchat's recv per message was not measured"
    assert "| throughput | the benchmark application's own Python per message received" in run.stdout
    tracker = results["tracker"]
    assert {(r["impl"], r["registrations"]) for r in tracker} == {(i, n) for i in ("p2pchat", "baseline") for n in (10, 100)}
    for row in tracker:
        assert row["joins_per_s"] > 0 and row["failures"] == 0, row
        assert row["min_entries"] >= row["registrations"], f"a join got less than the full list: {row}"
    rooms = results["scale"]["rooms"]
    assert all(r["full"] and r["pss_kib_median"] > 0 for r in rooms), rooms
    assert results["scale"]["in_process"]["delivered"] == results["scale"]["in_process"]["peers"] - 1
    assert "| latency | 3 peers, p99 (µs) |" in run.stdout
    assert "| latency | floor (raw Python sockets, no protocol), 3 peers:" in run.stdout
    assert "| latency | floor (raw Rust sockets, no protocol), 3 peers:" in run.stdout
    history = results["history"]
    assert all(r["received"] == history["messages"] for r in history["runs"]), history
    assert all(r["received"] == history["messages"] for r in history["live"]), history
    assert history["disk_bytes_per_message"] > history["text_bytes"], "the log holds at least the text"
    idle = {row["impl"]: row for row in results["idle"]}
    assert set(idle) == {"p2pchat", "baseline"} and all(r["meshed"] and r["window_s"] > 0 for r in idle.values()), idle
    assert idle["p2pchat"]["cpu_s_per_peer_hour"] > 0, "the idle peers' CPU was not measured (they do keep the tracker alive)"
    assert "| idle | 4 peers, nobody typing: CPU s per peer per hour, peer processes |" in run.stdout
    # Counted from /proc; in the quick run's 1 s window an idle peer may well not be woken at all.
    assert all(r["wakeups_per_peer_s"] >= 0 for r in idle.values()), idle
    assert "| idle | 4 peers, nobody typing: thread wake-ups per peer per second |" in run.stdout
    # The chart, drawn when matplotlib is installed (the test extra installs it).
    assert (tmp_path / "quick.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), "no PNG chart was written (is matplotlib installed? pip install -r tests/requirements.txt)"


def test_the_tracker_cross_runs_every_pairing_of_builds():
    """benches/tracker_cross.py, with this build under two names: every pairing of tracker and load
    ran each round, and each run joined."""
    run = subprocess.run(
        [sys.executable, "benches/tracker_cross.py", "--build", f"a={sys.executable}", "--build", f"b={sys.executable}",
         "--registrations", "10", "--seconds", "0.2", "--rounds", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout)
    pairings = {f"tracker {t}, load {load}" for t in "ab" for load in "ab"}
    assert set(results["runs"]) == pairings, results
    assert all(len(runs) == 2 and min(runs) > 0 for runs in results["runs"].values()), results
    assert set(results["median_joins_per_s"]) == pairings


def test_the_tracker_cross_refuses_a_build_without_a_name():
    run = subprocess.run([sys.executable, "benches/tracker_cross.py", "--build", sys.executable],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "NAME=PYTHON" in run.stderr, run.stderr
