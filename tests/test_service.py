"""Operating MiMBox as a service: systemd's notifications and watchdog (without systemd: the test
binds NOTIFY_SOCKET itself), the shipped unit's capability bounding set, reload under load,
/metrics against `mimbox stats`, and the wheel installed alone outside this checkout."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from conftest import PY, SERVER_PORT, transfer
from test_hostile import REQUESTS, SINK_PORT, Sink, probe, wait_for

from experiments.systems import MiMBox
from topologies.support import ALLOCATE, NotWithin, wait_until
from mimbox.paths import PACKAGE
from mimbox.wire import rfc8803

ROOT = Path(__file__).resolve().parent.parent
MIMBOX = [PY, "-m", "mimbox.ops.cli"]


def in_netns(argv: list[str], **kw) -> subprocess.Popen:
    """`argv` in a network namespace of its own (loopback up); the Popen's pid is argv's."""
    script = "ip link set lo up && exec \"$@\""
    return subprocess.Popen(["unshare", "-n", "bash", "-c", script, "netns", *map(str, argv)], cwd=ROOT,
                            start_new_session=True, **kw)


def left_behind(pgid: int) -> list[str]:
    """Processes still in the process group `pgid` (a converter's workers and keepers are)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid:
                    out.append(d)
            except (OSError, IndexError, ValueError):
                pass
    return out


def config(tmp_path, text: str, name: str = "mimbox.toml") -> str:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text).lstrip())
    return str(p)


class NotifySocket:
    """What systemd would receive: the datagrams on NOTIFY_SOCKET, with their arrival times."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.got: list[tuple[float, str]] = []

    def read(self, seconds: float) -> list[tuple[float, str]]:
        """Every message that arrives in the next `seconds`."""
        out, deadline = [], time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                out.append((time.monotonic(), self.sock.recv(4096).decode()))
            except socket.timeout:
                break
        self.got += out
        return out

    def until(self, word: str, timeout: float) -> list[tuple[float, str]]:
        """Messages up to and including the first that has the line `word`."""
        out, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                m = (time.monotonic(), self.sock.recv(4096).decode())
            except socket.timeout:
                break
            out.append(m)
            self.got.append(m)
            if word in m[1].splitlines():
                return out
        raise AssertionError(f"no {word} within {timeout:g}s; got {[x[1] for x in out]}")

    def close(self):
        self.sock.close()
        os.unlink(self.path)


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def stop(proc: subprocess.Popen, timeout: float = 60) -> int:
    """SIGTERM, wait; then fail if any worker or keeper outlived the supervisor (all are killed)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    try:
        wait_until(lambda: not left_behind(proc.pid), 5, "every worker and keeper gone", every=0.05)
    except NotWithin:
        left = left_behind(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"processes outlived the supervisor: {left}") from None
    return rc


def static_config(tmp_path, port: int, workers: int = 2, mode: str = "static") -> str:
    return config(tmp_path, f"""
        workers = {workers}
        [listener]
        addr = "127.0.0.1"
        port = {port}
        mode = "{mode}"
        {'upstream = "192.0.2.1:80"' if mode == "static" else ""}
        queue_num = {ALLOCATE.queues(workers)}
        [safety]
        allow_clients = ["127.0.0.0/8"]
        """)


