"""Reliability and security through the converter: integrity under loss and offload changes,
aggregation, handover, faults, bad input, no open relay, bounded resources.

Randomised conditions are seeded (MIMBOX_SEED, default 20131209) and logged so a failure replays.
The long variants are marked slow; every kind of case runs at least once by default.
"""
from __future__ import annotations

import os
import random
import subprocess
import time

import faults
import ledger
import pytest
from conftest import PY, SERVER_PORT, Server, readline, run_client, transfer
from topologies.support import free_port, stop_process, wait_until

from experiments.systems import MiMBox
from mimbox.config import ListenerConfig
from mimbox.wire.dstopt import DstOpt
from topologies.testbed import ConverterTopo, PathSpec, Testbed

SEED = int(os.environ.get("MIMBOX_SEED", "20131209"))
TOOLS = os.path.join(os.path.dirname(__file__), "tools")
# the server side's ports, one per use (never typed: topologies.support allocates them)
(RESET_PORT, VANISH_PORT, BLACKHOLE_PORT, TRICKLE_PORT, LIMIT_PORT, BUDGET_PORT, IDLE_PORT,
 WEB_PORT) = (free_port() for _ in range(8))


def hold_server(tb, port: int, n: int) -> subprocess.Popen:
    """tests/tools/hold.py on the server: accepts n connections and keeps them until its stdin closes."""
    p = tb.server.popen([PY, os.path.join(TOOLS, "hold.py"), "server", str(port), str(n)],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert readline(p).strip() == "ready"
    return p


def hold_clients(tb, port: int, n: int) -> subprocess.Popen:
    """n idle connections from the client to the converter's `port`; prints 'held K refused R'."""
    return tb.client.popen([PY, os.path.join(TOOLS, "hold.py"), "client", tb.mbox_client_ip, str(port), str(n)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


class LossyTopo(ConverterTopo):
    """Two fast client paths with WiFi/3G-like delay asymmetry and 1 % loss both ways."""

    def build(self, loss: float = 1.0, seed: int = SEED):
        def d(bw, delay, k):
            return dict(bw=bw, delay=delay, loss=loss, seed=seed + k, max_queue_size=200)
        super().build([PathSpec("wifi", d(50, "5ms", 1), d(50, "5ms", 2)),
                       PathSpec("cell", d(20, "20ms", 3), d(20, "20ms", 4))],
                      [PathSpec("server", dict(bw=100, delay="2ms"), dict(bw=100, delay="2ms"))])


class AggregationTopo(ConverterTopo):
    """Two 20 Mbit/s client paths: only both together carry 40 Mbit/s."""

    def build(self):
        p = dict(bw=20, delay="2ms", max_queue_size=100)
        super().build([PathSpec("a", p, p), PathSpec("b", p, p)], [PathSpec("server")])


@pytest.fixture(scope="module")
def lossy_tb(mptcp_ok):
    print(f"LossyTopo seed {SEED}")
    with Testbed(LossyTopo()) as tb:
        yield tb


def running_converter(tb, mode: str):
    """A module-scoped converter towards the server's SERVER_PORT (a generator for fixtures)."""
    m = MiMBox(mode=mode)
    m.start(tb, SERVER_PORT)
    yield m
    m.stop()


@pytest.fixture(scope="module")
def lossy_converter(lossy_tb):
    yield from running_converter(lossy_tb, "explicit")


def _matrix(slow: bool):
    sizes = [0, 1, 64 << 10, 1 << 20, 8 << 20]
    orders = ["both", "client-first", "server-first"]
    cases = [(s, o, m) for s in sizes for o in orders for m in (True, False)]
    if slow:
        return cases
    rng = random.Random(SEED)
    return sorted(rng.sample([c for c in cases if c[0] < 8 << 20], 5)) + [(8 << 20, "both", True)]


@pytest.mark.parametrize("size,order,client_mptcp", _matrix(slow=False))
def test_integrity_under_loss(lossy_tb, lossy_converter, size, order, client_mptcp):
    """1 % loss both ways on both paths, asymmetric delays: every byte arrives, both directions."""
    up = size if order != "server-first" else size // 3
    with faults.lossy_links(lossy_tb):
        transfer(lossy_tb, lossy_converter, up=up, down=size, order=order, client_mptcp=client_mptcp)
    ledger.add(cases=1)


@pytest.mark.slow
@pytest.mark.parametrize("size,order,client_mptcp", _matrix(slow=True))
def test_integrity_matrix_full(lossy_tb, lossy_converter, size, order, client_mptcp):
    up = size if order != "server-first" else size // 3
    with faults.lossy_links(lossy_tb):
        transfer(lossy_tb, lossy_converter, up=up, down=size, order=order, client_mptcp=client_mptcp)
    ledger.add(cases=1)


DIRECTIONS = {"upload": (1, 0), "download": (0, 1), "both": (1, 1)}


@pytest.fixture(scope="module")
def clean_converter(paper_tb):
    yield from running_converter(paper_tb, "static")


@pytest.mark.parametrize("client_mptcp", [True, False], ids=["mptcp", "tcp"])
@pytest.mark.parametrize("direction", list(DIRECTIONS))
@pytest.mark.parametrize("size", [0, 1, 64 << 10, 1 << 20, 8 << 20 | 777])
def test_integrity_clean(paper_tb, clean_converter, size, direction, client_mptcp):
    """Clean, unshaped links: every size x direction x client protocol, every byte compared."""
    up, down = (size * k for k in DIRECTIONS[direction])
    transfer(paper_tb, clean_converter, up=up, down=down, client_mptcp=client_mptcp)
    ledger.add(cases=1)


def test_integrity_with_offloads_off(paper_tb):
    """GSO/GRO/TSO and checksum offloads off on every interface: still byte-exact."""
    m = MiMBox(mode="static")
    try:
        faults.offloads_off((paper_tb.client, paper_tb.mbox, paper_tb.server))
        m.start(paper_tb, SERVER_PORT)
        transfer(paper_tb, m, up=8 << 20, down=8 << 20, order="both")
        ledger.add(cases=1)
    finally:
        m.stop()
        for host in (paper_tb.client, paper_tb.mbox, paper_tb.server):
            for intf in host.intfList():
                if str(intf) != "lo":
                    host.cmd(f"ethtool -K {intf} tso on gso on tx on rx on")


def rx_bytes(tb, intf: str) -> int:
    return int(tb.client.cmd(f"cat /sys/class/net/{intf}/statistics/rx_bytes"))


def test_aggregation_is_real(mptcp_ok):
    """Two 20 Mbit/s paths: a 20 MB download through the converter takes less time than one path
    alone allows (8 s), and both subflows carried data (like simult_flows.sh)."""
    with Testbed(AggregationTopo()) as tb:
        m = MiMBox(mode="explicit")
        m.start(tb, SERVER_PORT)
        try:
            size = 20_000_000
            before = {i: rx_bytes(tb, i) for i in ("client-eth0", "client-eth1")}
            c, s = transfer(tb, m, up=1, down=size, order="server-first", wait_subflows=2)
            got = {i: rx_bytes(tb, i) - before[i] for i in before}
        finally:
            m.stop()
    one_path_s = size * 8 / 20e6 / (1448 / 1514)
    print(f"elapsed {c['elapsed']:.2f} s, one path alone needs {one_path_s:.2f} s; bytes per path {got}")
    assert c["subflows"] == 2
    assert c["elapsed"] < 0.8 * one_path_s, c["elapsed"]
    assert min(got.values()) > 0.2 * size, got
    ledger.add(cases=1)


def test_handover_wifi_down_mid_transfer(mptcp_ok):
    """The WiFi link dies mid-download: the transfer completes over the other path, every byte."""
    with Testbed(AggregationTopo()) as tb:
        m = MiMBox(mode="explicit")
        m.start(tb, SERVER_PORT)
        srv = Server(tb, SERVER_PORT, mptcp=False)
        try:
            size = 15_000_000
            argv = m.client_argv(tb, [PY, "-m", "experiments.measure.xfer", "client", tb.server_ip, str(SERVER_PORT),
                                      "--up", "1", "--down", str(size), "--order", "server-first", "--mptcp",
                                      "--wait-subflows", "2"])
            proc = tb.client.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            start = {d: rx_bytes(tb, d) for d in ("client-eth0", "client-eth1")}
            # mid-download: both paths have carried some of it, most is still to come
            wait_until(lambda: all(rx_bytes(tb, d) - start[d] > 200_000 for d in start), 20, "the download on both paths")
            faults.link_down(tb.client, "client-eth0")    # WiFi gone
            out, err = proc.communicate(timeout=60)
            import json
            c = json.loads([x for x in out.splitlines() if x.startswith("{")][-1])
            (s,) = srv.reports()
            tb.client.cmd("ip link set client-eth0 up")
            tb.client.cmd("ip route replace default via 10.0.1.2 dev client-eth0")
            # and back: a new connection gets both paths again at once (the routes the link took
            # with it are restored first; whether the kernel re-creates the lost subflow of a
            # connection still running is not asserted here)
            c2, _ = transfer(tb, m, up=1, down=1_000_000, order="server-first", wait_subflows=2)
        finally:
            srv.kill()
            m.stop()
    assert c["received"] == size and c["sha_received"] == s["sha_sent"], (c, s)
    assert c2["subflows"] == 2, c2
    ledger.add(cases=1)


def test_server_reset_mid_transfer_resets_client(paper_tb):
    """The server resets mid-transfer: the client sees a reset promptly, not a hang or a clean EOF."""
    m = MiMBox(mode="static")
    m.start(paper_tb, RESET_PORT)
    rst_server = (f"import socket,struct,time;ls=socket.socket();ls.setsockopt(1,2,1);ls.bind(('0.0.0.0',{RESET_PORT}));"
                  "ls.listen();c,_=ls.accept();c.sendall(b'x'*100000);time.sleep(0.3);"
                  "c.setsockopt(1,13,struct.pack('ii',1,0));c.close()")
    srv = paper_tb.server.popen([PY, "-c", rst_server])
    try:
        from experiments.systems import wait_port
        wait_port(paper_tb.server, RESET_PORT)
        client = ("import socket,time;from mimbox.wire.mptcp import IPPROTO_MPTCP;s=socket.socket(2,1,IPPROTO_MPTCP);s.connect(('%s',%d));t=time.time();n=0\n"
                  "try:\n  while True:\n    b=s.recv(65536)\n    if not b: print('EOF',n); break\n    n+=len(b)\n"
                  "except ConnectionResetError: print('RESET',n,round(time.time()-t,2))" % (paper_tb.mbox_client_ip, m.port))
        out = paper_tb.client.cmd(f"{PY} -c \"{client}\"")
        srv.wait(timeout=10)
        if srv.returncode == 0:          # it reached its abortive close()
            ledger.fault("server reset")
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()
        m.stop()
    assert "RESET" in out, out
    assert float(out.split("RESET", 1)[1].split()[1]) < 2.0, out
    ledger.add(cases=1)


def test_vanished_client_is_freed_by_idle_timeout(paper_tb):
    """A client that disappears without FIN: both sides are freed after the idle timeout."""
    m = MiMBox(mode="static", extra=["--idle-timeout", "2"])
    m.start(paper_tb, VANISH_PORT)
    srv = hold_server(paper_tb, VANISH_PORT, 1)
    cl = hold_clients(paper_tb, m.port, 1)
    try:
        assert readline(cl).startswith("held 1")
        assert wait_active(m, 1)
        # the client vanishes: its packets stop (no FIN, no RST)
        with faults.blackhole(paper_tb.client, "OUTPUT", f"-p tcp --dport {m.port}"):
            faults.kill([cl])
            wait_until(lambda: not m.stats()["active"], 6, "the vanished client's connection freed", every=0.2)
            st = m.stats()
    finally:
        srv.kill()
        m.stop()
    assert st["active"] == 0 and st["errors"].get("idle timeout") == 1, st
    ledger.add(cases=1)


def test_unreachable_server_gives_rst(paper_tb):
    """A destination that never answers: after --connect-timeout the client gets a RST."""
    m = MiMBox(mode="explicit", extra=["--connect-timeout", "1"])
    m.start(paper_tb, SERVER_PORT)
    try:
        with faults.blackhole(paper_tb.server, "INPUT", f"-p tcp --dport {BLACKHOLE_PORT}"):
            t = time.time()
            r = run_client(paper_tb, m, BLACKHOLE_PORT, 1, 1, mptcp=True)
            took = time.time() - t
    finally:
        m.stop()
    assert r.get("errno") == 111 and took < 5, (r, took)
    ledger.add(cases=1)


def test_converter_restart_serves_at_once(paper_tb):
    """Killed (SIGKILL, rules left behind) and restarted: the old connection ends at once (nothing
    hangs), and new connections work at once."""
    m = MiMBox(mode="explicit")
    m.start(paper_tb, SERVER_PORT)
    srv = hold_server(paper_tb, SERVER_PORT, 1)
    old = paper_tb.client.popen(m.client_argv(paper_tb, [PY, "-c", (
        f"import socket,time;s=socket.create_connection(('%s',{SERVER_PORT}));print('up',flush=True);t=time.time()\n"
        "try:\n  b=s.recv(1)\n  print('EOF' if not b else 'DATA', round(time.time()-t,2))\n"
        "except OSError as e: print('RESET', round(time.time()-t,2))" % paper_tb.server_ip)], mptcp=False),
        stdout=subprocess.PIPE, text=True)
    assert readline(old).strip() == "up"
    wait_until(lambda: m.stats()["active"] == 1, 5, "the converter relays it")
    faults.kill(m.procs)
    m.procs.clear()
    ended = readline(old).split()
    srv.kill()
    m.start(paper_tb, SERVER_PORT)        # finds and replaces the stale rules of its port
    try:
        transfer(paper_tb, m, up=1000, down=1000)
    finally:
        m.stop()
    assert ended and ended[0] in ("EOF", "RESET") and float(ended[1]) < 2.0, ended
    for table in ("raw", "filter"):
        assert f"MIMBOX-{m.port}" not in paper_tb.mbox.cmd(f"iptables -t {table} -S")
    ledger.add(cases=1)


def _syn_with(tb, opt_bytes: bytes, dport: int, sport: int) -> str:
    """Send one crafted SYN from the client with scapy; return the flags of the answer (or 'none')."""
    opts = [("MSS", 1460)] + ([(opt_bytes[0], opt_bytes[2:])] if opt_bytes else [])
    script = ("from scapy.all import IP,TCP,sr1,conf;conf.verb=0\n"
              f"opts={opts!r}\n"
              f"a=sr1(IP(src='{tb.client_ips[0]}',dst='{tb.mbox_client_ip}')/TCP(sport={sport},dport={dport},"
              "flags='S',seq=1000,options=opts),timeout=2)\n"
              "print('ANSWER', a[TCP].flags if a is not None else 'none')")
    path = f"/tmp/mimbox-syn-{os.getpid()}.py"
    with open(path, "w") as f:
        f.write(script)
    try:
        # the kernel must not answer the crafted handshake itself with a RST of its own
        out = tb.client.cmd(f"iptables -A OUTPUT -p tcp --tcp-flags RST RST --sport {sport} -j DROP; "
                            f"timeout 20 {PY} {path}; "
                            f"iptables -D OUTPUT -p tcp --tcp-flags RST RST --sport {sport} -j DROP")
    finally:
        os.unlink(path)
    return out.split("ANSWER", 1)[1].strip() if "ANSWER" in out else out


BAD_OPTIONS = [
    ("no option", b""),
    ("length 9", bytes([253, 9]) + b"\x4d\x42" + bytes([10, 0, 101, 1, 35])),
    ("length 12", bytes([253, 12]) + b"\x4d\x42" + bytes([10, 0, 101, 1, 35, 40, 0, 0])),
    ("unknown ExID", bytes([253, 10]) + b"\x12\x34" + bytes([10, 0, 101, 1, 35, 40])),
    ("0.0.0.0", DstOpt("10.0.101.1", 80).encode()[:4] + bytes([0, 0, 0, 0, 35, 40])),
    ("port 0", DstOpt("10.0.101.1", 80).encode()[:8] + bytes([0, 0])),
    ("the converter itself", DstOpt("10.0.1.2", 7508).encode()),
    ("loopback", DstOpt("127.0.0.1", 22).encode()),
    ("multicast", DstOpt("224.0.0.1", 80).encode()),
    ("link-local", DstOpt("169.254.1.1", 80).encode()),
]


def test_bad_dstopt_gets_rst_and_log_and_service_continues(paper_tb):
    """Every malformed or forbidden DST_OPT: RST, a log line naming the reason; others still served."""
    m = MiMBox(mode="explicit")
    m.start(paper_tb, SERVER_PORT)
    try:
        answers = {name: _syn_with(paper_tb, opt, m.port, 40000 + i) for i, (name, opt) in enumerate(BAD_OPTIONS)}
        transfer(paper_tb, m, up=10_000, down=10_000)      # a good client is still served
        st = m.stats()
    finally:
        m.stop()
    bad = {k: v for k, v in answers.items() if "R" not in v}
    assert not bad, f"answered without RST: {bad}"
    assert st["refused"] == {"bad option": 6, "destination denied": 4}, st["refused"]
    log = m.log()
    for needle in ("no DST_OPT", "length 9", "length 12", "unknown ExID", "0.0.0.0", "port 0", "converter itself",
                   "127.0.0.0/8", "224.0.0.0/4", "169.254.0.0/16"):
        assert needle in log, needle
    ledger.add(cases=len(BAD_OPTIONS) + 1, inputs=len(BAD_OPTIONS))


def test_slow_trickle_does_not_block_others(paper_tb):
    """A slowloris-style client trickling a byte at a time: the converter keeps serving others."""
    m = MiMBox(mode="explicit")
    m.start(paper_tb, SERVER_PORT)
    srv = hold_server(paper_tb, TRICKLE_PORT, 1)
    trickle = paper_tb.client.popen(m.client_argv(paper_tb, [PY, "-c", (
        f"import socket,time;s=socket.create_connection(('%s',{TRICKLE_PORT}));"
        "[(s.send(b'x'), time.sleep(0.2)) for _ in range(25)]" % paper_tb.server_ip)], mptcp=False))
    try:
        wait_until(lambda: m.stats()["active"] == 1, 5, "the trickle relayed")
        t = time.time()
        transfer(paper_tb, m, up=1 << 20, down=1 << 20)
        took = time.time() - t
        active = m.stats()["active"]
    finally:
        stop_process(trickle)      # SIGTERM: `mimbox client` passes it on, then removes its cgroup
        srv.kill()
        m.stop()
    assert took < 5 and active >= 1, (took, active)
    ledger.fault("slow-trickling client")       # it was still trickling: counted among the active
    ledger.add(cases=1)


def test_client_outside_allowed_prefixes_refused(paper_tb):
    """No open relay: a client outside --allow-client gets RST; one inside is served."""
    m = MiMBox(mode="explicit", extra=["--allow-client", "10.0.2.0/24"])
    m.start(paper_tb, SERVER_PORT)
    try:
        r = run_client(paper_tb, m, SERVER_PORT, 1, 1)   # from 10.0.1.1: outside
        st = m.stats()
    finally:
        m.stop()
    assert r.get("errno") == 111, r
    assert st["refused"] == {"client not allowed": 1}, st
    ledger.add(cases=1, inputs=1)


def test_connection_limit_refuses_cleanly(paper_tb):
    """--max-connections 5: five idle connections are held, the rest get RST (no random failure)."""
    m = MiMBox(mode="static", extra=["--max-connections", "5"])
    m.start(paper_tb, LIMIT_PORT)
    srv = hold_server(paper_tb, LIMIT_PORT, 5)
    cl = hold_clients(paper_tb, m.port, 8)
    try:
        line = readline(cl)
        st = m.stats()
    finally:
        cl.kill()
        srv.kill()
        m.stop()
    assert line.strip() == "held 5 refused 3", line
    assert st["refused"] == {"connection limit": 3}, st
    ledger.fault("connection over the limit", st["refused"]["connection limit"])
    ledger.add(cases=1)


def test_memory_budget_limit_fills_then_refuses_at_once_and_the_held_still_relay(paper_tb):
    """The default limit comes from what a connection holds at rest (mimbox.host.resources): a budget of
    exactly 40 of them admits 40 idle connections; the 41st is refused at once (RST at its SYN, not
    a dropped SYN that retries after a second), and every one of the 40 still relays byte-exact."""
    n = 40
    m = MiMBox(mode="static", extra=["--memory-budget", str(budget_for(n, []))])
    m.start(paper_tb, BUDGET_PORT)
    srv = hold_server(paper_tb, BUDGET_PORT, n)
    cl = hold_clients(paper_tb, m.port, n + 1)
    try:
        t0 = time.monotonic()
        line = readline(cl)
        took = time.monotonic() - t0
        cl.stdin.write("echo\n")
        cl.stdin.flush()
        echoed = readline(cl)
        st = m.stats()
    finally:
        cl.kill()
        srv.kill()
        m.stop()
    assert st["limit"] == n, st
    assert line.strip() == f"held {n} refused 1", line
    assert took < 3, f"{n + 1} connects took {took:.1f}s: the refused one waited for a retransmission"
    assert echoed.strip() == f"echoed {n} of {n}", echoed
    assert st["refused"] == {"connection limit": 1}, st
    m.log().index("limit 40 connections (memory binds")     # the start-up line says what binds
    ledger.fault("connection over the memory limit", 1)
    ledger.add(cases=1)


def wait_active(m, n: int, timeout: float = 5.0) -> bool:
    """The client's connect() returns before the converter has accept()ed (and, with several
    workers, handed over): wait until the converter counts n active connections."""
    try:
        return bool(wait_until(lambda: m.stats()["active"] == n, timeout, f"{n} active"))
    except AssertionError:
        return False


def converter_pids(m) -> list[int]:
    """The converter's processes: `mimbox run` and, with several workers, its workers (not their
    keepers: they share their worker's fds, which would be counted twice)."""
    from mimbox.converter.core import is_keeper
    main = m.pids()[0]
    with open(f"/proc/{main}/task/{main}/children") as f:
        return [main, *(p for p in map(int, f.read().split()) if not is_keeper(p))]


def converter_fds(m) -> int:
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in converter_pids(m))


def converter_rss_kb(m) -> int:
    total = 0
    for pid in converter_pids(m):
        with open(f"/proc/{pid}/status") as f:
            total += int(f.read().split("VmRSS:")[1].split()[0])
    return total


IDLE_BUFFERS = ["--client-rcvbuf", "64K", "--client-sndbuf", "64K", "--server-rcvbuf", "32K",
                "--server-sndbuf", "32K", "--pipe-size", "64K"]


def budget_for(n: int, options: list[str]) -> int:
    """The --memory-budget that admits exactly n connections with these buffer options."""
    from mimbox.ops.flags import build_parser, config_from_args
    return n * config_from_args(build_parser().parse_args(["run", *options])).per_connection_memory()


@pytest.mark.parametrize("n", [pytest.param(2000, id="2k"), pytest.param(10_000, id="10k", marks=pytest.mark.slow)])
def test_many_idle_connections_then_no_leak(paper_tb, n):
    """n idle connections held under a memory budget that admits exactly n, then closed: fds and
    pipes back to start. Two workers: one process's RLIMIT_NOFILE (hard 20000 in this sandbox,
    two sockets a connection) could not hold 10,000."""
    budget = budget_for(n, IDLE_BUFFERS)     # what n connections hold at rest (mimbox.host.resources)
    m = MiMBox(mode="static", extra=["--workers", "2", *IDLE_BUFFERS,
                                                "--memory-budget", str(budget), "--idle-timeout", "0"])
    m.start(paper_tb, IDLE_PORT)
    srv = hold_server(paper_tb, IDLE_PORT, n)
    try:
        fds0, rss0 = converter_fds(m) - m.stats()["spares"], converter_rss_kb(m)
        cl = hold_clients(paper_tb, m.port, n)
        line = readline(cl)
        assert wait_active(m, n, timeout=30)
        held = m.stats()
        fds_held = converter_fds(m)
        rss_kb = converter_rss_kb(m)
        cl.stdin.close()             # both ends close: the converter passes each FIN on
        srv.stdin.close()
        cl.wait(timeout=60)
        wait_until(lambda: not m.stats()["active"], 30, "every connection closed", every=0.5)
        after = m.stats()
        fds1 = converter_fds(m)
    finally:
        srv.kill()
        m.stop()
    print(f"{n} held: {fds_held} fds, RSS {rss0} -> {rss_kb} KB ({(rss_kb - rss0) * 1024 / n:.0f} B/connection)")
    assert line.startswith(f"held {n} refused 0"), line
    assert held["active"] == n and held["limit"] == n, held
    assert fds_held <= fds0 + 2 * n + 16         # two sockets per connection, no pipes while idle
    assert after["active"] == 0 and after["pending"] == 0
    assert fds1 <= fds0 + 2 * after["pipes_pooled"] + after["spares"]  # only pooled pipes and spare sockets remain
    assert after["spares"] <= 2 * 2 * ListenerConfig.spare_sockets   # per worker and kind
    ledger.add(cases=1)


def fds_beside_pools(m) -> tuple[int, dict]:
    """The converter's fds other than pooled pipes and spare server sockets, and its stats: read
    between two stats that agree on both pools (an idle loop makes its missing spares just when a
    load stops: a count read across that moment was off by the spares made meanwhile)."""
    def once():
        a, fds, b = m.stats(), converter_fds(m), m.stats()
        if (a["spares"], a["pipes_pooled"]) == (b["spares"], b["pipes_pooled"]):
            return fds - 2 * b["pipes_pooled"] - b["spares"], b
    return wait_until(once, 10, "a stable count of pooled pipes and spare sockets", every=0.05)


@pytest.mark.parametrize("n", [pytest.param(5000, id="5k"), pytest.param(100_000, id="100k",
                                                                          marks=pytest.mark.slow)])
def test_many_short_connections_no_growth(paper_tb, n):
    """n short connections in a row (wrk-like churn): no growth in fds or memory."""
    from experiments import servers
    from experiments.measure.tools import wrk
    m = MiMBox(mode="static", extra=["--handshake-timeout", "2"])
    web = servers.nginx(paper_tb, [1024], WEB_PORT)
    m.start(paper_tb, WEB_PORT)
    try:
        wrk(paper_tb, m, WEB_PORT, "/1024.bin", 1, 20)        # warm-up: pools fill
        fds0, st = fds_beside_pools(m)                     # pools may grow, up to a cap
        rss0 = converter_rss_kb(m)
        done = 0
        while done < n:
            r = wrk(paper_tb, m, WEB_PORT, "/1024.bin", 2, 20)
            assert r["socket_errors"] == 0 and r["non_2xx"] == 0, r
            done += r["requests"]
        # wrk stops mid-handshake on some connections: the server side opened for them is closed
        # after --handshake-timeout, so wait for it before counting
        st = wait_until(lambda: (lambda st: st if not st["pending"] and not st["active"] else None)(m.stats()),
                        10, "nothing pending or active", every=0.25)
        fds1, st = fds_beside_pools(m)
        pooled = st["pipes_pooled"]
        rss1 = converter_rss_kb(m)
    finally:
        m.stop()
        web.stop()
    print(f"{done} connections: fds other than pooled pipes {fds0} -> {fds1} ({pooled} pipes pooled), "
          f"RSS {rss0} -> {rss1} KB")
    assert fds1 <= fds0 + 2
    assert pooled <= 2 * 20        # at most one pipe per direction of the 20 concurrent connections
    assert rss1 - rss0 < 8 * 1024, (rss0, rss1)
    ledger.add(cases=1)
