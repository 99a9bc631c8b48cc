"""experiments/measure/crowd.py, the concurrency figure's load: what it counts is what happened."""
import json
import subprocess
import sys

from conftest import readline
from topologies.support import free_port

CROWD = [sys.executable, "-m", "experiments.measure.crowd"]


def test_crowd_opens_keeps_alive_and_sends_new_requests_through_an_echo_server():
    port = free_port()
    srv = subprocess.Popen([*CROWD, "server", str(port), "--procs", "2", "--mptcp"], stdout=subprocess.PIPE, text=True)
    try:
        assert readline(srv, timeout=30).strip() == "ready"
        cl = subprocess.Popen([*CROWD, "client", "127.0.0.1", str(port), "300", "--procs", "2", "--open-rate", "3000",
                               "--source", "127.0.0.5", "--source", "127.0.0.6"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert json.loads(readline(cl, timeout=60)) == {"started": 2}
            cl.stdin.write("open\n")
            cl.stdin.flush()
            opened = json.loads(readline(cl, timeout=60))
            peers = subprocess.run(["ss", "-tnH", "state", "established", f"( dport = :{port} )"],
                                   capture_output=True, text=True).stdout
            sources = {line.split()[2].rsplit(":", 1)[0] for line in peers.splitlines()}
            cl.stdin.write("measure 2 1 20\n")      # 2 s: every connection's keep-alive twice, ~40 new
            cl.stdin.flush()
            m = json.loads(readline(cl, timeout=60))
        finally:
            cl.stdin.close()
            cl.wait(timeout=60)
    finally:
        srv.terminate()
        srv.wait(timeout=30)
    assert opened["open"] == 300 and opened["failed"] == {}, opened
    assert sources == {"127.0.0.5", "127.0.0.6"}, sources        # one source address per process
    assert m["errors"] == {} and m["held"] == 300, m["errors"]
    assert 590 <= len(m["keepalive_us"]) <= 600, len(m["keepalive_us"])
    assert 10 <= len(m["new_us"]) <= 120, len(m["new_us"])
    assert all(0 < us < 2_000_000 for us in m["keepalive_us"] + m["new_us"])


def test_crowd_counts_what_could_not_open():
    port = free_port()                                          # nobody listens there
    cl = subprocess.run([*CROWD, "client", "127.0.0.1", str(port), "20", "--procs", "1"], input="open\n",
                        capture_output=True, text=True, timeout=60)
    opened = json.loads(cl.stdout.splitlines()[1])
    assert opened["open"] == 0 and opened["failed"] == {"ECONNREFUSED": 20}, opened


def test_runqueue_wait_counts_a_crowded_cpus_waiting_and_follows_children():
    """The concurrency figure's attribution of latency: two busy processes on one CPU wait for it about
    half the time, one alone on the other CPU hardly at all, and the wait is found through the process
    that started them."""
    import time

    from experiments.measure import runqueue_wait_s, with_descendants
    from topologies.support import wait_until
    spin = "import time\nend = time.monotonic() + 0.8\nwhile time.monotonic() < end: pass"
    pair = subprocess.Popen(["sh", "-c", f"taskset -c 0 {sys.executable} -c '{spin}' & "
                                         f"taskset -c 0 {sys.executable} -c '{spin}' & wait"])
    alone = subprocess.Popen(["taskset", "-c", "1", sys.executable, "-c", spin])
    try:
        family = wait_until(lambda: (lambda f: f if len(f) == 3 else None)(with_descendants([pair.pid])), 5,
                            "both spinners started", every=0.01)
        assert len(family) == 3, family
        w0, a0 = runqueue_wait_s(family), runqueue_wait_s([alone.pid])
        time.sleep(0.4)
        waited, alone_waited = runqueue_wait_s(family) - w0, runqueue_wait_s([alone.pid]) - a0
    finally:
        for p in (pair, alone):
            p.wait(timeout=10)
    assert waited > 0.15, waited             # two spinners on one CPU for 0.4 s: ~0.4 s of waiting between them
    assert alone_waited < waited / 2, (alone_waited, waited)   # (its CPU time is ~0.4 s: not what is counted)