def test_notify_order_watchdog_and_a_hung_worker(tmp_path):
    """READY=1 first (once the rules and listeners are up), WATCHDOG=1 every third of WatchdogSec
    while every worker's loop answers, none while one worker is stopped (SIGSTOP), again after
    SIGCONT; SIGHUP gives RELOADING=1 then READY=1; SIGTERM gives STOPPING=1 and a clean exit."""
    port = ALLOCATE.port()
    cfg = static_config(tmp_path, port)
    ns = NotifySocket(str(tmp_path / "notify"))
    env = dict(os.environ, NOTIFY_SOCKET=ns.path, WATCHDOG_USEC="300000")      # a ping every 0.1 s
    proc = in_netns([*MIMBOX, "run", "--config", cfg, "--stats", str(tmp_path / "stats.sock")], env=env,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = ns.until("READY=1", 30)
        assert len(first) == 1, f"READY=1 must come first: {first}"
        assert f"MAINPID={proc.pid}" in first[0][1].splitlines(), first
        live = [m for _, m in ns.read(1.0) if m == "WATCHDOG=1"]
        assert len(live) >= 4, f"{len(live)} watchdog pings in 1 s at a 0.1 s period"

        workers = children(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[0], signal.SIGSTOP)
        try:
            ns.read(0.3)                              # a ping answered just before the stop
            hung = [(t, m) for t, m in ns.read(1.5) if m == "WATCHDOG=1"]
        finally:
            os.kill(workers[0], signal.SIGCONT)
        assert hung == [], f"watchdog fed while a worker was stopped: {len(hung)} pings"
        again = ns.until("WATCHDOG=1", 2.0)
        assert again

        proc.send_signal(signal.SIGHUP)
        seq = [m for _, m in ns.until("READY=1", 10) if m != "WATCHDOG=1"]
        assert len(seq) == 2 and seq[0].splitlines()[0] == "RELOADING=1" and seq[1] == "READY=1", seq
        assert re.fullmatch(r"MONOTONIC_USEC=\d+", seq[0].splitlines()[1]), seq

        proc.send_signal(signal.SIGTERM)
        ns.until("STOPPING=1", 10)
        assert proc.wait(timeout=60) == 0
        late = [m for _, m in ns.read(0.2) if m.startswith("READY")]
        assert late == []
    finally:
        stop(proc)
        ns.close()


def unit_directives(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            k, _, v = line.partition("=")
            out.setdefault(k.strip(), v.strip())
    return out


def test_the_unit_is_valid_and_its_capabilities_suffice(tmp_path):
    """`mimbox unit` gives a unit systemd-analyze accepts (Type=notify, watchdog, reload by SIGHUP);
    the converter starts (explicit mode: rules, the BPF recorder, NFQUEUE; workers dropping to the
    service user) under exactly its capability bounding set and no-new-privileges, and does not
    without CAP_NET_ADMIN."""
    unit = subprocess.run([*MIMBOX, "unit", "--config", "/etc/mimbox/mimbox.toml"], capture_output=True,
                          text=True, check=True, timeout=30).stdout
    d = unit_directives(unit)
    assert d["Type"] == "notify" and d["NotifyAccess"] == "main" and int(d["WatchdogSec"]) > 0
    assert d["ExecReload"] == "/bin/kill -HUP $MAINPID" and d["KillMode"] == "mixed"
    assert d["ExecStart"].split()[1:] == ["run", "--config", "/etc/mimbox/mimbox.toml"]
    path = tmp_path / "mimbox.service"
    path.write_text(unit)
    v = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert v.returncode == 0, v.stderr

    caps = [c.lower().removeprefix("cap_") for c in d["CapabilityBoundingSet"].split()]

    def start(allowed: list[str]) -> tuple[int | None, str]:
        cfg = static_config(tmp_path, ALLOCATE.port(), workers=2, mode="explicit")
        argv = ["setpriv", "--no-new-privs", "--bounding-set", ",".join(["-all", *("+" + c for c in allowed)]),
                "--", *MIMBOX, "run", "--config", cfg, "--stats", str(tmp_path / f"s{len(allowed)}.sock")]
        err = tmp_path / f"stderr{len(allowed)}"
        with open(err, "w") as f:
            proc = in_netns(argv, stdout=subprocess.PIPE, stderr=f, text=True)
        import select
        ready = bool(select.select([proc.stdout], [], [], 30)[0]) and "ready" in proc.stdout.readline()
        rc = stop(proc)
        return (rc if ready else (rc or None)), err.read_text()
    rc, err = start(caps)
    assert rc == 0 and "Error" not in err, err[-3000:]
    rc, err = start([c for c in caps if c != "net_admin"])
    assert rc not in (0, None) and "Traceback" not in err, err[-3000:]


# -- under load ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sinks(paper_tb):
    a, b = Sink(paper_tb, SINK_PORT), Sink(paper_tb, SINK_PORT + 1)
    yield a, b
    a.kill()
    b.kill()


def scrape(tb, port: int) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families
    text = tb.mbox.cmd(f"curl -sf http://127.0.0.1:{port}/metrics")
    assert "mimbox_accepted_total" in text, text[-2000:]
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def total(samples: dict, name: str, **labels) -> float:
    """The sum of `name` over workers (and whatever labels are not given)."""
    return sum(v for (n, lv), v in samples.items()
               if n == name and all(dict(lv).get(k) == w for k, w in labels.items()))


def test_reload_under_load_and_metrics_equal_stats(paper_tb, sinks, tmp_path):
    """Convert mode, 2 workers, a config file: under a paced 1 KB-class load to one destination,
    a reload adds a deny rule for another: the load loses no request, and a new connection to the
    denied destination is refused within a second of SIGHUP. A change that needs a restart
    (buffers.engine) is refused, naming the key, and the old configuration stays. /metrics during the
    load lies between two `mimbox stats` snapshots; idle, each counter equals its stats value."""
    server, denied = paper_tb.server_ip, SINK_PORT + 1
    mport = ALLOCATE.port()
    text = f"""
        metrics = "127.0.0.1:{mport}"
        [safety]
        deny_dst = []
        """
    path = config(tmp_path, text)
    conv = MiMBox(mode="convert", workers=2, extra=["--config", path])
    conv.start(paper_tb, SINK_PORT)
    try:
        msg = rfc8803.connect_message(server, SINK_PORT) + b"ping"
        want = 2                                # "OK" after the converter's answer

        def requests_proc(seconds: float, rate: float) -> subprocess.Popen:
            return paper_tb.client.popen([PY, "-c", REQUESTS, paper_tb.mbox_client_ip, str(conv.port), msg.hex(),
                                          str(seconds), str(want), str(rate)], stdout=subprocess.PIPE, text=True)

        def result(p) -> dict:
            out, _ = p.communicate(timeout=60)
            return json.loads(out.strip().splitlines()[-1])

        def refused_b() -> bool:
            r = probe(paper_tb, conv.port, rfc8803.connect_message(server, denied) + b"x")
            return r["error"] == int(rfc8803.Error.NOT_AUTHORIZED)     # RFC 8803 for a denied destination

        assert result(requests_proc(0.5, 100))["failed"] == 0       # the TFO cookie; a warm converter
        assert not refused_b(), "the second destination must be served before the reload"

        load = requests_proc(4.0, 300)
        wait_for(lambda: conv.stats()["accepted"] > 60, 10, "the load running")
        before = conv.stats()
        during = scrape(paper_tb, mport)
        after = conv.stats()
        for key in ("accepted", "server_connects", "bytes_up"):
            m = total(during, f"mimbox_{key}_total")
            assert before[key] <= m <= after[key], (key, before[key], m, after[key])

        config(tmp_path, text.replace("deny_dst = []", f'deny_dst = ["{server}:{denied}"]'))
        hup = time.monotonic()
        os.kill(conv.proc.pid, signal.SIGHUP)
        wait_for(refused_b, 1.5, "the denied destination refused")
        took = time.monotonic() - hup
        assert all(refused_b() for _ in range(3))
        got = result(load)
        assert got["failed"] == 0 and got["done"] >= 0.8 * 300 * 4, got
        wait_for(lambda: "reloaded: safety.deny_dst" in conv.log(), 5, "the reload logged")

        config(tmp_path, text.replace("[safety]", '[buffers]\nengine = "copy"\n[safety]'))
        os.kill(conv.proc.pid, signal.SIGHUP)
        wait_for(lambda: "buffers.engine cannot change while running" in conv.log(), 5, "the refusal logged")
        assert refused_b(), "the configuration in force (with the deny rule) stays"
        assert result(requests_proc(0.5, 100))["failed"] == 0

        # idle: /metrics and `mimbox stats` at the same moment
        keys = ("syns", "accepted", "closed", "bytes_up", "bytes_down", "server_connects", "client_mptcp",
                "server_tcp", "server_mptcp")

        def steady():
            a, m, b = conv.stats(), scrape(paper_tb, mport), conv.stats()
            same = all(a[k] == b[k] for k in keys) and a["refused"] == b["refused"]
            return (a, m) if same else None
        wait_for(lambda: steady() is not None, 10, "idle counters")
        stats, m = steady()
        for k in keys:
            assert total(m, f"mimbox_{k}_total") == stats[k], k
        for cause, n in stats["refused"].items():
            assert total(m, "mimbox_refused_total", cause=cause) == n, cause
        assert stats["refused"], "the probes' refusals are counted"
        assert total(m, "mimbox_active") == stats["active"]
        assert total(m, "mimbox_server_connect_seconds_count") == stats["server_connects"] > 0
        assert total(m, "mimbox_connection_duration_seconds_count") == stats["closed"] > 0
        assert total(m, "mimbox_server_connect_seconds_bucket", le="+Inf") == stats["server_connects"]
        assert total(m, "mimbox_worker_up") == 2
        print(f"denied destination refused {took:.2f}s after SIGHUP; load {got}")
    finally:
        conv.stop()


# -- installed alone -------------------------------------------------------------------------------------
def test_the_wheel_installs_alone_and_converts(paper_tb):
    """The wheel, built from this tree and installed into a new venv outside it, carries the core,
    the shims and the BPF objects: `mimbox doctor` passes from /, and an explicit-mode transfer
    through the installed `mimbox run` and `mimbox client` is byte-exact both ways (2 x 1 MB)."""
    d = Path(tempfile.mkdtemp(prefix="mimbox-wheel-", dir="/tmp"))
    os.chmod(d, 0o755)            # the workers (user mimbox) read the installed package
    try:
        subprocess.run([PY, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(d / "dist"),
                        str(ROOT)], check=True, timeout=600, capture_output=True)
        (wheel,) = (d / "dist").glob("mimbox-*.whl")
        # system site packages: Debian's python3-seccomp (libseccomp's own binding) is not on PyPI
        subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(d / "venv")], check=True,
                       timeout=120)
        subprocess.run([str(d / "venv/bin/pip"), "install", "-q", "--disable-pip-version-check", str(wheel)],
                       check=True, timeout=900, cwd="/", capture_output=True)
        where = subprocess.run([str(d / "venv/bin/python"), "-c", "import mimbox.paths as p; print(p.BUILD)"],
                               cwd="/", capture_output=True, text=True, timeout=60, check=True).stdout.strip()
        assert where == str(d / "venv/lib/python3.11/site-packages/mimbox/_native"), where
        doc = subprocess.run([str(d / "venv/bin/mimbox"), "doctor"], cwd="/", capture_output=True, text=True,
                             timeout=300)
        assert doc.returncode == 0, doc.stdout + doc.stderr
        assert str(d) in doc.stdout and str(ROOT) not in doc.stdout
        m = MiMBox(mode="explicit", workers=1, program=[str(d / "venv/bin/mimbox")])
        m.start(paper_tb, SERVER_PORT)
        try:
            transfer(paper_tb, m, 1 << 20, 1 << 20)
            assert m.stats()["accepted"] >= 1
        finally:
            m.stop()
    finally:
        shutil.rmtree(d, ignore_errors=True)
